"""``finetune_loop``: what each Ray Train worker runs, for every recipe.

Generic over :mod:`training.finetune.recipes`: build the base components, let the recipe say
which module trains, wrap it (DDP, or FSDP via Ray Train's ``prepare_model``), then the
denoising objective of diffusers' training scripts: noise, a uniform timestep, the noisy
latents, and MSE against the noise (epsilon) or velocity (v) — as the scheduler's
``prediction_type`` says. AdamW (or bitsandbytes' 8-bit AdamW), constant or polynomial lr with
warm-up (diffusers ``get_scheduler``), gradient accumulation (``no_sync`` between micro-steps),
bf16 autocast on CUDA, gradient checkpointing, optional EMA (diffusers ``EMAModel``).
Every ``validation.interval`` steps: held-out loss, a sample grid (rank 0) and a checkpoint;
on start it restores the latest checkpoint (worker failure, or ``resume=true``) and continues
the step count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.finetune.config import FinetuneConfig

log = logging.getLogger("segfactory.finetune")

WEIGHTS_FILE, STATE_FILE, META_FILE = "trained.safetensors", "train_state.pt", "segfactory.json"
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


def _epochs(shard: Any, batch_size: int, shuffle: int, seed: int, in_memory: bool):
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


def _whole(shard: Any) -> dict[str, np.ndarray]:
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


def _autocast(device: Any, bf16: bool):
    import torch

    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _trained_state(cfg: FinetuneConfig, recipe: Any, model: Any) -> dict[str, Any]:
    """The trained weights (all ranks call this: FSDP gathers a full state dict collectively)."""
    if cfg.workers.strategy == "fsdp":
        return model.state_dict()
    return recipe.state_dict(recipe.module)


def _save(tmp: Path, weights: dict[str, Any], state: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def _restore_dir(meta: dict[str, Any]) -> str | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    return ckpt.to_directory() if ckpt is not None else meta.get("resume_from")


def finetune_loop(config: dict[str, Any]) -> None:
    """Train per ``config["cfg"]`` (a FinetuneConfig dump); ``config["meta"]`` from the driver:
    run_dir, build kwargs, palette, resume_from."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file

    from training.finetune.models import eval_timesteps
    from training.finetune.recipes import make_recipe
    from training.finetune.validate import color_fidelity, held_out_loss, sample_grid

    w = setup_worker(config)
    cfg, meta, rank, world, device = w.cfg, w.meta, w.rank, w.world, w.device
    encoder, scheduler, res = w.encoder, w.scheduler, cfg.data.resolution
    recipe = make_recipe(cfg.kind, w.comps, cfg.resolved_family, res, lora=cfg.lora,
                         controlnet_path=cfg.model.controlnet_local_path)
    if cfg.workers.gradient_checkpointing:
        recipe.module.enable_gradient_checkpointing()
    recipe.module.train()

    resume = _restore_dir(meta)
    state: dict[str, Any] | None = None
    if resume:
        recipe.load_state_dict(recipe.module, load_file(str(Path(resume) / WEIGHTS_FILE), device=str(device)))
        state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=True)  # plain state dicts only: no pickled code
    strategy = cfg.workers.strategy if world > 1 or cfg.workers.strategy == "fsdp" else "ddp"
    model = ray.train.torch.prepare_model(recipe.module, parallel_strategy=strategy) if world > 1 else recipe.module
    params = recipe.parameters(recipe.module)
    opt = make_optimizer(cfg, params)
    sched = make_lr_schedule(cfg, opt)
    ema = None
    if cfg.ema.enabled:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema.decay)
    step, elapsed = 0, 0.0
    if state is not None:
        step, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        if state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if rank == 0:
            log.info("resumed from %s at step %d", resume, step)

    val_np = _whole(ray.train.get_dataset_shard("val"))
    val = to_device(val_np, device, None, encoder, recipe.target_key, torch.Generator(str(device)).manual_seed(cfg.seed))
    ts_eval = eval_timesteps(scheduler, cfg.validation.timesteps)
    palette = np.asarray(meta["palette"], np.uint8)
    batches = _epochs(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer, cfg.seed + step,
                      cfg.data.in_memory)
    rng = np.random.default_rng((cfg.seed, rank, step))
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + rank * 100003 + step)

    def validate(at: int) -> dict[str, Any]:
        out = {"val_loss": held_out_loss(recipe, model, val, scheduler, ts_eval, cfg.seed)}
        can_sample = cfg.validation.samples and rank == 0 and cfg.workers.strategy == "ddp"
        if can_sample:
            k = min(cfg.validation.samples, len(val["captions"]))
            conds = val_np["cond"][:k] if recipe.needs_cond else None
            imgs = sample_grid(recipe, val["captions"][:k], conds, res, cfg.validation.steps,
                               cfg.validation.guidance_scale, cfg.seed,
                               Path(meta["run_dir"]) / "samples" / f"step_{at:07d}.png")
            if cfg.kind == "text2mask":
                out["val_fidelity"] = color_fidelity(imgs, palette)
        return out

    window = {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "t0": time.perf_counter()}
    started = time.perf_counter() - elapsed
    if step == 0:
        ray.train.report({"step": 0, "iterations": cfg.iterations, **validate(0)})
    while step < cfg.iterations:
        t0 = time.perf_counter()
        loss_sum, wait = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            tw = time.perf_counter()
            nb = next(batches)
            flips = rng.random(len(nb["caption"])) < 0.5 if cfg.data.flip else None
            batch = to_device(nb, device, flips, encoder, recipe.target_key, gen if device.type == "cpu" else None)
            wait += time.perf_counter() - tw
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, cfg.workers.bf16):
                loss = denoising_loss(recipe, model, batch, scheduler, gen)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        lr = optimizer_step(cfg, params, opt, sched)
        if ema is not None:
            ema.step(params)
        step += 1
        for k, v in (("loss", loss_sum), ("n", 1), ("wait", wait), ("busy", time.perf_counter() - t0)):
            window[k] += v
        if step in cfg.debug.fail_at_steps and rank == 0:
            marker = Path(meta["run_dir"]) / f".failed_at_{step}"
            if not marker.exists():
                marker.touch()
                raise RuntimeError(f"debug.fail_at_steps: simulated worker failure at step {step}")
        do_val = step % cfg.validation.interval == 0 or step == cfg.iterations
        do_ckpt = do_val or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
        if not (do_ckpt or step % cfg.log_interval == 0):
            continue
        span = time.perf_counter() - window["t0"]
        metrics: dict[str, Any] = {
            "step": step, "iterations": cfg.iterations, "loss": window["loss"] / window["n"], "lr": lr,
            "data_wait_fraction": window["wait"] / max(1e-9, window["busy"]),
            "step_time_s": window["busy"] / window["n"], "steps_per_s": window["n"] / max(1e-9, span)}
        if do_val:
            if ema is not None:  # validate (and export) the EMA weights
                ema.store(params)
                ema.copy_to(params)
            metrics |= validate(step)
            if ema is not None:
                ema.restore(params)
        elapsed = metrics["elapsed_s"] = time.perf_counter() - started
        if do_ckpt:
            weights, ema_weights = _trained_state(cfg, recipe, model), None
            if ema is not None:  # the run's output is the EMA; training resumes from the raw weights
                ema.store(params)
                ema.copy_to(params)
                ema_weights = {k: v.detach().clone() for k, v in _trained_state(cfg, recipe, model).items()}
                ema.restore(params)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    train_state = {"step": step, "elapsed_s": elapsed, "scheduler": sched.state_dict(),
                                   # FSDP shards the optimizer state: not checkpointed (moments restart)
                                   "optimizer": opt.state_dict() if cfg.workers.strategy == "ddp" else None,
                                   "ema": ema.state_dict() if ema is not None else None}
                    _save(Path(tmp), weights, train_state, {"kind": cfg.kind, "step": step, **meta["out_meta"]})
                    if ema_weights is not None:
                        from safetensors.torch import save_file

                        save_file({k: v.contiguous().cpu() for k, v in ema_weights.items()}, str(Path(tmp) / EMA_FILE))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:07d}")
        else:
            ray.train.report(metrics)
        window = {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "t0": time.perf_counter()}
