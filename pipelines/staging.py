"""Rows of unfinished shards, staged on the output's storage as they arrive.

A writer does not hold a shard's rows: each part of a block it receives is written at once as
one small Arrow IPC file (a *piece*) under ``OUT/.staging/<hash>/<shard>/``, named by the hash of
its sample ids (a retried call rewrites the same piece). The writer keeps only a small index per
row (sample id, where it is, its size, its counts). Because pieces live where the output lives,
a writer restarted by Ray on another node (its node lost) rebuilds the index from the pieces
and carries on: nothing it had received is lost, and its caller's retried call is deduplicated
by sample id. When the shard is complete its rows are read back in the shard's row order, one
row group at a time (:func:`gather`), so a writer's memory is about one row group, whatever
the shard's size. Pieces are stored in chunks of :data:`CHUNK` rows so a row group reads only
the chunks it takes rows from.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from core import schema as S
from core import storage
from core.storage import Location
from pipelines.commits import STAGING, ids_digest
from pipelines.stages import SIBLINGS

CHUNK = 8  # rows per record batch of a piece: the unit a row group reads back
INDEX_COLUMNS = [S.SAMPLE_ID, S.SOURCE_ID, SIBLINGS, S.METHOD, S.DROP_REASON, S.PROMPT_TRUNCATED]


@dataclass(frozen=True)
class Entry:
    """One staged row: where it is and what the commit record counts of it."""

    sample_id: str
    piece: int
    row: int
    nbytes: int
    method: str
    drop_reason: str
    truncated: int


@dataclass
class OpenShard:
    """The index of one unfinished shard (no row data)."""

    pieces: list[Location] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    seen: Counter = field(default_factory=Counter)  # source_id -> rows received
    siblings: dict[str, int] = field(default_factory=dict)  # source_id -> rows it produces
    done_sources: int = 0
    columns: set[str] = field(default_factory=set)

    def index(self, piece: int, table: pa.Table) -> None:
        """Add a staged piece's rows (already deduplicated) to the index."""
        self.columns |= set(table.column_names)
        sizes = _row_bytes(table)
        cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows)
                for c in INDEX_COLUMNS}
        for i, sid in enumerate(cols[S.SAMPLE_ID]):
            if sid in self.entries:
                continue
            self.entries[sid] = Entry(sid, piece, i, sizes[i], cols[S.METHOD][i] or "", cols[S.DROP_REASON][i] or "",
                                      int(cols[S.PROMPT_TRUNCATED][i] or 0))
            source = cols[S.SOURCE_ID][i]
            self.seen[source] += 1
            self.siblings[source] = int(cols[SIBLINGS][i])
            if self.seen[source] == self.siblings[source]:
                self.done_sources += 1


def _row_bytes(table: pa.Table) -> list[int]:
    """Payload bytes per row (image + mask + extra binary columns): what a row group's byte cap counts."""
    total = pa.array([0] * table.num_rows, pa.int64())
    for name in table.column_names:
        if pa.types.is_binary(table.schema.field(name).type) or pa.types.is_large_binary(table.schema.field(name).type):
            total = pc.add(total, pc.fill_null(pc.binary_length(table.column(name)), 0).cast(pa.int64()))
    return total.to_pylist()


def shard_dir(out: Location, config_hash: str, shard: int) -> Location:
    return out / STAGING / config_hash / f"{shard:05d}"


def stage(out: Location, config_hash: str, shard: int, table: pa.Table) -> Location:
    """Write ``table`` (one shard's new rows) as a piece; returns where."""
    loc = shard_dir(out, config_hash, shard) / f"{ids_digest(table.column(S.SAMPLE_ID).to_pylist())[:24]}.arrow"
    sink = pa.BufferOutputStream()
    table = table.combine_chunks()  # one chunk: record batches of exactly CHUNK rows
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=CHUNK)
    storage.write_bytes(loc, sink.getvalue().to_pybytes())
    return loc


def staged_pieces(out: Location, config_hash: str) -> dict[int, list[Location]]:
    """Pieces left under the staging prefix, by shard (one listing; what a restarted writer reads)."""
    from pyarrow.fs import FileType

    root = out / STAGING / config_hash
    found: dict[int, list[Location]] = {}
    for info in storage.iter_file_infos(root):
        if info.type != FileType.File or not info.path.endswith(".arrow"):
            continue
        shard = int(posixpath.basename(posixpath.dirname(info.path)))
        found.setdefault(shard, []).append(Location(out.fs, info.path, info.path))
    return {s: sorted(p, key=lambda x: x.path) for s, p in found.items()}


def read_index_columns(loc: Location) -> pa.Table:
    """A piece's index columns and row sizes (a restarted writer rebuilding its index)."""
    with loc.fs.open_input_file(loc.path) as f:
        return pa.ipc.open_file(f).read_all()


class PieceReader:
    """Reads rows of a shard's pieces by (piece, row), one CHUNK-row record batch at a time."""

    def __init__(self, pieces: list[Location]):
        self.pieces = pieces
        self._files: dict[int, Any] = {}

    def take(self, piece: int, rows: list[int]) -> pa.Table:
        """Rows ``rows`` of piece ``piece``, in that order."""
        if piece not in self._files:
            loc = self.pieces[piece]
            f = loc.fs.open_input_file(loc.path)
            self._files[piece] = (f, pa.ipc.open_file(f))
        reader = self._files[piece][1]
        parts = []
        for chunk in sorted({r // CHUNK for r in rows}):
            batch = reader.get_batch(chunk)
            parts.append((chunk, pa.Table.from_batches([batch])))
        table = pa.concat_tables([t for _, t in parts], promote_options="permissive")
        offsets, at = {}, 0
        for chunk, t in parts:
            offsets[chunk] = at
            at += t.num_rows
        return table.take([offsets[r // CHUNK] + r % CHUNK for r in rows])

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


def row_groups(entries: list[Entry], max_rows: int, max_bytes: int) -> Iterator[list[Entry]]:
    """Consecutive groups of ``entries`` of at most ``max_rows`` rows and ``max_bytes`` payload
    bytes (a single bigger row gets a group of its own). Cut from the rows alone: deterministic."""
    group: list[Entry] = []
    size = 0
    for e in entries:
        if group and (len(group) >= max_rows or size + e.nbytes > max_bytes):
            yield group
            group, size = [], 0
        group.append(e)
        size += e.nbytes
    if group:
        yield group


def gather(reader: PieceReader, group: list[Entry]) -> list[dict[str, Any]]:
    """The rows of ``group`` as dicts, in the group's order (reads only the chunks they are in)."""
    by_piece: dict[int, list[Entry]] = {}
    for e in group:
        by_piece.setdefault(e.piece, []).append(e)
    rows: dict[str, dict[str, Any]] = {}
    for piece, es in by_piece.items():
        for row in reader.take(piece, [e.row for e in es]).to_pylist():
            rows[row[S.SAMPLE_ID]] = row
    return [rows[e.sample_id] for e in group]
