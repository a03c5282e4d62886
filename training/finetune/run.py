"""The driver side of ``segfactory finetune``: pairs, latent cache, TorchTrainer, export.

Run directory (``output.path``)::

    config.yaml            resolved config
    cache/{train,val}/     Parquet: latents (+ flipped), text embeddings, colour maps (cache_latents;
                           data.cache_path puts it elsewhere, a URI included)
    metrics.csv            step, loss, lr, timings, val_loss, val_fidelity (live)
    samples/step_*.png     validation sample grids
    checkpoint_NNNNNNN/    trained.safetensors (+ ema.safetensors), train_state.pt, segfactory.json
    model/                 the diffusers folder to point generation at (+ segfactory.json: palette)
    rejected/*.parquet     source rows that made no pair (unreadable file, no mask, no caption...),
                           in the dataset contract's rejected schema with their drop_reason
    final.json             loss before/after, throughput, rejected rows, where the model is

``source.path`` and ``data.cache_path`` may be URIs (s3://, gs://, ...: :mod:`core.storage`);
the run directory is local (its checkpoints, metrics and export are read back by the driver).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from core.config import ConfigError
from training.finetune.config import FinetuneConfig
from training.finetune.records import (
    build_kwargs,
    checkpoints,
    metric_rows,
    metrics_callback,
    rejected_counts,
    truncate_metrics,
    write_index_problems,
)
from training.finetune.worker import EMA_FILE, META_FILE, WEIGHTS_FILE, finetune_loop

log = logging.getLogger("segfactory.finetune")


def check_inputs(cfg: FinetuneConfig) -> None:
    if not cfg.output.path:
        raise ConfigError("output.path: required (the run directory)")
    if not cfg.source.path:
        raise ConfigError("source.path: required (the training pairs)")
    if cfg.source.format == "captions":
        raise ConfigError("source.format: captions has no masks or images to train on")
    if "://" in cfg.output.path and not cfg.output.path.startswith("file://"):
        raise ConfigError(f"output.path={cfg.output.path}: finetune writes a local run directory (checkpoints, "
                          "metrics.csv, model/); give a local or shared-file-system path")
    if cfg.workers.strategy == "fsdp" and (cfg.kind == "lora" or cfg.ema.enabled):
        raise ConfigError("workers.strategy: fsdp is for full fine-tuning without EMA (lora/ema use ddp)")


# --- data ---------------------------------------------------------------------------------


def resolve_palette(cfg: FinetuneConfig, index: Any) -> tuple[str, Any]:
    """The palette ``generate`` would use for this source and config (same resolution rule)."""
    from actors.colormap import palette_by_name

    name = cfg.palette or index.palette_hint or "auto"
    return name, palette_by_name(name, len(index.classes))


def train_rows(cfg: FinetuneConfig, index: Any) -> list[dict]:
    """The source rows the run trains on (stable order, ``source.limit``)."""
    return sorted(index.rows, key=lambda r: r["source_id"])[: cfg.source.limit or None]


def pair_datasets(cfg: FinetuneConfig, palette: Any, index: Any, val_rows: list[dict],
                  run_dir: Path | None = None) -> dict[str, Any]:
    """Ray Datasets of pairs (pixels): ``train`` and ``val``. Captions the configured way
    (generation's captioner pool where they come from the captioner); rows that make no pair
    go to ``run_dir/rejected/`` (only logged when ``run_dir`` is None) and the rest flow on."""
    import ray

    from training.finetune.pairs import (
        captioner_stage,
        make_pairs,
        pair_kwargs,
        split_rejected,
        uses_captioner,
    )

    rows = train_rows(cfg, index)
    kwargs = pair_kwargs(cfg, index, palette)
    cpu = {"batch_size": 8, "num_cpus": cfg.data.encode_num_cpus, "batch_format": "numpy"}
    out = {}
    for name, part in (("train", rows), ("val", val_rows)):
        ds = ray.data.from_items(part, override_num_blocks=max(1, min(len(part), 64)))
        ds = ds.map_batches(make_pairs, fn_kwargs=kwargs, **cpu)
        if uses_captioner(cfg, part):
            stage = captioner_stage(cfg)
            ds = ds.map_batches(stage.fn, **stage.kwargs)
        out[name] = ds.map_batches(split_rejected, fn_kwargs={"out": str(run_dir) if run_dir else None,
                                                              "split": name}, **cpu)
    return out


def cache_key(cfg: FinetuneConfig, palette: Any, target_key: str, captioned: bool = False) -> str:
    """What the cached latents depend on: base weights, source, pairs, flips, palette, seed
    (and the captioner's settings when ``captioned``: its captions enter the text embeddings)."""
    data = {"build": build_kwargs(cfg), "source": cfg.source.model_dump(), "captions": cfg.captions.model_dump(),
            "resolution": cfg.data.resolution, "flip": cfg.data.flip, "val": [cfg.data.val_split, cfg.data.val_count],
            "palette": palette.tolist(), "target": target_key}
    if captioned:
        data["captioner"] = cfg.captioner.model_dump(exclude={"resources"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg: FinetuneConfig, run_dir: Path) -> Any:
    """Where the latent cache lives (a :class:`core.storage.Location`): ``data.cache_path``
    (a local path or a URI every node reads, e.g. s3://) or ``RUN/cache``."""
    from core import storage

    return storage.resolve(cfg.data.cache_path or str(run_dir / "cache"), "data.cache_path")


def cache_current(root: Any, key: str) -> bool:
    """Whether the cache at ``root`` was made for ``key`` (its ``key.json``)."""
    from core import storage

    marker = root / "key.json"
    return storage.is_file(marker) and json.loads(storage.read_text(marker)).get("key") == key


def cached_datasets(cfg: FinetuneConfig, pairs: dict[str, Any], root: Any, key: str, target_key: str) -> dict[str, Any]:
    """Encode once with an actor pool (Ray Data ``map_batches``), write Parquet under ``root``
    (:func:`cache_root`; through its pyarrow file system, so a URI works), read it back.

    A cache whose ``key.json`` matches (same base, source, pairs) is reused as it is."""
    import ray

    from core import storage
    from training.finetune.pairs import EncodeActor

    if not cache_current(root, key):
        started = time.perf_counter()
        d = cfg.data
        for name, ds in pairs.items():
            enc = ds.map_batches(
                EncodeActor, batch_size=d.encode_batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.encode_actors),
                num_gpus=d.encode_num_gpus, num_cpus=d.encode_num_cpus,
                fn_constructor_kwargs={"build": build_kwargs(cfg), "family": cfg.resolved_family,
                                       "target_key": target_key, "flip": d.flip, "seed": cfg.seed})
            enc.write_parquet((root / name).path, filesystem=root.fs, mode="overwrite")
        storage.write_text(root / "key.json", json.dumps({"key": key, "encode_s": round(time.perf_counter() - started, 3)}))
        log.info("latent cache written to %s in %.1f s", root, time.perf_counter() - started)
    else:
        log.info("reusing the latent cache in %s", root)
    return {name: ray.data.read_parquet((root / name).path, filesystem=root.fs) for name in pairs}


# --- run ----------------------------------------------------------------------------------


def export_model(cfg: FinetuneConfig, ckpt: Path, out: Path) -> None:
    """Build the base on CPU, load the checkpoint's trained (EMA if any) weights, save the
    diffusers folder. Runs in the driver so DDP and FSDP runs export the same way."""
    from safetensors.torch import load_file

    from training.finetune.models import build_components
    from training.finetune.recipes import make_recipe

    comps = build_components(**build_kwargs(cfg), device="cpu")
    recipe = make_recipe(cfg.kind, comps, cfg.resolved_family, cfg.data.resolution, lora=cfg.lora,
                         controlnet_path=cfg.model.controlnet_local_path)
    weights = ckpt / (EMA_FILE if (ckpt / EMA_FILE).is_file() else WEIGHTS_FILE)
    recipe.load_state_dict(recipe.module, load_file(str(weights)))
    meta = json.loads((ckpt / META_FILE).read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    recipe.export(tmp, meta)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg`` in one TorchTrainer run; returns (and writes) ``final.json``."""
    from actors.colormap import default_ignore_color
    from core.runtime import init_ray
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError
    from training.finetune.pairs import uses_captioner
    from training.finetune.recipes import RECIPES

    check_inputs(cfg)
    if cfg.kind == "textual_inversion":  # AlignDiff: its own loop (masked loss, embeddings only)
        from training.finetune.textual_inversion import run_textual_inversion

        return run_textual_inversion(cfg)
    run_dir = Path(cfg.output.path).expanduser().resolve()
    started = time.time()
    existing = checkpoints(run_dir)
    if existing and not cfg.resume:
        raise ConfigError(f"output.path: {run_dir} already has checkpoints; pass resume=true (--resume) or a new output.path")
    try:
        index = index_source(cfg.source.path, cfg.source.format, split=cfg.source.split, classes=cfg.source.classes)
        problems = list(index.problems)
        try:
            held = index_source(cfg.source.path, cfg.source.format, split=cfg.data.val_split, classes=cfg.source.classes)
            val_rows = sorted(held.rows, key=lambda r: r["source_id"])[: cfg.data.val_count]
            problems += held.problems
        except SourceError:
            val_rows = []
    except SourceError as exc:
        raise ConfigError(f"source.path: {exc}") from None
    if not val_rows:  # no val split: hold out the last training rows
        rows = sorted(index.rows, key=lambda r: r["source_id"])
        index.rows, val_rows = rows[: -cfg.data.val_count], rows[-cfg.data.val_count:]
    if not index.rows:
        raise ConfigError(f"source.path: {cfg.source.path} has no training rows with masks")
    palette_name, palette = resolve_palette(cfg, index)
    captioned = uses_captioner(cfg, train_rows(cfg, index) + val_rows)
    if captioned and cfg.preset != "tiny" and not (cfg.captioner.model.id or cfg.captioner.model.local_path):
        raise ConfigError(f"captioner.model.id: required (or captioner.model.local_path): rows without a caption are "
                          f"captioned under preset {cfg.preset}; or set captions.source=template")
    init_ray(cfg.ray)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    target_key = RECIPES[cfg.kind].target_key
    key, cache = cache_key(cfg, palette, target_key, captioned), cache_root(cfg, run_dir)
    if not (cfg.data.cache_latents and cache_current(cache, key)):  # the pairs pass runs: its rejects are new
        shutil.rmtree(run_dir / "rejected", ignore_errors=True)
    write_index_problems(run_dir, problems)
    pairs = pair_datasets(cfg, palette, index, val_rows, run_dir)
    datasets = cached_datasets(cfg, pairs, cache, key, target_key) if cfg.data.cache_latents else pairs
    resume_from, step = None, 0
    if cfg.resume and existing:
        resume_from = existing[-1]
        step = json.loads((resume_from / META_FILE).read_text())["step"]
        log.info("resuming %s from %s (step %d)", run_dir, resume_from.name, step)
    truncate_metrics(run_dir / "metrics.csv", step if resume_from else -1)
    out_meta = {"palette": palette.tolist(), "palette_name": palette_name, "classes": list(index.classes),
                "ignore_color": list(default_ignore_color(palette)), "family": cfg.resolved_family,
                "resolution": cfg.data.resolution, "base": cfg.model.local_path or cfg.model.id or f"{cfg.preset}-random"}
    meta = {"run_dir": str(run_dir), "build": build_kwargs(cfg), "palette": palette.tolist(),
            "resume_from": str(resume_from) if resume_from else None, "out_meta": out_meta}
    trainer = make_trainer(cfg, {"cfg": cfg.model_dump(mode="json"), "meta": meta}, datasets, run_dir)
    log.info("fine-tuning %s (%s, %s) for %d steps x %d pairs x %d workers -> %s", cfg.kind, cfg.preset,
             cfg.resolved_family, cfg.iterations, cfg.batch_size * cfg.grad_accum, cfg.workers.num_workers, run_dir)
    trainer.fit()
    ckpt = checkpoints(run_dir)[-1]
    export_model(cfg, ckpt, run_dir / "model")
    rows = [r for r in metric_rows(run_dir / "metrics.csv") if r.get("val_loss")]
    sps = sorted(float(r["steps_per_s"]) for r in metric_rows(run_dir / "metrics.csv") if r.get("steps_per_s"))
    final = {"kind": cfg.kind, "final_step": json.loads((ckpt / META_FILE).read_text())["step"],
             "iterations": cfg.iterations, "model": str(run_dir / "model"), "checkpoint": str(ckpt),
             "val_loss_initial": float(rows[0]["val_loss"]) if rows and rows[0]["step"] == "0" else None,
             "val_loss_final": float(rows[-1]["val_loss"]) if rows else None,
             "val_fidelity": float(rows[-1]["val_fidelity"]) if rows and rows[-1].get("val_fidelity") else None,
             "steps_per_s": sps[len(sps) // 2] if sps else None, "palette_name": palette_name,
             "rejected": rejected_counts(run_dir),
             "restarts": len(list(run_dir.glob(".failed_at_*"))), "wall_s": round(time.time() - started, 3)}
    tmp = run_dir / "final.json.tmp"
    tmp.write_text(json.dumps(final, indent=1))
    tmp.replace(run_dir / "final.json")
    log.info("%s done: step %d, held-out loss %s -> %s, model in %s", cfg.kind, final["final_step"],
             final["val_loss_initial"], final["val_loss_final"], final["model"])
    return final


def make_trainer(cfg: FinetuneConfig, loop_config: dict[str, Any], datasets: dict[str, Any], run_dir: Path):
    """TorchTrainer with fractional worker CPUs, FailureConfig and checkpoints in ``run_dir``;
    ``train`` is split across workers, ``val`` is given whole to each."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    w = cfg.workers
    resources = {"CPU": w.cpus_per_worker, **({"GPU": 1} if w.use_gpu else {})}
    return TorchTrainer(
        finetune_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
                             callbacks=[metrics_callback(run_dir)]),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))
