"""Ray Data ingest for training: the real, synthetic, live and val streams, and the mixer.

Every stream is built on the driver as a lazy Ray Data Dataset sized for the whole budget
(whole epochs, each in its own order: :mod:`training.epochs`, a plan of the same few operators
for one epoch or a thousand), handed to the TorchTrainer, split across workers with
``streaming_split`` and iterated once — no per-epoch barriers between workers, nothing
loaded whole, no image bytes on the driver. Decoding and augmentation run in ``map_batches`` tasks
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

from core import schema as S
from core.config import ConfigError
from training.config import TrainConfig
from training.epochs import POSITION, real_span, resume_from, span_positions, spans, synthetic_span
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
    # (file, row group, row positions) per unit (a row group, or a piece of an oversized one) of one synthetic epoch
    synthetic_chunks: list[tuple[str, int, Any]] = field(default_factory=list)


def _manifest_classes(path) -> list[str] | None:
    from core import storage

    mpath = storage.resolve(path) / "manifest.json"
    if not storage.is_file(mpath):
        return None
    classes = json.loads(storage.read_text(mpath)).get("classes") or []
    return [c["name"] if isinstance(c, dict) else str(c) for c in classes] or None


def _shard_files(path: str, what: str = "synthetic.paths") -> list[str]:
    """The Parquet shards of a synthetic dataset (a local path or a URI): files as the strings
    the readers resolve again (``core.storage.resolve_file``). A generated dataset's are the ones
    its commit records name (a stopped run's uncommitted files are never read)."""
    from core import storage
    from pipelines.commits import shard_files_to_read

    try:
        loc = storage.resolve(path, what)
        # a folder of bare Parquet files (no shards/) is read as it is
        files = shard_files_to_read(loc) if storage.is_dir(loc / "shards") else storage.listdir(loc, ".parquet")
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None
    return sorted(f.uri for f in files)


def index_inputs(cfg: TrainConfig) -> Sources:
    """Index the real train/val splits and the synthetic shards; check their classes agree."""
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError

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
    for i, p in enumerate(cfg.synthetic.paths):
        files = _shard_files(p, f"synthetic.paths[{i}]")
        if not files:
            raise ConfigError(f"synthetic.paths[{i}]: no parquet shards under {p}")
        theirs = _manifest_classes(p)
        if theirs is not None and theirs != out.classes:
            raise ConfigError(f"synthetic.paths[{i}]: classes {theirs} differ from the real dataset's {out.classes}")
        out.synthetic_files += files
    if out.synthetic_files:
        from training.epochs import plan_chunks

        every, out.synthetic_files_rows = plan_chunks(out.synthetic_files, cap=cfg.data.row_group_cap)
        if out.synthetic_files_rows == 0:
            raise ConfigError("synthetic.paths: the synthetic datasets have no rows")
        volume = cfg.synthetic.volume
        if volume is not None and volume > out.synthetic_files_rows:
            raise ConfigError(f"synthetic.volume: {volume} exceeds the {out.synthetic_files_rows} samples in "
                              f"synthetic.paths ({volume - out.synthetic_files_rows} missing)")
        out.synthetic_chunks, out.synthetic_rows = ((every, out.synthetic_files_rows) if volume is None else
                                                    plan_chunks(out.synthetic_files, volume, cfg.data.row_group_cap, warn=False))
    return out


def _transform_kwargs(cfg: TrainConfig, classes: list[str], **kwargs) -> dict[str, Any]:
    return {"aug": cfg.aug.model_dump(), "num_classes": len(classes), **kwargs}


def _map(ds, cfg: TrainConfig, classes: list[str], **kwargs):
    from training.ingest_idle import sleep_when_idle

    return sleep_when_idle(ds, cfg.data.idle_sleep_s).map_batches(
        transform_batch, batch_size=cfg.data.transform_batch_size, num_cpus=cfg.data.num_cpus,
        batch_format="numpy", fn_kwargs=_transform_kwargs(cfg, classes, **kwargs))


def _blocks(n: int, cfg: TrainConfig) -> int:
    return max(1, min(2000, math.ceil(n / cfg.data.transform_batch_size)))


SPANS = 2000  # most map tasks a training stream is cut into (each costs a ray.put when it is built)


def _budget(n_rows: int, per_task: float, start: int = 0):
    """The input of a training stream: budget positions ``start .. n_rows`` as spans
    (``from_items``, one span per block, so one map task each): the plan is the same few
    operators for one epoch or a thousand (no union of per-epoch reads), and each span
    ~``per_task`` rows, at most :data:`SPANS` of them.

    Not ``ray.data.range``: its read operator runs before the maps that make batches, and in
    Ray 2.60 an operator gets no CPU budget while the one before it still runs. Measured in a
    160k-step toy run: ~2,000 range reads, one at a time, ~25 ms each, and the first batch
    waited ~50 s behind them. Spans are in the object store when execution starts, so the
    decode/augment tasks run at once."""
    import ray

    items = spans(n_rows, min(SPANS, max(1, math.ceil((n_rows - start) / max(per_task, 1.0)))), start)
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _table_ref(obj):
    import ray

    return ray.put(obj)


def _span_map(ds, cfg: TrainConfig, fn, **fn_kwargs):
    """One span per task (``batch_size=1``), its transform batches yielded as they are made."""
    from training.ingest_idle import sleep_when_idle

    return sleep_when_idle(ds, cfg.data.idle_sleep_s).map_batches(
        fn, batch_size=1, batch_format="numpy", num_cpus=cfg.data.num_cpus, fn_kwargs=fn_kwargs)


@dataclass
class StreamSpec:
    """What a rank needs to build its own training stream (:func:`rank_stream`): object refs
    and numbers, built once on the driver and handed to every worker."""

    name: str  # "real" | "synthetic"
    per_rank: int  # local positions each rank's stream covers: rows (real) or windows (synthetic)
    per_task: float  # local positions per map task
    fn_kwargs: dict[str, Any]  # of real_span / synthetic_span, less rank, world and skip

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"


def real_spec(cfg: TrainConfig, src: Sources, n_rows: int, world: int) -> StreamSpec:
    """Real training rows for ``n_rows`` samples over all ranks: epochs each permuted with its
    own seed (:mod:`training.epochs`), decoded and augmented in map_batches. The driver holds
    the index once (in the object store), never a list as long as the budget."""
    n = len(src.real_rows)
    columns = {k: np.array([r[k] for r in src.real_rows], dtype=object) for k in _INDEX_KEYS}
    alpha = cfg.p_aug if cfg.strategy == "mix" and cfg.mix.mode == "variant" else 0.0
    if alpha:  # Diffusion Synthesis: each row carries its own variants (training.variants)
        from training.variants import attach_variants

        columns = attach_variants(columns, src.synthetic_files)
    tbs = cfg.data.transform_batch_size
    return StreamSpec("real", math.ceil(n_rows / world), tbs, dict(
        pick={"n": n, "seed": cfg.seed, "salt": 1}, rows_ref=_table_ref(columns), seed=cfg.seed, rows_per_batch=tbs,
        transform=_transform_kwargs(cfg, src.classes, source="index", train=True, fmt=cfg.real.format,
                                    variant_alpha=alpha)))


def synthetic_spec(cfg: TrainConfig, src: Sources, n_rows: int, world: int) -> StreamSpec:
    """Synthetic rows for ``n_rows`` samples over all ranks, read a window of row groups at a
    time and interleaved (:mod:`training.epochs`); bytes are read in the map tasks, never on the
    driver. The units are one epoch's row groups (only the ``synthetic.volume`` subset's rows)
    in a new seeded order each epoch. A budget smaller than one epoch keeps a uniform seeded
    sample of every unit (no decoding of rows it never reaches, and no bias to the first files)."""
    chunks = src.synthetic_chunks
    per_epoch = max(1, src.synthetic_rows)
    draw = min(1.0, n_rows / per_epoch)
    window = cfg.data.window_units
    rows_per_window = max(1e-9, window * per_epoch / len(chunks) * draw)
    # +1: a rank's last window may be cut by a resume, and windows differ in size
    windows = math.ceil(math.ceil(n_rows / world) / rows_per_window) + 1
    return StreamSpec("synthetic", windows, 1, dict(
        pick={"n": len(chunks), "seed": cfg.seed, "salt": 2}, window_units=window, chunks_ref=_table_ref(chunks),
        seed=cfg.seed, draw_fraction=draw, draw_seed=cfg.seed, rows_per_batch=cfg.data.transform_batch_size,
        transform=_transform_kwargs(cfg, src.classes, source="bytes", train=True, synthetic=True)))


def rank_stream(spec: StreamSpec, cfg: TrainConfig, rank: int, world: int, after: int = -1):
    """Rank ``rank``'s stream (a lazy Dataset, order preserved): its local positions from just
    after ``after`` (a row's :data:`training.epochs.POSITION`; -1 = the start) to the end."""
    start, skip = resume_from(after, spec.synthetic)
    ds = _budget(spec.per_rank, spec.per_task, start)
    ds.context.execution_options.preserve_order = True  # the sequence is the rank's, in order
    fn = synthetic_span if spec.synthetic else real_span
    extra = {"skip": (start, skip)} if spec.synthetic else {}
    return _span_map(ds, cfg, fn, rank=rank, world=world, **extra, **spec.fn_kwargs)


def live_stream(cfg: TrainConfig, src: Sources, n_rows: int):
    """The generation graph's Dataset, unmaterialised: samples are made while the model
    trains. Source rows are cycled until the graph yields ~``n_rows`` samples."""
    from core.config import load_config
    from pipelines.config import GenerateConfig
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
    if not rows.num_rows or per_row == 0:
        raise ConfigError("synthetic.live: the generation config yields no samples")
    # positions 0..k-1 cycle over the index rows, looked up in the map tasks (~200 spans)
    copies = math.ceil(n_rows / per_row)
    positions = _budget(copies, per_task=max(1.0, copies / 200))
    ds = build_dataset(positions.map_batches(cycle_rows, batch_size=1, batch_format="numpy",
                                             fn_kwargs={"rows_ref": _table_ref(rows)}), plan)
    return _map(ds, cfg, src.classes, source="bytes", train=True, synthetic=True)


def cycle_rows(batch: dict[str, np.ndarray], *, rows_ref) -> Any:
    """map_batches (one span per call): positions p → index rows ``p % n`` (an Arrow table)."""
    import pyarrow as pa
    import ray

    rows = ray.get(rows_ref)
    return rows.take(pa.array(span_positions(batch) % rows.num_rows))


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


def build_datasets(cfg: TrainConfig, src: Sources, need: dict[str, int], world: int = 1
                   ) -> tuple[dict[str, Any], dict[str, StreamSpec]]:
    """(the Datasets handed to the TorchTrainer, the specs of the streams each rank builds
    itself); ``need`` = rows each stream ("real", "synthetic") supplies over the whole budget
    and all ranks (0: the stream is left out).

    Real and synthetic files are read by per-rank streams (:func:`rank_stream`: equal,
    deterministic, resumable at a row); the val split and a live generation stream go to the
    trainer, split across the workers."""
    out: dict[str, Any] = {"val": val_dataset(cfg, src)}
    specs: dict[str, StreamSpec] = {}
    if need.get("real"):
        specs["real"] = real_spec(cfg, src, need["real"], world)
    if need.get("synthetic"):
        if cfg.synthetic.live is not None:
            out["synthetic"] = live_stream(cfg, src, need["synthetic"])
        else:
            specs["synthetic"] = synthetic_spec(cfg, src, need["synthetic"], world)
    return out, specs


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
    Batch ``i``'s draws come from ``(*seed, i)``: a run restored at batch ``start`` draws what
    an uninterrupted one would. ``last[name]`` is the last row taken from a stream (its
    :data:`training.epochs.POSITION`, left on the device until a checkpoint asks).
    """

    def __init__(self, streams: dict[str, Iterator[dict[str, Any]]], p: float, batch_size: int,
                 seed: int | tuple[int, ...] = 0, start: int = 0):
        self.streams, self.p, self.batch_size = streams, p, batch_size
        self.seed, self.drawn = (tuple(seed) if isinstance(seed, tuple | list) else (seed,)), start
        self.pending: dict[str, tuple[dict[str, Any], int] | None] = {}
        self.taken = {k: 0 for k in ("real", "synthetic")}  # streams may be added later (a later phase's)
        self.last: dict[str, Any] = {}

    def _take(self, name: str, k: int) -> list[dict[str, Any]]:
        chunks, need = [], k
        while need:
            cur = self.pending.get(name)
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
        if POSITION in chunks[-1]:
            self.last[name] = chunks[-1][POSITION][-1]
        return chunks

    def __iter__(self) -> Mixer:
        return self

    def __next__(self) -> dict[str, Any]:
        rng = np.random.default_rng((*self.seed, self.drawn))
        self.drawn += 1
        n_syn = int((rng.random(self.batch_size) < self.p).sum()) if 0 < self.p < 1 else round(self.p) * self.batch_size
        chunks = []
        if self.batch_size - n_syn:
            chunks += self._take("real", self.batch_size - n_syn)
        if n_syn:
            chunks += self._take("synthetic", n_syn)
        # columns every chunk has (a live stream's rows carry no position)
        return {c: _cat([ch[c] for ch in chunks]) for c in chunks[0] if all(c in ch for ch in chunks)}


def _cat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)
