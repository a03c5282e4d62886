"""Training streams: one deterministic sequence of rows per rank, planned in O(1) of the budget.

**Positions.** A stream's input is the budget's positions, as a few thousand spans at most
(:func:`spans`; one map task each). :func:`pick_units` turns a global position into (epoch,
unit) with a permutation seeded by the epoch, so every epoch has its own order and a budget
of 1,000 epochs plans like one. Rank ``r`` of ``world`` owns the global positions
``q * world + r`` (``q`` = its local position): every rank gets the same number of positions
whatever the row count (equal splits: ranks agree on the number of steps), and its sequence is
fixed by (seed, rank, world) alone, so a restart resumes at the local position the checkpoint
recorded (:data:`POSITION`, carried by every row) and consumes exactly what an uninterrupted
run would have.

**Real rows** are units of one row (index only, the pixels read in the task).

**Synthetic rows** are read a *window* of units at a time (:func:`synthetic_span`): a unit is
one Parquet row group (the rows of the ``synthetic.volume`` subset in it), read once, only the
columns used — with the generator's bounded row groups (``output.row_group_rows``, 128) the
bytes read are the bytes used. A row group above ``data.row_group_cap`` rows (a dataset written
before bounded row groups: one group per shard) is cut into pieces that each read the whole
group; :func:`plan_chunks` warns, naming the file and the read amplification. Inside a window
the rows of its ``data.window_units`` units are interleaved in proportion (each unit's rows
spread evenly over the window, in a seeded order), so consecutive rows — a batch — come from
different row groups and hence different source rows: a SegGen shard writes a source row's
50 images side by side, and a plain shuffle buffer would leave batches of one or two layouts.
A window holds ``window_units`` row groups in memory (≤ ``window_units`` × the generator's
``row_group_bytes``). No local shuffle buffer is needed and none is used (it would make the
consumed rows depend on a buffer a restart loses).

Nothing here imports ray at module level: the functions run inside ``map_batches`` and tests
call them directly.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from core import schema as S
from training.transforms import AUG_KEY

log = logging.getLogger(__name__)

UNIT, EPOCH = "unit", "epoch"
POSITION = "position"  # int64 per row: where this rank's stream resumes after the row (see resume_from)
_WINDOW_BITS = 24  # a synthetic row's position: (rank-local window << 24) | row within the window

_TABLES: dict[str, Any] = {}  # per worker process: units tables fetched from the object store


def order(n: int, seed: int, salt: int, epoch: int) -> np.ndarray:
    """The unit order of one epoch (a permutation of ``range(n)``); the same on every worker."""
    return np.random.default_rng((seed, salt, epoch)).permutation(n)


def pick_units(batch: dict[str, np.ndarray], *, n: int, seed: int, salt: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Global budget positions (``id``) → (``epoch``, ``unit``). Position p is unit
    ``order(epoch)[p % n]`` of epoch ``p // n`` (``offset`` shifts p)."""
    pos = np.asarray(batch["id"], dtype=np.int64) + offset
    epoch, within = pos // n, pos % n
    unit = np.empty_like(pos)
    for e in np.unique(epoch):
        sel = epoch == e
        unit[sel] = order(n, seed, salt, int(e))[within[sel]]
    return {EPOCH: epoch, UNIT: unit}


SPAN_START, SPAN_STOP = "start", "stop"


def spans(n_rows: int, n_spans: int, start: int = 0) -> list[dict[str, int]]:
    """``n_spans`` contiguous [a, b) ranges covering ``range(start, n_rows)``: the rows of a
    training stream's input (one span per map task; see training.data._budget)."""
    bounds = np.linspace(start, n_rows, max(1, min(n_spans, n_rows - start)) + 1).astype(np.int64)
    return [{SPAN_START: int(a), SPAN_STOP: int(b)} for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def span_positions(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The budget positions of a batch of spans, in order."""
    parts = [np.arange(a, b, dtype=np.int64) for a, b in zip(batch[SPAN_START], batch[SPAN_STOP], strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def resume_from(position: int, synthetic: bool) -> tuple[int, int]:
    """(first local span position, rows of it to skip) to continue after the row at ``position``
    (-1: from the start). Real: positions are rows. Synthetic: (window, row within it)."""
    if position < 0:
        return 0, 0
    if not synthetic:
        return position + 1, 0
    return position >> _WINDOW_BITS, (position & ((1 << _WINDOW_BITS) - 1)) + 1


def real_span(batch: dict[str, np.ndarray], *, pick: dict[str, Any], rank: int, world: int, rows_ref, seed: int,
              rows_per_batch: int, transform: dict[str, Any]):
    """map_batches (one span per call): this rank's local positions → global positions →
    (epoch, unit) → real rows, decoded and augmented ``rows_per_batch`` at a time."""
    from training.transforms import transform_batch

    local = span_positions(batch)
    units = pick_units({"id": local * world + rank}, **pick)
    for i in range(0, len(local), rows_per_batch):
        part = {k: v[i:i + rows_per_batch] for k, v in units.items()}
        rows = real_rows(part, rows_ref=rows_ref, seed=seed)
        yield {**transform_batch(rows, **transform), POSITION: local[i:i + rows_per_batch], AUG_KEY: rows[AUG_KEY]}


def synthetic_span(batch: dict[str, np.ndarray], *, pick: dict[str, Any], rank: int, world: int, window_units: int,
                   skip: tuple[int, int] = (0, 0), chunks_ref, seed: int, draw_fraction: float, draw_seed: int,
                   rows_per_batch: int, transform: dict[str, Any]):
    """map_batches (one span of this rank's windows per call): local window k is global window
    ``k * world + rank``, i.e. units ``window_units`` global positions from there; its rows
    are read (:func:`synthetic_chunks`), interleaved (:func:`interleave`), decoded and augmented
    ``rows_per_batch`` at a time. ``skip`` = (window, rows): a resumed stream drops the rows
    of that window it had already consumed."""
    from training.transforms import transform_batch

    for k in span_positions(batch):
        first = (int(k) * world + rank) * window_units
        units = pick_units({"id": np.arange(first, first + window_units)}, **pick)
        rows = synthetic_chunks(units, chunks_ref=chunks_ref, seed=seed, draw_fraction=draw_fraction,
                                draw_seed=draw_seed, interleave_seed=(seed, int(k), rank, world))
        pos = (int(k) << _WINDOW_BITS) + np.arange(len(rows[AUG_KEY]), dtype=np.int64)
        start = skip[1] if int(k) == skip[0] else 0
        for i in range(start, len(pos), rows_per_batch):
            part = {c: v[i:i + rows_per_batch] for c, v in rows.items()}
            yield {**transform_batch(part, **transform), POSITION: pos[i:i + rows_per_batch], AUG_KEY: part[AUG_KEY]}


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
    crops and flips whatever task or order a row lands in (not Python's hash()). Also the
    row's identity in a run (a sample in one epoch)."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, (s, e) in enumerate(zip(ids, epochs, strict=True)):
        out[i] = int.from_bytes(hashlib.blake2b(f"{seed}:{e}:{s}".encode(), digest_size=8).digest(), "little") >> 1
    return out


def real_rows(batch: dict[str, np.ndarray], *, rows_ref, seed: int) -> dict[str, np.ndarray]:
    """(epoch, unit) → the real index rows (source id, paths) + augmentation keys."""
    table = units_table(rows_ref)  # dict of column -> numpy array
    unit = np.asarray(batch[UNIT], dtype=np.int64)
    out = {k: v[unit] for k, v in table.items()}
    out[AUG_KEY] = aug_keys([str(s) for s in out[S.SOURCE_ID]], batch[EPOCH], seed)
    return out


def interleave(sizes: list[int], seed: Any) -> np.ndarray:
    """An order of ``sum(sizes)`` rows (unit u's rows numbered consecutively) that spreads every
    unit's rows evenly over the whole: row t of a unit of n rows sits near ``(t + φ) / n`` of
    the way through, with a seeded phase φ per unit and a seeded order inside each unit: two
    rows of one unit are about ``len / n`` rows apart."""
    rng = np.random.default_rng(seed)
    keys, rows, base = [], [], 0
    for n in sizes:
        if n:
            keys.append((np.arange(n) + rng.random()) / n)
            rows.append(base + rng.permutation(n))
        base += n
    if not keys:
        return np.zeros(0, np.int64)
    return np.concatenate(rows)[np.argsort(np.concatenate(keys), kind="stable")]


def synthetic_chunks(batch: dict[str, np.ndarray], *, chunks_ref, seed: int, draw_fraction: float = 1.0,
                     draw_seed: int = 0, interleave_seed: Any = None) -> dict[str, np.ndarray]:
    """(epoch, unit) → the rows of those Parquet units (image and mask bytes read here, in the
    task; only the unit's subset positions kept), with augmentation keys; interleaved across
    units when ``interleave_seed`` is given, else unit after unit. ``draw_fraction`` < 1
    keeps a seeded uniform sample (a budget under one epoch)."""
    import pyarrow as pa

    from training.subsets import draw_key

    chunks = units_table(chunks_ref)
    ids, images, masks, epochs, sizes = [], [], [], [], []
    for unit, epoch in zip(batch[UNIT], batch[EPOCH], strict=True):
        path, group, positions = chunks[int(unit)]
        table = open_row_group(path, group, [S.SAMPLE_ID, S.IMAGE, S.MASK])
        if len(positions) < table.num_rows:
            table = table.take(pa.array(positions))
        sid = table.column(S.SAMPLE_ID).to_pylist()
        keep = np.ones(len(sid), dtype=bool)
        if draw_fraction < 1:
            keep = np.array([draw_key(draw_seed, s) < draw_fraction for s in sid], dtype=bool)
        ids += [s for s, k in zip(sid, keep, strict=True) if k]
        images += [b for b, k in zip(table.column(S.IMAGE).to_pylist(), keep, strict=True) if k]
        masks += [b for b, k in zip(table.column(S.MASK).to_pylist(), keep, strict=True) if k]
        epochs += [int(epoch)] * int(keep.sum())
        sizes.append(int(keep.sum()))
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731 - bytes columns stay Python objects
    out = {S.IMAGE: obj(images), S.MASK: obj(masks), AUG_KEY: aug_keys(ids, np.array(epochs, dtype=np.int64), seed)}
    if interleave_seed is not None:
        idx = interleave(sizes, interleave_seed)
        out = {k: v[idx] for k, v in out.items()}
    return out


def open_row_group(path: str, group: int, columns: list[str]):
    """One row group's columns: the only read of image bytes (the benchmark counts them here)."""
    return _parquet(path).read_row_group(group, columns=columns)


def _parquet(path: str):
    """A Parquet file by local path or URI (one file system per bucket per process)."""
    import pyarrow.parquet as pq

    from core import storage

    loc = storage.resolve_file(path)
    return pq.ParquetFile(loc.path, filesystem=loc.fs)


def plan_chunks(files: list[str], volume: int | None = None, cap: int = 1024, warn: bool = True
                ) -> tuple[list[tuple[str, int, np.ndarray]], int]:
    """(file, row group, row positions) per unit — a row group (its ``volume`` subset rows),
    cut into pieces of ``cap`` rows when it has more — and the rows per epoch.

    Without a volume subset only Parquet footers are read (O(files)); with one, the
    ``sample_id`` column alone (never image bytes) gives the subset's threshold
    (training.subsets: the ``volume`` smallest keys) and each group's positions, once."""
    from training.subsets import subset_key

    groups, keys, oversized = [], [], {}
    for f in files:
        pf = _parquet(f)  # one open (footer read) per file, not per row group
        meta = pf.metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if not n:
                continue
            groups.append((f, g, n))
            if n > cap:
                oversized.setdefault(f, max(n, oversized.get(f, 0)))
            if volume is not None:
                ids = pf.read_row_group(g, columns=[S.SAMPLE_ID]).column(S.SAMPLE_ID).to_pylist()
                keys.append(np.fromiter((subset_key(s) for s in ids), dtype=np.uint64, count=len(ids)))
    for f, n in list(oversized.items())[:5] if warn else []:
        log.warning("%s: row groups of up to %d rows, above data.row_group_cap=%d: each piece of %d rows reads "
                    "its whole group (read amplification up to %.1fx); regenerate with bounded row groups "
                    "(output.row_group_rows) or raise data.row_group_cap", f, n, cap, cap, -(-n // cap))
    if warn and len(oversized) > 5:
        log.warning("... and %d more files with row groups above data.row_group_cap", len(oversized) - 5)
    if volume is None:
        kept = [np.arange(n) for _, _, n in groups]
    else:
        every = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        if not 1 <= volume <= len(every):
            raise ValueError(f"volume {volume} outside 1..{len(every)}")
        threshold = np.partition(every, volume - 1)[volume - 1]
        kept = [np.flatnonzero(k <= threshold) for k in keys]
    out = [(f, g, pos[i:i + cap]) for (f, g, _), pos in zip(groups, kept, strict=True)
           for i in range(0, len(pos), cap)]
    return out, int(sum(len(p) for p in kept))


def read_amplification(chunks: list[tuple[str, int, np.ndarray]], columns: tuple[str, ...] = (S.IMAGE, S.MASK)) -> float:
    """Compressed bytes one epoch reads from storage ÷ compressed bytes of the rows it uses
    (row groups pro rata), from the Parquet footers."""
    read = used = 0.0
    metas: dict[str, Any] = {}
    for f, g, pos in chunks:
        meta = metas.setdefault(f, _parquet(f).metadata)
        rg = meta.row_group(g)
        names = [rg.column(i).path_in_schema for i in range(rg.num_columns)]
        size = sum(rg.column(names.index(c)).total_compressed_size for c in columns if c in names)
        read += size
        used += size * len(pos) / rg.num_rows
    return read / used if used else 1.0
