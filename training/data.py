"""Ray Data ingest for training: the real, synthetic, live and val streams, and the mixer.

Every stream is built on the driver as a lazy Ray Data Dataset sized for the whole budget
(whole epochs, each in its own order), handed to the TorchTrainer, split across workers with
``streaming_split`` and iterated once — no per-epoch barriers between workers, nothing
loaded whole (except a small synthetic subset read for several epochs, kept after one read). Decoding and augmentation run in ``map_batches`` tasks
(:func:`training.transforms.transform_batch`); the worker only mixes ready batches
(:class:`Mixer`) and moves them to its device.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import schema as S
from pipelines.config import ConfigError
from training.config import TrainConfig
from training.transforms import SYNTHETIC, transform_batch

log = logging.getLogger(__name__)

_INDEX_KEYS = (S.SOURCE_ID, S.SOURCE_PATH, S.SOURCE_MASK_PATH, "source_row")


@dataclass
class Sources:
    """What the driver learned about the inputs (indexes only; no pixels)."""

    classes: list[str]
    real_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    synthetic_files: list[str] = field(default_factory=list)
    synthetic_rows: int = 0  # rows per synthetic epoch (all files, or synthetic.volume)
    synthetic_files_rows: int = 0  # rows in all synthetic files
    synthetic_threshold: int | None = None  # subset key bound when synthetic.volume is set


def _manifest_classes(path) -> list[str] | None:
    from pipelines import storage

    mpath = path / "manifest.json"
    if not storage.is_file(mpath):
        return None
    classes = json.loads(storage.read_text(mpath)).get("classes") or []
    return [c["name"] if isinstance(c, dict) else str(c) for c in classes] or None


def index_inputs(cfg: TrainConfig) -> Sources:
    """Index the real train/val splits and the synthetic shards; check their classes agree."""
    import pyarrow.parquet as pq

    from pipelines.sources import SourceError, index_source

    real = cfg.real
    if not real.path:
        raise ConfigError("real.path: required (the val split is always real)")
    try:
        train = index_source(real.path, real.format, split=real.split, classes=real.classes)
        val = index_source(real.path, real.format, split=real.val_split, classes=real.classes)
    except SourceError as e:
        raise ConfigError(f"real.path: {e}") from None
    keep = lambda rows: [{k: r[k] for k in _INDEX_KEYS} for r in sorted(rows, key=lambda r: r[S.SOURCE_ID])]  # noqa: E731
    rows = keep(train.rows)[: real.limit] if real.limit else keep(train.rows)
    if not rows and cfg.strategy != "synthetic_only":
        raise ConfigError(f"real.path: no labelled rows in split {real.split!r} of {real.path}")
    if not val.rows:
        raise ConfigError(f"real.val_split: no labelled rows in split {real.val_split!r} of {real.path}")
    out = Sources(list(train.classes), rows, keep(val.rows))
    from pipelines import storage

    for i, p in enumerate(cfg.synthetic.paths):
        try:  # a local path or a URI; files are kept as the strings Ray Data and pyarrow resolve
            path = storage.resolve(p, f"synthetic.paths[{i}]")
            files = storage.listdir(path / "shards" if storage.is_dir(path / "shards") else path, ".parquet")
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
        if not files:
            raise ConfigError(f"synthetic.paths[{i}]: no parquet shards under {path}")
        theirs = _manifest_classes(path)
        if theirs is not None and theirs != out.classes:
            raise ConfigError(f"synthetic.paths[{i}]: classes {theirs} differ from the real dataset's {out.classes}")
        out.synthetic_files += [f.uri for f in files]
        out.synthetic_rows += sum(pq.ParquetFile(f.path, filesystem=f.fs).metadata.num_rows for f in files)
    out.synthetic_files_rows = out.synthetic_rows
    if cfg.synthetic.paths and out.synthetic_rows == 0:
        raise ConfigError("synthetic.paths: the synthetic datasets have no rows")
    volume = cfg.synthetic.volume
    if volume is not None and out.synthetic_files:
        from training.subsets import read_sample_ids, volume_threshold

        if volume > out.synthetic_rows:
            raise ConfigError(f"synthetic.volume: {volume} exceeds the {out.synthetic_rows} samples in "
                              f"synthetic.paths ({volume - out.synthetic_rows} missing)")
        out.synthetic_threshold = volume_threshold(read_sample_ids(out.synthetic_files), volume)
        out.synthetic_rows = volume
    return out


def _map(ds, cfg: TrainConfig, classes: list[str], **kwargs):
    from training.ingest_idle import sleep_when_idle

    return sleep_when_idle(ds, cfg.data.idle_sleep_s).map_batches(
        transform_batch, batch_size=cfg.data.transform_batch_size, num_cpus=cfg.data.num_cpus,
        batch_format="numpy",
        fn_kwargs={"aug": cfg.aug.model_dump(), "num_classes": len(classes), **kwargs})


def _blocks(n: int, cfg: TrainConfig) -> int:
    return max(1, min(2000, math.ceil(n / cfg.data.transform_batch_size)))


def real_stream(cfg: TrainConfig, src: Sources, n_rows: int, start_epoch: int = 0):
    """Real training rows for ``n_rows`` samples: whole epochs from ``start_epoch``, each
    permuted with its own seed, decoded and augmented in map_batches."""
    import ray

    n = len(src.real_rows)
    items: list[dict[str, Any]] = []
    for e in range(start_epoch, start_epoch + max(1, math.ceil(n_rows / n))):
        perm = np.random.default_rng((cfg.seed, 1, e)).permutation(n)
        items += [src.real_rows[i] for i in perm]
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items), cfg))
    return _map(ds, cfg, src.classes, source="index", train=True, fmt=cfg.real.format)


# Read blocks of a few MB instead of whole shard files: decode/augment then runs as many small
# tasks that stream, not one task per file (measured: a 4000-row toy epoch 21 s -> 15 s).
READ_BLOCK_BYTES = 4 * 1024 * 1024


# A subset read for several epochs is read once and kept in the object store when it is at
# most this big (a small volume of a big dataset would otherwise re-read all of it per epoch).
CACHE_SUBSET_BYTES = 2 * 1024**3


def synthetic_stream(cfg: TrainConfig, src: Sources, n_rows: int):
    """Synthetic rows for ``n_rows`` samples, split across the workers like the real stream.

    Whole epochs of ``ray.data.read_parquet`` (file order shuffled per epoch, rows further by
    the local buffer), only the ``synthetic.volume`` subset. A budget smaller than one epoch
    keeps a uniform seeded sample of it (no decoding of rows it never reaches, and no bias to
    the first files); a subset needed for several epochs and small enough is read once and
    kept in the object store. One execution for the whole budget: a new execution per epoch
    costs seconds of start-up, and run inside a worker it competes with training."""
    import ray

    from training.subsets import keep_rows

    draw = min(1.0, n_rows / max(src.synthetic_rows, 1))
    reps = max(1, math.ceil(n_rows / max(src.synthetic_rows, 1)))

    def epoch():
        ds = ray.data.read_parquet(src.synthetic_files, shuffle="files").select_columns([S.SAMPLE_ID, S.IMAGE, S.MASK])
        ds.context.target_max_block_size = READ_BLOCK_BYTES
        if src.synthetic_threshold is not None or draw < 1:
            ds = ds.map_batches(keep_rows, batch_format="numpy", num_cpus=cfg.data.num_cpus,
                                fn_kwargs={"threshold": src.synthetic_threshold, "draw_seed": cfg.seed,
                                           "draw_fraction": draw})
        return ds.select_columns([S.IMAGE, S.MASK])

    from pipelines import storage

    subset_bytes = sum(storage.size(storage.resolve_file(f)) for f in src.synthetic_files) * src.synthetic_rows / src.synthetic_files_rows
    if reps > 1 and src.synthetic_threshold is not None and subset_bytes <= CACHE_SUBSET_BYTES:
        cached = _read_subset(src, cfg.data.transform_batch_size * 4)
        epochs = [cached.randomize_block_order() for _ in range(reps)]
    else:
        epochs = [epoch() for _ in range(reps)]
    ds = epochs[0].union(*epochs[1:]) if reps > 1 else epochs[0]
    return _map(ds, cfg, src.classes, source="bytes", train=True, synthetic=True)


def _read_subset(src: Sources, rows_per_block: int):
    """The ``synthetic.volume`` subset read with pyarrow into the object store, in small blocks
    (a few hundred ms for the toy, where a Ray Data read of every file took ~10 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from training.subsets import subset_key

    parts = []
    for f in src.synthetic_files:
        table = pq.read_table(f, columns=[S.SAMPLE_ID, S.IMAGE, S.MASK])
        keep = [subset_key(s) <= src.synthetic_threshold for s in table.column(S.SAMPLE_ID).to_pylist()]
        parts.append(table.filter(pa.array(keep)).select([S.IMAGE, S.MASK]))
    table = pa.concat_tables(parts).combine_chunks()
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])


def live_stream(cfg: TrainConfig, src: Sources, n_rows: int):
    """The generation graph's Dataset, unmaterialised: samples are made while the model
    trains. Source rows are cycled until the graph yields ~``n_rows`` samples."""
    from pipelines.config import GenerateConfig, load_config
    from pipelines.generate import index_rows, resolve_context
    from pipelines.graphs import stage_plan
    from pipelines.graphs.base import build_dataset

    live = cfg.synthetic.live
    gcfg = load_config(GenerateConfig, _find(live.config), [
        f"source.path={cfg.real.path}", f"source.format={cfg.real.format}", f"source.split={cfg.real.split}",
        # the resource split: model actors and CPU tasks get fractions, so training (its workers'
        # reserved CPUs) and generation both keep running on a small machine
        f"text2mask.resources.num_cpus={live.actor_cpus}", f"mask2img.resources.num_cpus={live.actor_cpus}",
        f"cpu.num_cpus={live.task_cpus}", *live.overrides])
    index, rows = index_rows(gcfg)
    ctx = resolve_context(gcfg, index)
    if ctx.classes != src.classes:
        raise ConfigError(f"synthetic.live: generated classes {ctx.classes} differ from the real dataset's {src.classes}")
    plan = stage_plan(gcfg, ctx, gcfg.source.format)
    per_row = _copies_per_row(plan)
    if not rows or per_row == 0:
        raise ConfigError("synthetic.live: the generation config yields no samples")
    rows = [dict(rows[i % len(rows)]) for i in range(math.ceil(n_rows / per_row))]
    ds = build_dataset(rows, plan)
    return _map(ds, cfg, src.classes, source="bytes", train=True, synthetic=True)


def _find(path: str) -> str:
    """A generation config path as given, else relative to the project root."""
    p = Path(path)
    if not p.is_file() and (Path(__file__).resolve().parents[1] / p).is_file():
        return str(Path(__file__).resolve().parents[1] / p)
    return path


def _copies_per_row(plan) -> int:
    """Samples the graph makes per source row (its expand stage's copies)."""
    for stage in plan:
        copies = stage.kwargs.get("fn_kwargs", {}).get("copies")
        if isinstance(copies, dict):
            return sum(int(v) for v in copies.values())
        if isinstance(copies, int):
            return copies
    return 1


def val_dataset(cfg: TrainConfig, src: Sources):
    """Real val rows, eval-resized (no augmentation)."""
    import ray

    ds = ray.data.from_items(src.val_rows, override_num_blocks=_blocks(len(src.val_rows), cfg))
    return _map(ds, cfg, src.classes, source="index", train=False, fmt=cfg.real.format)


def build_datasets(cfg: TrainConfig, src: Sources, need: dict[str, int], consumed: dict[str, int]) -> dict[str, Any]:
    """The Datasets handed to the TorchTrainer; ``need`` = rows each stream ("real",
    "synthetic") must still supply (0: the stream is left out).

    Every stream is a single pass sized for the budget and split across workers (a resumed
    run starts ``real`` at the epoch its consumed-row count reached)."""
    out: dict[str, Any] = {"val": val_dataset(cfg, src)}
    if need.get("real"):
        out["real"] = real_stream(cfg, src, need["real"], consumed.get("real", 0) // max(1, len(src.real_rows)))
    if need.get("synthetic"):
        if cfg.synthetic.live is not None:
            out["synthetic"] = live_stream(cfg, src, need["synthetic"])
        else:
            out["synthetic"] = synthetic_stream(cfg, src, need["synthetic"])
    return out


def split_names(datasets: dict[str, Any]) -> list[str]:
    """Datasets split across workers: all of them."""
    return list(datasets)


class StreamExhausted(RuntimeError):
    """A training stream ended before the budget did (raise data.margin)."""


class Mixer:
    """Fixed-size batches where each slot holds a synthetic sample with probability ``p``.

    SegGen's p_aug (Diffusion Synthesis' alpha): every real training sample is replaced by a
    synthetic one with probability p, drawn independently per slot. ``streams`` maps
    "real"/"synthetic" to iterators of column batches (torch tensors or numpy arrays);
    rows are taken from each as needed, so neither stream is consumed faster than its share.
    """

    def __init__(self, streams: dict[str, Iterator[dict[str, Any]]], p: float, batch_size: int, seed: Any = 0):
        self.streams, self.p, self.batch_size = streams, p, batch_size
        self.rng = np.random.default_rng(seed)
        self.pending: dict[str, tuple[dict[str, Any], int] | None] = {k: None for k in streams}
        self.taken = {k: 0 for k in streams}

    def _take(self, name: str, k: int) -> list[dict[str, Any]]:
        chunks, need = [], k
        while need:
            cur = self.pending[name]
            if cur is None or cur[1] >= len(cur[0][SYNTHETIC]):
                try:
                    cur = (next(self.streams[name]), 0)
                except StopIteration:
                    raise StreamExhausted(f"{name} stream ended after {self.taken[name]} rows; raise data.margin") from None
            batch, off = cur
            n = min(need, len(batch[SYNTHETIC]) - off)
            chunks.append({c: v[off:off + n] for c, v in batch.items()})
            self.pending[name] = (batch, off + n)
            need -= n
        self.taken[name] += k
        return chunks

    def __iter__(self) -> Mixer:
        return self

    def __next__(self) -> dict[str, Any]:
        n_syn = int((self.rng.random(self.batch_size) < self.p).sum()) if 0 < self.p < 1 else round(self.p) * self.batch_size
        chunks = []
        if self.batch_size - n_syn:
            chunks += self._take("real", self.batch_size - n_syn)
        if n_syn:
            chunks += self._take("synthetic", n_syn)
        return {c: _cat([ch[c] for ch in chunks]) for c in chunks[0]}


def _cat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)
