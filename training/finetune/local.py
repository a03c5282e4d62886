"""The fine-tuning step in one process, without Ray: actor-level tests and the benchmark.

The same pieces as the Ray Train loop (:mod:`training.finetune.denoising`): pairs from
``make_pairs``, the caching pass's ``EncodeActor``, ``to_device``, ``denoising_loss``,
the configured optimizer and lr schedule — only the data comes from a numpy dict in memory.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from training.finetune.config import FinetuneConfig


def pairs_from_source(cfg: FinetuneConfig, split: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], Any, Any]:
    """(pairs, palette, index) of a source split, decoded (and captioned, when captions come
    from the captioner: the same gated captioner the Ray pass runs) in this process."""
    from pipelines.source_index import index_source
    from training.finetune.data import resolve_palette
    from training.finetune.pairs import (
        captioner_stage,
        make_pairs,
        pair_kwargs,
        split_rejected,
        uses_captioner,
    )

    index = index_source(cfg.source.path, cfg.source.format, split=split, classes=cfg.source.classes)
    rows = sorted(index.rows, key=lambda r: r["source_id"])[:limit]
    _, palette = resolve_palette(cfg, index)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    pairs = make_pairs(batch, **pair_kwargs(cfg, index, palette))
    if uses_captioner(cfg, rows):
        stage = captioner_stage(cfg)
        pairs = stage.fn(**stage.kwargs["fn_constructor_kwargs"])(pairs)
    return split_rejected(pairs, out=None, split=split), palette, index


def encode(cfg: FinetuneConfig, pairs: dict[str, np.ndarray], target_key: str) -> dict[str, np.ndarray]:
    """The caching pass on ``pairs`` (EncodeActor called directly)."""
    from training.finetune.data import build_kwargs
    from training.finetune.pairs import EncodeActor

    actor = EncodeActor(build_kwargs(cfg), cfg.resolved_family, target_key, cfg.data.flip, cfg.seed, device="cpu")
    return actor(pairs)


def train_steps(cfg: FinetuneConfig, recipe: Any, rows: dict[str, np.ndarray], steps: int,
                encoder: Any = None) -> dict[str, Any]:
    """``steps`` optimizer steps of ``recipe`` on ``rows`` (cached or pixels), batches drawn
    with a seeded permutation; returns losses and timing (steps/s after the first step)."""
    import torch

    from training.finetune.models import noise_scheduler
    from training.finetune.worker import (
        denoising_loss,
        make_lr_schedule,
        make_optimizer,
        optimizer_step,
        to_device,
    )

    torch.manual_seed(cfg.seed)
    scheduler = noise_scheduler(recipe.comps)
    params = recipe.parameters(recipe.module)
    opt = make_optimizer(cfg, params)
    sched = make_lr_schedule(cfg, opt)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    n, losses, t_first = len(rows["caption"]), [], None
    recipe.module.train()
    started = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(n, size=min(cfg.batch_size, n), replace=False)
        flips = rng.random(len(idx)) < 0.5 if cfg.data.flip else None
        batch = to_device({k: v[idx] for k, v in rows.items()}, torch.device("cpu"), flips, encoder,
                          recipe.target_key, gen)
        loss = denoising_loss(recipe, recipe.module, batch, scheduler, gen)
        loss.backward()
        optimizer_step(cfg, params, opt, sched)
        losses.append(float(loss.detach()))
        if step == 0:
            t_first = time.perf_counter()
    done = time.perf_counter()
    return {"losses": losses, "steps_per_s": (steps - 1) / max(1e-9, done - t_first) if steps > 1 else None,
            "wall_s": done - started}
