"""Writes the dataset contract: deterministic shards in bounded row groups, commit records.

A shard is a fixed range of source rows. Its rows are staged as the stream delivers them
(:mod:`pipelines.staging`) and the shard is written once every source row is accounted for
(each source row says how many rows it produces, kept or rejected).

Row order rule (what keeps reruns byte-identical): a shard's rows are sorted by ``sample_id``
and cut into row groups of at most ``row_group_rows`` rows and ``row_group_bytes`` payload
bytes, counted from the rows alone, so arrival order, retries and restarts never change the
bytes. The file is written straight to its final name (temp + rename on file systems, one
multipart upload on object stores), its footer and sample ids read back and checked, and then
its commit record written (:mod:`pipelines.commits`): only the record makes it complete.
:class:`ShardWriter` runs inside writer actors (:mod:`pipelines.sink`), so the driver never
sees image bytes; it gets one small completion record per shard.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import schema as S
from core import storage
from core.storage import Location
from pipelines import staging
from pipelines.commits import (
    committed_shards,
    ids_digest,
    remove_uncommitted,
    shard_name,
    verify_parquet,
    write_commit,
)

log = logging.getLogger(__name__)

REJECTED_SCHEMA = S.DATASET_SCHEMA.append(pa.field(S.SOURCE_PATH, pa.string()))
STAT_PROMPTS_TRUNCATED = "segfactory.prompts_truncated"
ROW_GROUP_ROWS = 128
ROW_GROUP_BYTES = 128 << 20


class OutputConflict(RuntimeError):
    """The output directory holds a dataset made with another config."""


def drop_code(reason: str) -> str:
    """``"corrupt_image: JPEGImages/x.jpg ..."`` → ``"corrupt_image"`` (what the manifest counts)."""
    return reason.split(":", 1)[0]


class ShardRanges(Mapping):
    """``{shard: source rows in it}`` for ``n_rows`` rows cut into fixed ranges, without a dict
    per shard (a writer actor needs the count of any shard it may own)."""

    def __init__(self, n_rows: int, rows_per_shard: int):
        self.n_rows, self.rows_per_shard = n_rows, rows_per_shard

    def __getitem__(self, shard: int) -> int:
        start = shard * self.rows_per_shard
        if shard < 0 or start >= self.n_rows:
            raise KeyError(shard)
        return min(self.rows_per_shard, self.n_rows - start)

    def __len__(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))


class ShardWriter:
    """Stages streamed rows per shard and writes and commits each shard when it is complete.

    Adding a row twice (a retried task re-sending its rows) is harmless: rows are keyed by
    ``sample_id`` and rows of a committed shard are ignored, so each shard is written once.
    ``owns`` picks the shards this writer is responsible for: on start it picks up their staged
    rows (a writer restarted after its process or node was lost carries on where it was).
    """

    def __init__(self, out: Location | str | os.PathLike, config_hash: str, sources_per_shard: Mapping[int, int],
                 owns: Callable[[int], bool] = lambda shard: True, row_group_rows: int = ROW_GROUP_ROWS,
                 row_group_bytes: int = ROW_GROUP_BYTES, after_write: Callable[[int], None] | None = None):
        self.out = storage.resolve(out, "output.path")
        self.after_write = after_write  # called with the count of shards written so far
        self.hash = config_hash
        self.expected_sources = sources_per_shard
        self.row_group_rows, self.row_group_bytes = row_group_rows, row_group_bytes
        self.open: dict[int, staging.OpenShard] = {}
        self.written: list[int] = []
        for sub in ("shards", "rejected"):
            storage.makedirs(self.out / sub)
        self._done = {s for s in committed_shards(self.out, config_hash) if owns(s)}
        self.recovered = self._recover(owns)

    def _recover(self, owns: Callable[[int], bool]) -> int:
        """Rebuild the index of staged rows of owned, uncommitted shards; returns rows found."""
        rows = 0
        for shard, pieces in staging.staged_pieces(self.out, self.hash).items():
            if not owns(shard) or shard in self._done:
                continue
            state = self.open.setdefault(shard, staging.OpenShard())
            for loc in pieces:
                state.pieces.append(loc)
                state.index(len(state.pieces) - 1, staging.read_index_columns(loc))
            rows += len(state.entries)
        if rows:
            log.info("writer: picked up %d staged rows of %d unfinished shard(s)", rows, len(self.open))
        return rows

    def add(self, table: pa.Table) -> list[dict[str, Any]]:
        """Take rows; commit every shard they complete; return those shards' completion records."""
        records = []
        shards = table.column(S.SHARD).to_numpy()
        for shard in (int(s) for s in np.unique(shards)):
            if shard in self._done:
                continue
            state = self.open.setdefault(shard, staging.OpenShard())
            part = table.filter(pa.array(shards == shard))
            ids = part.column(S.SAMPLE_ID).to_pylist()
            first = {sid: i for i, sid in reversed(list(enumerate(ids)))}
            new = sorted(i for sid, i in first.items() if sid not in state.entries)
            if new:
                part = part.take(new)
                state.pieces.append(staging.stage(self.out, self.hash, shard, part))
                state.index(len(state.pieces) - 1, part)
            if state.done_sources == self.expected_sources[shard]:
                records.append(self._commit(shard))
        return records

    def buffered_rows(self) -> int:
        """Rows staged for unfinished shards (on storage; the writer holds only their index)."""
        return sum(len(s.entries) for s in self.open.values())

    def pending(self) -> list[int]:
        """Shards that never completed (a bug or a lost row: reported, never silently dropped)."""
        return sorted(s for s in self.expected_sources if s not in self._done)

    def _commit(self, shard: int) -> dict[str, Any]:
        """Write the shard (and its rejected rows) in row order, verify, then record the commit."""
        state = self.open[shard]  # dropped once committed: a failed commit is retried by a resent row
        entries = sorted(state.entries.values(), key=lambda e: e.sample_id)
        kept = [e for e in entries if not e.drop_reason]
        rejected = [e for e in entries if e.drop_reason]
        name = shard_name(self.hash, shard)
        extra = score_fields(state.columns)
        truncated = sum(e.truncated for e in entries)
        reader = staging.PieceReader(state.pieces)
        try:
            rejected_file = None
            if rejected:
                rejected_file = f"rejected/{name}"
                self._write(reader, rejected, self.out / rejected_file, pa.schema([*REJECTED_SCHEMA, *extra]))
            else:
                storage.remove(self.out / "rejected" / name)  # a stale file of an earlier, uncommitted try
            # run statistics that are not per-row columns travel in the file's metadata too
            schema = pa.schema([*S.DATASET_SCHEMA, *extra]).with_metadata({STAT_PROMPTS_TRUNCATED: str(truncated)})
            written = self._write(reader, kept, self.out / "shards" / name, schema)
        finally:
            reader.close()
        filtered = sum(drop_code(e.drop_reason) in S.FILTER_REASONS for e in rejected)
        write_commit(self.out, {
            "shard": shard, "config_hash": self.hash, "file": f"shards/{name}", "rows": len(kept),
            "sample_ids": ids_digest(e.sample_id for e in kept), **written,
            "rows_per_method": dict(sorted(Counter(e.method for e in kept).items())),
            "drops_per_reason": dict(sorted(Counter(drop_code(e.drop_reason) for e in rejected).items())),
            "rejected_file": rejected_file, "rejected_rows": len(rejected), "filtered_rows": filtered,
            "prompts_truncated": truncated})
        storage.remove_tree(staging.shard_dir(self.out, self.hash, shard))
        del self.open[shard]
        self._done.add(shard)
        self.written.append(shard)
        if self.after_write:
            self.after_write(len(self.written))
        return {"shard": shard, "kept": len(kept), "rejected": len(rejected), "filtered": filtered,
                "truncated": truncated}

    def _write(self, reader: staging.PieceReader, entries: list[staging.Entry], loc: Location,
               schema: pa.Schema) -> dict[str, int]:
        """Row groups of ``entries`` into ``loc``, then the footer check; returns size and groups."""
        names = [f.name for f in schema if f.name.startswith(S.SCORE_PREFIX)]
        with open_parquet(loc, schema) as w:
            for group in staging.row_groups(entries, self.row_group_rows, self.row_group_bytes):
                rows = staging.gather(reader, group)
                for r in rows:  # NaN (a row not scored) is stored as null
                    for k in names:
                        if isinstance(r.get(k), float) and r[k] != r[k]:
                            r[k] = None
                w.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=len(rows))
        return verify_parquet(loc, len(entries), ids_digest(e.sample_id for e in entries))


@contextmanager
def open_parquet(loc: Location, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer on ``loc`` that appends row groups as they come: temp + rename on file
    systems; on an object store the object appears when the upload completes at close (a failed
    one may still appear, apache/arrow#40502: the commit record, not the object, says done)."""
    target = loc if loc.is_object_store else loc.parent / f".{loc.name}.tmp"
    storage.makedirs(loc.parent)
    with target.fs.open_output_stream(target.path) as stream, \
            pq.ParquetWriter(stream, schema, compression="zstd") as writer:
        yield writer
    if target is not loc:
        loc.fs.move(target.path, loc.path)


def score_fields(columns: set[str]) -> list[pa.Field]:
    """A float64 field per ``score_*`` column, then a field per graph-specific column
    (``schema.EXTRA_COLUMNS``) the rows carry."""
    names = sorted(c for c in columns if c.startswith(S.SCORE_PREFIX))
    extra = sorted(c for c in columns if c in S.EXTRA_COLUMNS)
    return [pa.field(k, pa.float64()) for k in names] + [pa.field(k, S.EXTRA_COLUMNS[k]) for k in extra]


def prepare_output(out: Location | str | os.PathLike, config_hash: str, resolved: dict[str, Any],
                   overwrite: bool) -> set[int]:
    """Check the output belongs to this config (or holds no committed shard yet); remove what no
    commit record covers (a stopped run's staged rows and partial files); return committed shards.
    Runs under the output's lease (:mod:`pipelines.lease`)."""
    from pipelines.commits import COMMITS

    out = storage.resolve(out, "output.path")
    storage.check_writable_root(out)
    for sub in ("shards", "rejected"):
        storage.makedirs(out / sub)
    stamp = out / "config.json"
    if storage.exists(stamp):
        previous = json.loads(storage.read_text(stamp)).get("config_hash")
        if previous != config_hash:
            # a run that stopped before its first commit (e.g. a config error) has nothing to protect
            if storage.listdir(out / COMMITS, ".json") and not overwrite:
                raise OutputConflict(
                    f"{out} holds a dataset made with another config (hash {previous}, this one "
                    f"{config_hash}); choose another output.path or pass output.overwrite=true")
            for sub in ("shards", "rejected", COMMITS):
                for f in storage.listdir(out / sub):
                    storage.remove(f)
            storage.remove(out / "manifest.json")
    storage.write_text(stamp, json.dumps({"config_hash": config_hash, "config": resolved}, indent=2, sort_keys=True))
    remove_uncommitted(out, config_hash)
    return committed_shards(out, config_hash)


def write_manifest(out: Location | str | os.PathLike, manifest: dict[str, Any]) -> Location:
    path = storage.resolve(out, "output.path") / "manifest.json"
    storage.write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path
