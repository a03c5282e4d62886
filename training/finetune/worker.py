"""The pieces every fine-tuning recipe's worker uses (:mod:`training.finetune.recipe_base`):
the worker's setup (config, rank, device, the frozen base built the same on every rank), batches
(endless epochs over a Ray Data shard), a numpy batch on the device, the denoising objective of
diffusers' training scripts (noise, a uniform timestep, MSE against the noise (epsilon) or the
velocity (v) as the scheduler's ``prediction_type`` says), AdamW (or bitsandbytes' 8-bit AdamW)
with diffusers' lr schedules, and the optimizer step with gradient clipping.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.finetune.config import FinetuneConfig
from training.rundir import STATE_FILE  # noqa: F401  (train_state.pt: step, optimizer, schedule; re-exported)

log = logging.getLogger("segfactory.finetune")


WEIGHTS_FILE, META_FILE = "trained.safetensors", "segfactory.json"
EMA_FILE = "ema.safetensors"  # the EMA weights (what the run exports) when ema.enabled


def to_device(batch: dict[str, np.ndarray], device: Any, flips: np.ndarray | None, encoder: Any,
              target_key: str, gen: Any = None) -> dict[str, Any]:
    """A numpy batch (cached latents, or pixels) -> tensors on ``device``; ``flips`` (bool per
    row) picks the flipped latents / mirrors the pixels and the colour map."""
    import torch

    out: dict[str, Any] = {"captions": [str(c) for c in batch["caption"]]}
    f = np.zeros(len(out["captions"]), bool) if flips is None else flips
    cond = np.asarray(batch["cond"])
    cond = np.where(f[:, None, None, None], cond[:, :, ::-1], cond)
    out["cond"] = torch.as_tensor(np.ascontiguousarray(cond)).to(device)
    if "latents" in batch:
        lat = batch["latents"]
        if "latents_flip" in batch:
            lat = np.where(f[:, None, None, None], batch["latents_flip"], lat)
        out["latents"] = torch.as_tensor(np.ascontiguousarray(lat), dtype=torch.float32).to(device)
        out["prompt_embeds"] = torch.as_tensor(batch["prompt_embeds"], dtype=torch.float32).to(device)
        if "pooled" in batch:
            out["pooled"] = torch.as_tensor(batch["pooled"], dtype=torch.float32).to(device)
    else:  # from pixels: encode now with the frozen VAE / text encoders
        pix = np.asarray(batch[target_key])
        pix = np.where(f[:, None, None, None], pix[:, :, ::-1], pix)
        out["latents"] = encoder.encode_pixels(np.ascontiguousarray(pix), gen)
        out |= encoder.encode_text(out["captions"])
    out["orig_hw"] = torch.as_tensor(np.asarray(batch["orig_hw"]), dtype=torch.float32)
    out["crop_tl"] = torch.as_tensor(np.asarray(batch["crop_tl"]), dtype=torch.float32)
    return out


def epochs(shard: Any, batch_size: int, shuffle: int, seed: int, in_memory: bool):
    """Endless batches: one pass of the shard per epoch (a fresh local shuffle each). With
    ``in_memory`` the first pass is kept and later epochs reshuffle it in the worker (no Ray
    Data execution per epoch: small datasets, e.g. the tiny recipes and few-shot sets)."""
    epoch, kept = 0, []
    while True:
        got = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle or None,
                                        local_shuffle_seed=(seed + epoch) if shuffle else None):
            got += 1
            if in_memory:
                kept.append(batch)
            yield batch
        if not got:
            raise RuntimeError(f"training data: no full batch of {batch_size} rows on this worker")
        epoch += 1
        if in_memory:
            break
    rows = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    n = len(rows["caption"])
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            yield {k: v[idx] for k, v in rows.items()}


def whole(shard: Any) -> dict[str, np.ndarray]:
    parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def denoising_loss(recipe: Any, model: Any, batch: dict[str, Any], scheduler: Any, gen: Any = None) -> Any:
    """One training loss: noise at uniform timesteps, MSE of the prediction against the
    noise (epsilon) or the velocity (v) as the scheduler's ``prediction_type`` says."""
    import torch

    from training.finetune.models import draw_noise, target_for

    noisy, noise, ts = draw_noise(batch["latents"], scheduler, gen)
    pred = recipe.predict(model, noisy, ts, batch)
    return torch.nn.functional.mse_loss(pred.float(), target_for(scheduler, batch["latents"], noise, ts).float())


def make_optimizer(cfg: FinetuneConfig, params: list[Any]):
    import torch

    o = cfg.optim
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("optim.use_8bit_adam: bitsandbytes is not importable here") from exc
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_lr_schedule(cfg: FinetuneConfig, opt: Any):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.optim.schedule == "constant" else "polynomial"
    kwargs = {"power": cfg.optim.poly_power} if name == "polynomial" else {}
    return get_scheduler(name, opt, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.iterations, **kwargs)


def optimizer_step(cfg: FinetuneConfig, params: list[Any], opt: Any, sched: Any) -> float:
    """Clip the global grad norm (``optim.grad_clip``), step the optimizer and the lr schedule,
    clear the grads; returns the lr the step used. Shared by every fine-tuning loop."""
    import torch

    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    opt.step()
    lr = opt.param_groups[0]["lr"]
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr


@dataclass
class WorkerSetup:
    """What every fine-tuning worker starts from: its config, rank, device and the frozen base."""

    cfg: FinetuneConfig
    meta: dict[str, Any]
    rank: int
    world: int
    device: Any
    comps: dict[str, Any]
    encoder: Any  # models.PairEncoder on ``device``
    scheduler: Any  # the DDPM training scheduler


def setup_worker(config: dict[str, Any]) -> WorkerSetup:
    """In a Ray Train worker: validate the config, set threads and the seed, build the base
    components on this worker's device (the same for every rank: seeded)."""
    import ray.train
    import ray.train.torch
    import torch

    from training.finetune.models import PairEncoder, build_components, noise_scheduler

    cfg = FinetuneConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    if cfg.workers.torch_threads:
        torch.set_num_threads(cfg.workers.torch_threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    comps = build_components(**config["meta"]["build"], device=str(device))
    return WorkerSetup(cfg, config["meta"], ctx.get_world_rank(), ctx.get_world_size(), device, comps,
                       PairEncoder(comps, cfg.resolved_family, str(device)), noise_scheduler(comps))


def autocast(device: Any, bf16: bool):
    import torch

    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
