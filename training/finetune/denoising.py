"""The denoising recipes' base (Text2Mask, Mask2Img, LoRA: :mod:`training.finetune.recipes`).

Model side: a recipe says (1) which module trains (``module``: what DDP/FSDP wraps, ``_build``),
(2) which of its parameters (``parameters``), (3) how an encoded batch and noisy latents become
the model's prediction (``predict``), (4) what a checkpoint keeps (``state_dict`` /
``load_state_dict``), (5) the diffusers folder it exports (``export``) and (6) a pipeline for
validation samples (``pipeline``).

Worker side (the hooks of :class:`training.finetune.recipe_base.Recipe`): the module wrapped by
DDP, or FSDP via Ray Train's ``prepare_model``; AdamW (or 8-bit AdamW), constant or polynomial
lr with warm-up (diffusers ``get_scheduler``), gradient accumulation (``no_sync`` between
micro-steps), bf16 autocast on CUDA, gradient checkpointing, optional EMA (diffusers
``EMAModel``: validated and exported, training resumes from the raw weights). Evaluation: the
held-out loss at fixed noise and timesteps, a sample grid (rank 0) in ``RUN/samples/``.

Driver side (:meth:`DenoisingRecipe.run`): pairs, the latent cache, the TorchTrainer, then the
export of the last checkpoint to ``RUN/model`` and ``final.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from core import storage
from core.config import ConfigError
from core.storage import Location
from training import rundir
from training.finetune.config import FinetuneConfig
from training.finetune.data import build_kwargs
from training.finetune.models import unet_kwargs
from training.finetune.recipe_base import Recipe, make_trainer, metric_rows, open_run, start_run
from training.finetune.worker import (
    EMA_FILE,
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    WorkerSetup,
    autocast,
    denoising_loss,
    epochs,
    make_lr_schedule,
    make_optimizer,
    optimizer_step,
    to_device,
    whole,
)

log = logging.getLogger("segfactory.finetune")

META_NAME = "segfactory.json"  # written into every exported folder: kind, palette, classes
UNET_PIPE = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class DenoisingRecipe(Recipe):
    """A module trained on the denoising objective; subclasses say which module and how it predicts."""

    def __init__(self, comps: dict[str, Any], family: str, resolution: int, lora: Any = None,
                 controlnet_path: str | None = None) -> None:
        self.comps, self.family, self.resolution = comps, family, resolution
        self.module = self._build(lora, controlnet_path)

    # --- model side ---------------------------------------------------------------------------

    @abstractmethod
    def _build(self, lora: Any, controlnet_path: str | None) -> Any:
        """The trainable module (its parameters with ``requires_grad``)."""

    @abstractmethod
    def export(self, out: Path, meta: dict[str, Any]) -> None:
        """The folder ``generate`` loads (a local directory; the driver copies it to a URI)."""

    def parameters(self, module: Any) -> list[Any]:
        return [p for p in module.parameters() if p.requires_grad]

    def predict(self, model: Any, noisy: Any, timesteps: Any, batch: dict[str, Any]) -> Any:
        return model(noisy, timesteps, **unet_kwargs(batch, self.family, self.resolution)).sample

    def state_dict(self, module: Any) -> dict[str, Any]:
        return module.state_dict()

    def load_state_dict(self, module: Any, state: dict[str, Any]) -> None:
        module.load_state_dict(state)

    def pipeline(self) -> Any:
        cls = dm._pipeline_class("text2img", self.family)
        pipe = cls(**{k: self.comps[k] for k in UNET_PIPE if k in self.comps}, **dm._extras(self.family))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_metrics(self, images: np.ndarray) -> dict[str, float]:
        """Metrics of the validation samples (Text2Mask: colour-map fidelity)."""
        return {}

    # --- worker side --------------------------------------------------------------------------

    @classmethod
    def from_worker(cls, w: WorkerSetup) -> DenoisingRecipe:
        cfg = w.cfg
        recipe = cls(w.comps, cfg.resolved_family, cfg.data.resolution, lora=cfg.lora,
                     controlnet_path=cfg.model.controlnet_local_path)
        recipe.w = w
        return recipe

    def setup_model(self, resume: str | None) -> dict[str, Any] | None:
        import ray.train.torch
        import torch
        from safetensors.torch import load_file

        w, cfg = self.w, self.w.cfg
        if cfg.workers.bf16 and cfg.workers.frozen_bf16 and w.device.type == "cuda":
            store_frozen_in(self.comps, torch.bfloat16)
        if cfg.workers.gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        self.module.train()
        state = None
        if resume:
            self.load_state_dict(self.module, load_file(str(Path(resume) / WEIGHTS_FILE), device=str(w.device)))
            state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=True)  # plain state dicts only: no pickled code
        strategy = cfg.workers.strategy if w.world > 1 or cfg.workers.strategy == "fsdp" else "ddp"
        self.model = ray.train.torch.prepare_model(self.module, parallel_strategy=strategy) if w.world > 1 else self.module
        return state

    def setup_optimizer(self, state: dict[str, Any] | None) -> None:
        cfg = self.w.cfg
        self.params = self.parameters(self.module)
        self.opt = make_optimizer(cfg, self.params)
        self.sched = make_lr_schedule(cfg, self.opt)
        self.ema = None
        if cfg.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema.decay)
        if state is None:
            return
        if state.get("optimizer") is not None:
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def setup_data(self, step: int) -> None:
        import ray.train
        import torch

        from training.finetune.models import eval_timesteps

        w, cfg = self.w, self.w.cfg
        self.val_np = whole(ray.train.get_dataset_shard("val"))
        self.val = to_device(self.val_np, w.device, None, w.encoder, self.target_key,
                             torch.Generator(str(w.device)).manual_seed(cfg.seed))
        self.ts_eval = eval_timesteps(w.scheduler, cfg.validation.timesteps)
        self.batches = epochs(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer,
                              cfg.seed + step, cfg.data.in_memory)
        self.rng = np.random.default_rng((cfg.seed, w.rank, step))
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + w.rank * 100003 + step)

    def train_step(self) -> tuple[float, float]:
        w, cfg = self.w, self.w.cfg
        loss_sum, wait = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            tw = time.perf_counter()
            nb = next(self.batches)
            flips = self.rng.random(len(nb["caption"])) < 0.5 if cfg.data.flip else None
            batch = to_device(nb, w.device, flips, w.encoder, self.target_key, self.gen if w.device.type == "cpu" else None)
            wait += time.perf_counter() - tw
            sync = micro == cfg.grad_accum - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast(w.device, cfg.workers.bf16):
                loss = denoising_loss(self, self.model, batch, w.scheduler, self.gen)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        self.lr = optimizer_step(cfg, self.params, self.opt, self.sched)
        if self.ema is not None:
            self.ema.step(self.params)
        return loss_sum, wait

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the module for the block (validation, export); no-op without EMA."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out loss (every rank) and, on rank 0 under DDP, a sample grid in ``RUN/samples/``."""
        from training.finetune.validate import held_out_loss, sample_grid

        w, cfg = self.w, self.w.cfg
        with self.ema_weights():
            out = {"val_loss": held_out_loss(self, self.model, self.val, w.scheduler, self.ts_eval, cfg.seed)}
            if not (cfg.validation.samples and w.rank == 0 and cfg.workers.strategy == "ddp"):
                return out
            k = min(cfg.validation.samples, len(self.val["captions"]))
            conds = self.val_np["cond"][:k] if self.needs_cond else None
            images = sample_grid(self, self.val["captions"][:k], conds, cfg.data.resolution, cfg.validation.steps,
                                 cfg.validation.guidance_scale, cfg.seed,
                                 storage.resolve(w.meta["run_dir"]) / "samples" / f"step_{step:07d}.png")
        return out | self.sample_metrics(images)

    def _trained_state(self) -> dict[str, Any]:
        """The trained weights (all ranks call this: FSDP gathers a full state dict collectively)."""
        return self.model.state_dict() if self.w.cfg.workers.strategy == "fsdp" else self.state_dict(self.module)

    def save_checkpoint(self, step: int, metrics: dict[str, Any]) -> Callable[[Path], None]:
        """The weights (and the EMA's: the run's output), optimizer, schedule and step. FSDP
        shards the optimizer state: not checkpointed there (the moments restart)."""
        cfg = self.w.cfg
        weights, ema_weights = self._trained_state(), None
        if self.ema is not None:
            with self.ema_weights():
                ema_weights = {k: v.detach().clone() for k, v in self._trained_state().items()}

        def write(tmp: Path) -> None:
            state = {"step": step, "elapsed_s": metrics["elapsed_s"], "scheduler": self.sched.state_dict(),
                     "optimizer": self.opt.state_dict() if cfg.workers.strategy == "ddp" else None,
                     "ema": self.ema.state_dict() if self.ema is not None else None}
            write_checkpoint(tmp, weights, state, {"kind": cfg.kind, "step": step, **self.w.meta["out_meta"]}, ema_weights)

        return write

    # --- driver side --------------------------------------------------------------------------

    @classmethod
    def run(cls, cfg: FinetuneConfig) -> dict[str, Any]:
        from core.runtime import init_ray
        from training.finetune.data import index_rows, resolve_palette, train_rows
        from training.finetune.pairs import uses_captioner
        from training.runlog import record_fit

        started = time.time()
        run, resume_from, step = open_run(cfg)
        index, val_rows, problems = index_rows(cfg)
        palette_name, palette = resolve_palette(cfg, index)
        captioned = uses_captioner(cfg, train_rows(cfg, index) + val_rows)
        if captioned and cfg.preset != "tiny" and not (cfg.captioner.model.id or cfg.captioner.model.local_path):
            raise ConfigError(f"captioner.model.id: required (or captioner.model.local_path): rows without a caption are "
                              f"captioned under preset {cfg.preset}; or set captions.source=template")
        init_ray(cfg.ray)
        start_run(cfg, run, resume_from, step)
        datasets = cls._datasets(cfg, run, index, val_rows, problems, palette, captioned)
        meta = {"run_dir": run.uri, "build": build_kwargs(cfg), "palette": palette.tolist(),
                "resume_from": str(resume_from) if resume_from else None,
                "out_meta": _out_meta(cfg, index, palette, palette_name)}
        trainer = make_trainer(cfg, cls, meta, datasets, run)
        log.info("fine-tuning %s (%s, %s) for %d steps x %d pairs x %d workers -> %s", cfg.kind, cfg.preset,
                 cfg.resolved_family, cfg.iterations, cfg.batch_size * cfg.grad_accum, cfg.workers.num_workers, run)
        record_fit(trainer, run)
        return cls._finish(cfg, run, palette_name, started)

    @classmethod
    def _datasets(cls, cfg: FinetuneConfig, run: Location, index: Any, val_rows: list[dict],
                  problems: list[tuple[str, str, str]], palette: Any, captioned: bool) -> dict[str, Any]:
        """Pairs (their rejected rows in ``RUN/rejected/``), encoded once into the latent cache."""
        from training.finetune.data import (
            cache_current,
            cache_key,
            cache_root,
            cached_datasets,
            clear_rejected,
            pair_datasets,
            write_index_problems,
        )

        key, cache = cache_key(cfg, palette, cls.target_key, captioned), cache_root(cfg, run)
        if not (cfg.data.cache_latents and cache_current(cache, key)):  # the pairs pass runs: its rejects are new
            clear_rejected(run)
        write_index_problems(run, problems)
        pairs = pair_datasets(cfg, palette, index, val_rows, run)
        return cached_datasets(cfg, pairs, cache, key, cls.target_key) if cfg.data.cache_latents else pairs

    @classmethod
    def _finish(cls, cfg: FinetuneConfig, run: Location, palette_name: str, started: float) -> dict[str, Any]:
        """Export the last checkpoint to ``RUN/model``; ``final.json`` from metrics.csv."""
        from training.finetune.data import rejected_counts
        from training.runlog import run_record

        ckpt = rundir.checkpoints(run)[-1]
        export_model(cls, cfg, ckpt, run / "model")
        rows = metric_rows(run)
        val = [r for r in rows if r.get("val_loss")]
        sps = sorted(float(r["steps_per_s"]) for r in rows if r.get("steps_per_s"))
        final = {"kind": cfg.kind, "final_step": json.loads(storage.read_text(ckpt / META_FILE))["step"],
                 "iterations": cfg.iterations, "model": str(run / "model"), "checkpoint": str(ckpt),
                 "val_loss_initial": float(val[0]["val_loss"]) if val and val[0]["step"] == "0" else None,
                 "val_loss_final": float(val[-1]["val_loss"]) if val else None,
                 "val_fidelity": float(val[-1]["val_fidelity"]) if val and val[-1].get("val_fidelity") else None,
                 "steps_per_s": sps[len(sps) // 2] if sps else None, "palette_name": palette_name,
                 "rejected": rejected_counts(run), **run_record(run), "wall_s": round(time.time() - started, 3)}
        rundir.write_json(run / "final.json", final)  # atomic: whole or absent
        log.info("%s done: step %d, held-out loss %s -> %s, model in %s", cfg.kind, final["final_step"],
                 final["val_loss_initial"], final["val_loss_final"], final["model"])
        return final


def store_frozen_in(comps: dict[str, Any], dtype: Any) -> int:
    """Cast every parameter that does not train (``requires_grad`` False) of the components to
    ``dtype``; the trained ones (a ControlNet, LoRA adapters, a fully trained UNet) keep float32
    master weights. Returns how many parameters were cast."""
    seen, cast = set(), 0
    for comp in comps.values():
        for p in getattr(comp, "parameters", lambda: [])():
            if id(p) in seen or p.requires_grad or p.dtype == dtype:
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def write_checkpoint(tmp: Path, weights: dict[str, Any], state: dict[str, Any], meta: dict[str, Any],
                     ema_weights: dict[str, Any] | None = None) -> None:
    """A checkpoint directory: trained (+ EMA) safetensors, train_state.pt, segfactory.json."""
    import torch
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    if ema_weights is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema_weights.items()}, str(tmp / EMA_FILE))
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def _out_meta(cfg: FinetuneConfig, index: Any, palette: Any, palette_name: str) -> dict[str, Any]:
    """What the exported folder's segfactory.json records (generation checks the palette)."""
    from actors.colormap import default_ignore_color

    return {"palette": palette.tolist(), "palette_name": palette_name, "classes": list(index.classes),
            "ignore_color": list(default_ignore_color(palette)), "family": cfg.resolved_family,
            "resolution": cfg.data.resolution, "base": cfg.model.local_path or cfg.model.id or f"{cfg.preset}-random"}


def export_model(recipe_cls: type[DenoisingRecipe], cfg: FinetuneConfig, ckpt: Location, out: Location) -> None:
    """Build the base on CPU, load the checkpoint's trained (EMA if any) weights, save the
    diffusers folder to ``out`` (a local path: replaced by a rename; a URI: copied up). Runs in
    the driver so DDP and FSDP runs export the same way."""
    import shutil

    from safetensors.torch import load_file

    from training.finetune.models import build_components

    recipe = recipe_cls(build_components(**build_kwargs(cfg), device="cpu"), cfg.resolved_family,
                        cfg.data.resolution, lora=cfg.lora, controlnet_path=cfg.model.controlnet_local_path)
    local = rundir.fetch_dir(ckpt)
    weights = local / (EMA_FILE if (local / EMA_FILE).is_file() else WEIGHTS_FILE)
    recipe.load_state_dict(recipe.module, load_file(str(weights)))
    meta = json.loads((local / META_FILE).read_text())
    if not out.is_local:
        with tempfile.TemporaryDirectory() as tmp:
            recipe.export(Path(tmp) / "model", meta)
            storage.remove_tree(out)
            rundir.upload_dir(Path(tmp) / "model", out)
        return
    path = Path(out.path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    recipe.export(tmp, meta)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
