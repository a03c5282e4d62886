"""Epochs that repeat inside one Ray Data stream, planned in O(1) of the budget.

A training stream's input is the whole budget's positions, as a few thousand spans at most
(:func:`spans`; one map task each, :func:`real_span` / :func:`synthetic_span`). :func:`pick_units` turns a position into (epoch, unit) with a permutation seeded by the
epoch, so every epoch has its own order and a budget of 1,000 epochs plans like one. A unit
is a real training row (index only), or a chunk of a synthetic Parquet file (file, row group,
row positions inside it). The map tasks look units up in a table the driver put in the object
store once (:func:`units_table`). Nothing here imports ray at module level: the functions run
inside ``map_batches`` and tests call them directly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from core import schema as S
from training.transforms import AUG_KEY

UNIT, EPOCH = "unit", "epoch"

_TABLES: dict[str, Any] = {}  # per worker process: units tables fetched from the object store


def order(n: int, seed: int, salt: int, epoch: int) -> np.ndarray:
    """The unit order of one epoch (a permutation of ``range(n)``); the same on every worker."""
    return np.random.default_rng((seed, salt, epoch)).permutation(n)


def pick_units(batch: dict[str, np.ndarray], *, n: int, seed: int, salt: int, offset: int = 0) -> dict[str, np.ndarray]:
    """map_batches: budget positions (``id``) → (``epoch``, ``unit``). Position p is row
    ``order(epoch)[p % n]`` of epoch ``p // n`` (``offset`` shifts p: a resumed run)."""
    pos = np.asarray(batch["id"], dtype=np.int64) + offset
    epoch, within = pos // n, pos % n
    unit = np.empty_like(pos)
    for e in np.unique(epoch):
        sel = epoch == e
        unit[sel] = order(n, seed, salt, int(e))[within[sel]]
    return {EPOCH: epoch, UNIT: unit}


SPAN_START, SPAN_STOP = "start", "stop"


def spans(n_rows: int, n_spans: int) -> list[dict[str, int]]:
    """``n_spans`` contiguous [start, stop) ranges covering ``range(n_rows)``: the rows of a
    training stream's input (one span per map task; see training.data._budget)."""
    bounds = np.linspace(0, n_rows, max(1, min(n_spans, n_rows)) + 1).astype(np.int64)
    return [{SPAN_START: int(a), SPAN_STOP: int(b)} for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def span_positions(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The budget positions of a batch of spans, in order."""
    parts = [np.arange(a, b, dtype=np.int64) for a, b in zip(batch[SPAN_START], batch[SPAN_STOP], strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def real_span(batch: dict[str, np.ndarray], *, pick: dict[str, Any], rows_ref, seed: int, rows_per_batch: int,
              transform: dict[str, Any]):
    """map_batches (one span per call): positions → (epoch, unit) → real rows, decoded and
    augmented (training.transforms.transform_batch) ``rows_per_batch`` at a time."""
    from training.transforms import transform_batch

    units = pick_units({"id": span_positions(batch)}, **pick)
    for i in range(0, len(units[UNIT]), rows_per_batch):
        part = {k: v[i:i + rows_per_batch] for k, v in units.items()}
        yield transform_batch(real_rows(part, rows_ref=rows_ref, seed=seed), **transform)


def synthetic_span(batch: dict[str, np.ndarray], *, pick: dict[str, Any], **kwargs):
    """map_batches (one span per call): positions → (epoch, unit) → :func:`synthetic_batches`
    one unit at a time."""
    units = pick_units({"id": span_positions(batch)}, **pick)
    for i in range(len(units[UNIT])):
        yield from synthetic_batches({k: v[i:i + 1] for k, v in units.items()}, **kwargs)


def units_table(ref):
    """The units table behind an object ref, fetched once per worker process."""
    key = ref.hex()
    if key not in _TABLES:
        import ray

        _TABLES.clear()  # one run at a time per process: don't keep old runs' tables
        _TABLES[key] = ray.get(ref)
    return _TABLES[key]


def aug_keys(ids: list[str], epochs: np.ndarray, seed: int) -> np.ndarray:
    """Augmentation seed per row from (run seed, sample id, epoch): a rerun draws the same
    crops and flips whatever task or order a row lands in (not Python's hash())."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, (s, e) in enumerate(zip(ids, epochs, strict=True)):
        out[i] = int.from_bytes(hashlib.blake2b(f"{seed}:{e}:{s}".encode(), digest_size=8).digest(), "little") >> 1
    return out


def real_rows(batch: dict[str, np.ndarray], *, rows_ref, seed: int) -> dict[str, np.ndarray]:
    """map_batches: (epoch, unit) → the real index rows (source id, paths) + augmentation keys."""
    table = units_table(rows_ref)  # dict of column -> numpy array
    unit = np.asarray(batch[UNIT], dtype=np.int64)
    out = {k: v[unit] for k, v in table.items()}
    out[AUG_KEY] = aug_keys([str(s) for s in out[S.SOURCE_ID]], batch[EPOCH], seed)
    return out


def synthetic_chunks(batch: dict[str, np.ndarray], *, chunks_ref, seed: int, draw_fraction: float = 1.0,
                     draw_seed: int = 0) -> dict[str, np.ndarray]:
    """map_batches: (epoch, unit) → the rows of those Parquet chunks (image and mask bytes
    read here, in the task; only the chunk's subset positions kept), with augmentation keys.
    ``draw_fraction`` < 1 keeps a seeded uniform sample (a budget under one epoch)."""
    import pyarrow as pa

    from training.subsets import draw_key

    chunks = units_table(chunks_ref)
    ids, images, masks, epochs = [], [], [], []
    for unit, epoch in zip(batch[UNIT], batch[EPOCH], strict=True):
        path, group, positions = chunks[int(unit)]
        table = read_row_group(path, group, [S.SAMPLE_ID, S.IMAGE, S.MASK]).take(pa.array(positions))
        sid = table.column(S.SAMPLE_ID).to_pylist()
        keep = np.ones(len(sid), dtype=bool)
        if draw_fraction < 1:
            keep = np.array([draw_key(draw_seed, s) < draw_fraction for s in sid], dtype=bool)
        ids += [s for s, k in zip(sid, keep, strict=True) if k]
        images += [b for b, k in zip(table.column(S.IMAGE).to_pylist(), keep, strict=True) if k]
        masks += [b for b, k in zip(table.column(S.MASK).to_pylist(), keep, strict=True) if k]
        epochs += [int(epoch)] * int(keep.sum())
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731 - bytes columns stay Python objects
    return {S.IMAGE: obj(images), S.MASK: obj(masks), AUG_KEY: aug_keys(ids, np.array(epochs, dtype=np.int64), seed)}


def synthetic_batches(batch: dict[str, np.ndarray], *, chunks_ref, seed: int, draw_fraction: float, draw_seed: int,
                      rows_per_batch: int, transform: dict[str, Any]):
    """map_batches (one unit per call): :func:`synthetic_chunks`, then decode and augment
    (training.transforms.transform_batch) ``rows_per_batch`` rows at a time."""
    from training.transforms import transform_batch

    rows = synthetic_chunks(batch, chunks_ref=chunks_ref, seed=seed, draw_fraction=draw_fraction, draw_seed=draw_seed)
    n = len(rows[AUG_KEY])
    for i in range(0, n, rows_per_batch):
        yield transform_batch({k: v[i:i + rows_per_batch] for k, v in rows.items()}, **transform)


_GROUPS: dict[tuple[str, int, tuple[str, ...]], Any] = {}
CACHE_BYTES = 512 * 1024**2  # row groups kept per worker process (a unit is a slice of one)


def read_row_group(path: str, group: int, columns: list[str]):
    """One row group of a Parquet file, kept in a small per-process cache: a unit is a slice
    of a row group, so a group is otherwise read once per slice."""
    key = (path, group, tuple(columns))
    if key not in _GROUPS:
        table = open_row_group(path, group, columns)
        while _GROUPS and sum(t.nbytes for t in _GROUPS.values()) + table.nbytes > CACHE_BYTES:
            _GROUPS.pop(next(iter(_GROUPS)))  # oldest first
        _GROUPS[key] = table
    return _GROUPS[key]


def open_row_group(path: str, group: int, columns: list[str]):
    """The storage boundary: local paths here."""

    return _parquet(path).read_row_group(group, columns=columns)


def _parquet(path: str):
    """A Parquet file by local path or URI (one file system per bucket per process)."""
    import pyarrow.parquet as pq

    from core import storage

    loc = storage.resolve_file(path)
    return pq.ParquetFile(loc.path, filesystem=loc.fs)


def plan_chunks(files: list[str], volume: int | None = None, slice_rows: int = 64
                ) -> tuple[list[tuple[str, int, np.ndarray]], int]:
    """(file, row group, row positions) per unit of at most ``slice_rows`` kept rows of one
    row group (a whole shard is often one group: slices keep the map tasks small and many),
    and the rows per epoch.

    Without a volume subset only Parquet footers are read (O(files)); with one, the
    ``sample_id`` column alone (never image bytes) gives the subset's threshold
    (training.subsets: the ``volume`` smallest keys) and each group's positions, once."""

    from training.subsets import subset_key

    groups, keys = [], []
    for f in files:
        pf = _parquet(f)
        for g in range(pf.metadata.num_row_groups):
            if not pf.metadata.row_group(g).num_rows:
                continue
            groups.append((f, g))
            if volume is not None:
                ids = pf.read_row_group(g, columns=[S.SAMPLE_ID]).column(S.SAMPLE_ID).to_pylist()
                keys.append(np.fromiter((subset_key(s) for s in ids), dtype=np.uint64, count=len(ids)))
    if volume is None:
        kept = [np.arange(_parquet(f).metadata.row_group(g).num_rows) for f, g in groups]
    else:
        every = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        if not 1 <= volume <= len(every):
            raise ValueError(f"volume {volume} outside 1..{len(every)}")
        threshold = np.partition(every, volume - 1)[volume - 1]
        kept = [np.flatnonzero(k <= threshold) for k in keys]
    out = [(f, g, pos[i:i + slice_rows]) for (f, g), pos in zip(groups, kept, strict=True)
           for i in range(0, len(pos), slice_rows)]
    return out, int(sum(len(p) for p in kept))
