"""The driver side of ``segfactory finetune``: check the config, then the recipe's driver.

``kind`` picks the recipe in :data:`training.finetune.recipes.RECIPES` (textual inversion
included); its ``run`` prepares the data, trains on Ray Train and writes the run directory.

Run directory (``output.path``: a local path or a URI such as ``s3://bucket/runs/x``, see
:mod:`training.rundir`)::

    config.yaml            resolved config
    cache/{train,val}/     Parquet: latents (+ flipped), text embeddings, colour maps (cache_latents;
                           data.cache_path puts it elsewhere, a URI included)
    metrics.csv            step, loss, lr, timings, val_loss, val_fidelity (live)
    tb/                    TensorBoard event files (the same metrics)
    events.jsonl           failures Ray Train reported, resumes, failed fits (training.runlog)
    samples/step_*.png     validation sample grids
    checkpoint_NNNNNNN/    trained.safetensors (+ ema.safetensors), train_state.pt, segfactory.json
                           (textual inversion: bank.safetensors, losses.json, train_state.pt)
    model/                 the diffusers folder to point generation at (+ segfactory.json: palette)
    bank.safetensors       textual inversion's embedding bank (textual_inversion.bank_name)
    rejected/*.parquet     source rows that made no pair (unreadable file, no mask, no caption...),
                           in the dataset contract's rejected schema with their drop_reason
    final.json             loss before/after, throughput, rejected rows, failures / restarts /
                           resumes, where the model is
"""

from __future__ import annotations

import logging
from typing import Any

from core.config import ConfigError
from training.finetune.config import FinetuneConfig
from training.rundir import writable

log = logging.getLogger("segfactory.finetune")


def check_inputs(cfg: FinetuneConfig) -> None:
    """Config combinations a field validator cannot see; raises ConfigError naming the key."""
    if not cfg.output.path:
        raise ConfigError("output.path: required (the run directory)")
    if not cfg.source.path:
        raise ConfigError("source.path: required (the training pairs)")
    if cfg.source.format == "captions":
        raise ConfigError("source.format: captions has no masks or images to train on")
    if cfg.workers.strategy == "fsdp" and (cfg.kind == "lora" or cfg.ema.enabled):
        raise ConfigError("workers.strategy: fsdp is for full fine-tuning without EMA (lora/ema use ddp)")
    writable(cfg.output.path, "output.path")  # a missing bucket: one line before Ray starts


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` with its recipe; returns (and writes) ``final.json``."""
    from training.finetune.recipes import recipe_class

    check_inputs(cfg)
    return recipe_class(cfg.kind).run(cfg)
