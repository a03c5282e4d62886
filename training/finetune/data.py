"""The driver's data for ``segfactory finetune``: the source rows (train and held-out), the
palette, Ray Datasets of pairs, the latent cache, and the rejected rows of the source.

Every path may be a URI (:mod:`core.storage`): the source, ``data.cache_path`` and the run
directory, whose ``rejected/`` and ``cache/`` are written through its file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from core import storage
from core.config import ConfigError
from core.storage import Location
from training.finetune.config import FinetuneConfig
from training.rundir import locate

log = logging.getLogger("segfactory.finetune")

RunDir = str | os.PathLike | Location


def build_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Arguments of ``models.build_components`` (the same base for the cache and the workers)."""
    return {"preset": cfg.preset, "family": cfg.resolved_family, "model_id": cfg.model.id,
            "revision": cfg.model.revision, "local_path": cfg.model.local_path, "seed": cfg.seed}


def index_rows(cfg: FinetuneConfig) -> tuple[Any, list[dict], list[tuple[str, str, str]]]:
    """(index of the training split, held-out rows, index problems). Held out: the
    ``data.val_split`` split's first ``data.val_count`` rows, else the last training rows."""
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError

    def split(name: str):
        return index_source(cfg.source.path, cfg.source.format, split=name, classes=cfg.source.classes)

    try:
        index = split(cfg.source.split)
        problems, val_rows = list(index.problems), []
        try:
            held = split(cfg.data.val_split)
            val_rows = sorted(held.rows, key=lambda r: r["source_id"])[: cfg.data.val_count]
            problems += held.problems
        except SourceError:
            pass
    except SourceError as exc:
        raise ConfigError(f"source.path: {exc}") from None
    if not val_rows:  # no val split: hold out the last training rows
        rows = sorted(index.rows, key=lambda r: r["source_id"])
        index.rows, val_rows = rows[: -cfg.data.val_count], rows[-cfg.data.val_count:]
    if not index.rows:
        raise ConfigError(f"source.path: {cfg.source.path} has no training rows with masks")
    return index, val_rows, problems


def resolve_palette(cfg: FinetuneConfig, index: Any) -> tuple[str, Any]:
    """The palette ``generate`` would use for this source and config (same resolution rule)."""
    from actors.colormap import palette_by_name

    name = cfg.palette or index.palette_hint or "auto"
    return name, palette_by_name(name, len(index.classes))


def train_rows(cfg: FinetuneConfig, index: Any) -> list[dict]:
    """The source rows the run trains on (stable order, ``source.limit``)."""
    return sorted(index.rows, key=lambda r: r["source_id"])[: cfg.source.limit or None]


def pair_datasets(cfg: FinetuneConfig, palette: Any, index: Any, val_rows: list[dict],
                  run_dir: RunDir | None = None) -> dict[str, Any]:
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
    out_uri = locate(run_dir).uri if run_dir is not None else None
    out = {}
    for name, part in (("train", rows), ("val", val_rows)):
        ds = ray.data.from_items(part, override_num_blocks=max(1, min(len(part), 64)))
        ds = ds.map_batches(make_pairs, fn_kwargs=kwargs, **cpu)
        if uses_captioner(cfg, part):
            stage = captioner_stage(cfg)
            ds = ds.map_batches(stage.fn, **stage.kwargs)
        out[name] = ds.map_batches(split_rejected, fn_kwargs={"out": out_uri, "split": name}, **cpu)
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


def cache_root(cfg: FinetuneConfig, run_dir: RunDir) -> Location:
    """Where the latent cache lives: ``data.cache_path`` (a local path or a URI every node
    reads, e.g. s3://) or ``RUN/cache``."""
    if cfg.data.cache_path:
        return storage.resolve(cfg.data.cache_path, "data.cache_path")
    return locate(run_dir) / "cache"


def cache_current(root: Location, key: str) -> bool:
    """Whether the cache at ``root`` was made for ``key`` (its ``key.json``)."""
    marker = root / "key.json"
    return storage.is_file(marker) and json.loads(storage.read_text(marker)).get("key") == key


def cached_datasets(cfg: FinetuneConfig, pairs: dict[str, Any], root: Location, key: str, target_key: str) -> dict[str, Any]:
    """Encode once with an actor pool (Ray Data ``map_batches``), write Parquet under ``root``
    (:func:`cache_root`; through its pyarrow file system, so a URI works), read it back.

    A cache whose ``key.json`` matches (same base, source, pairs) is reused as it is."""
    import ray

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


# --- rejected rows ---------------------------------------------------------------------------


def clear_rejected(run_dir: RunDir) -> None:
    """Remove ``RUN/rejected/`` (a pass that runs again writes its rejected rows anew)."""
    storage.remove_tree(locate(run_dir) / "rejected")


def write_index_problems(run_dir: RunDir, problems: list[tuple[str, str, str]]) -> None:
    """Rows the source index could not use (no mask, duplicate id, bad captions.jsonl line) go
    to ``rejected/`` too, as ``generate`` does."""
    from training.finetune.pairs import METHOD, rejected_table

    path = locate(run_dir) / "rejected" / f"part-{METHOD}-index.parquet"
    if not problems:
        storage.remove(path)
        return
    storage.write_parquet(rejected_table([{"source_id": sid, "source_path": where, "drop_reason": reason}
                                          for sid, where, reason in problems]), path)


def rejected_counts(run_dir: RunDir) -> dict[str, int]:
    """Rejected source rows per reason code (a row written twice counts once)."""
    import pyarrow.parquet as pq

    from pipelines.writer import drop_code

    folder = locate(run_dir) / "rejected"
    seen = {}
    for f in storage.listdir(folder, ".parquet"):
        t = pq.read_table(f.path, filesystem=f.fs, columns=["source_id", "source_path", "drop_reason"])
        for sid, where, reason in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            seen[(sid, where)] = drop_code(reason)
    counts: dict[str, int] = {}
    for code in seen.values():
        counts[code] = counts.get(code, 0) + 1
    return counts
