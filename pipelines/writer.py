"""Writes the dataset contract: deterministic shards, rejected rows, the manifest.

A shard is a fixed range of source rows. Its rows are gathered as the stream delivers them
and written once every source row of the shard is accounted for (each source row says how
many rows it produces, kept or rejected). A shard file is always complete (temp + rename on
file systems, one whole upload on object stores: :mod:`core.storage`); a rerun skips
shards that exist. :class:`ShardWriter` runs inside writer actors (:mod:`pipelines.sink`), so
the driver never sees image bytes; it gets one small completion record per shard.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import schema as S
from core import storage
from core.storage import Location
from pipelines.stages import SIBLINGS

REJECTED_SCHEMA = S.DATASET_SCHEMA.append(pa.field(S.SOURCE_PATH, pa.string()))
STAT_PROMPTS_TRUNCATED = "segfactory.prompts_truncated"


class OutputConflict(RuntimeError):
    """The output directory holds a dataset made with another config."""


def shard_name(config_hash: str, shard: int) -> str:
    return f"part-{config_hash}-{shard:05d}.parquet"


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
    """Collects streamed rows per shard and writes each shard when it is complete.

    Adding a row twice (a retried task re-sending its rows) is harmless: rows are keyed by
    ``sample_id`` and rows of a shard already written are ignored, so each shard is written once.
    """

    def __init__(self, out: Location | str | os.PathLike, config_hash: str, sources_per_shard: Mapping[int, int],
                 after_write: Callable[[int], None] | None = None):
        self.out = storage.resolve(out, "output.path")
        self.after_write = after_write  # called with the count of shards written so far
        self.hash = config_hash
        self.expected_sources = sources_per_shard
        self.rows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)  # shard -> sample_id -> row
        self.seen: dict[int, Counter] = defaultdict(Counter)  # shard -> source_id -> rows seen
        self.siblings: dict[int, dict[str, int]] = defaultdict(dict)
        self.done_sources: dict[int, int] = defaultdict(int)
        self.written: list[int] = []
        for sub in ("shards", "rejected"):
            storage.makedirs(self.out / sub)

    def add(self, table: pa.Table) -> list[dict[str, Any]]:
        """Take rows; write every shard they complete; return those shards' completion records."""
        records = []
        for row in table.to_pylist():
            shard, sid = int(row[S.SHARD]), row[S.SOURCE_ID]
            if shard in self.written or row[S.SAMPLE_ID] in self.rows[shard]:
                continue
            self.rows[shard][row[S.SAMPLE_ID]] = row
            self.seen[shard][sid] += 1
            self.siblings[shard][sid] = int(row[SIBLINGS])
            if self.seen[shard][sid] == self.siblings[shard][sid]:
                self.done_sources[shard] += 1
                if self.done_sources[shard] == self.expected_sources[shard]:
                    records.append(self._write(shard))
        return records

    def buffered_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def pending(self) -> list[int]:
        """Shards that never completed (a bug or a lost row: reported, never silently dropped)."""
        return sorted(s for s in self.expected_sources if s not in self.written)

    def _write(self, shard: int) -> dict[str, Any]:
        rows = sorted(self.rows.pop(shard).values(), key=lambda r: r[S.SAMPLE_ID])
        for d in (self.seen, self.siblings, self.done_sources):
            d.pop(shard, None)
        kept = [r for r in rows if not r[S.DROP_REASON]]
        rejected = [r for r in rows if r[S.DROP_REASON]]
        name = shard_name(self.hash, shard)
        scores = score_fields(rows)  # score_* columns of the filters that ran (factory graph)
        # Rejected first: the kept shard's presence is the completion marker.
        if rejected:
            storage.write_parquet(pa.Table.from_pylist(rejected, schema=pa.schema([*REJECTED_SCHEMA, *scores])),
                                  self.out / "rejected" / name)
        # Run statistics that are not per-row columns travel in the shard file's metadata, so
        # the manifest can be rebuilt from the files on disk alone.
        truncated = sum(int(r.get(S.PROMPT_TRUNCATED) or 0) for r in rows)
        stats = {STAT_PROMPTS_TRUNCATED: str(truncated)}
        table = pa.Table.from_pylist(kept, schema=pa.schema([*S.DATASET_SCHEMA, *scores]).with_metadata(stats))
        storage.write_parquet(table, self.out / "shards" / name)
        self.written.append(shard)
        record = {"shard": shard, "kept": len(kept), "rejected": len(rejected),
                  "filtered": sum(drop_code(r[S.DROP_REASON]) in S.FILTER_REASONS for r in rejected),
                  "truncated": truncated}
        if self.after_write:
            self.after_write(len(self.written))
        return record


def score_fields(rows: list[dict[str, Any]]) -> list[pa.Field]:
    """A float64 field per ``score_*`` key of ``rows`` (NaN, a row not scored, becomes null),
    then a field per graph-specific column (``schema.EXTRA_COLUMNS``) the rows carry."""
    names = sorted({k for r in rows for k in r if k.startswith(S.SCORE_PREFIX)})
    for r in rows:
        for k in names:
            v = r.get(k)
            if isinstance(v, float) and v != v:
                r[k] = None
    extra = sorted({k for r in rows for k in r if k in S.EXTRA_COLUMNS})
    return [pa.field(k, pa.float64()) for k in names] + [pa.field(k, S.EXTRA_COLUMNS[k]) for k in extra]


def prepare_output(out: Location | str | os.PathLike, config_hash: str, resolved: dict[str, Any],
                   overwrite: bool) -> set[int]:
    """Check the output belongs to this config (or holds no shard yet); clear partial files;
    return complete shards."""
    out = storage.resolve(out, "output.path")
    storage.check_writable_root(out)
    for sub in ("shards", "rejected"):
        storage.makedirs(out / sub)
    stamp = out / "config.json"
    if storage.exists(stamp):
        previous = json.loads(storage.read_text(stamp)).get("config_hash")
        if previous != config_hash:
            # a run that stopped before its first shard (e.g. a config error) has nothing to protect
            made = any(f.name.startswith("part-") for f in storage.listdir(out / "shards", ".parquet"))
            if made and not overwrite:
                raise OutputConflict(
                    f"{out} holds a dataset made with another config (hash {previous}, this one "
                    f"{config_hash}); choose another output.path or pass output.overwrite=true")
            for sub in ("shards", "rejected"):
                for f in storage.listdir(out / sub, ".parquet"):
                    storage.remove(f)
            storage.remove(out / "manifest.json")
    storage.write_text(stamp, json.dumps({"config_hash": config_hash, "config": resolved}, indent=2, sort_keys=True))
    for sub in ("shards", "rejected"):  # partial files of a killed run (file systems only)
        for info in storage.iter_file_infos(out / sub, recursive=False):
            if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                out.fs.delete_file(info.path)
    return complete_shards(out, config_hash)


def complete_shards(out: Location, config_hash: str) -> set[int]:
    """Shards of this config whose file exists (the kept shard file is the completion marker)."""
    prefix = f"part-{config_hash}-"
    return {int(f.name[len(prefix):-len(".parquet")])
            for f in storage.listdir(out / "shards", ".parquet") if f.name.startswith(prefix)}


def summarize_output(out: Location | str | os.PathLike) -> dict[str, Any]:
    """Counts read back from the files (the manifest is rebuilt from these)."""
    out = storage.resolve(out, "output.path")
    shards, per_method = [], Counter()
    truncated = 0
    for f in storage.listdir(out / "shards", ".parquet"):
        if not f.name.startswith("part-"):
            continue
        truncated += int((pq.read_schema(f.path, filesystem=f.fs).metadata or {})
                         .get(STAT_PROMPTS_TRUNCATED.encode(), 0))
        methods = pq.read_table(f.path, columns=[S.METHOD], filesystem=f.fs).column(S.METHOD).to_pylist()
        per_method.update(methods)
        shards.append({"file": f"shards/{f.name}", "rows": len(methods)})
    drops = Counter()
    rejected_files = []
    for f in storage.listdir(out / "rejected", ".parquet"):
        if not f.name.startswith("part-"):
            continue
        reasons = pq.read_table(f.path, columns=[S.DROP_REASON], filesystem=f.fs).column(S.DROP_REASON).to_pylist()
        drops.update(drop_code(r) for r in reasons)
        rejected_files.append({"file": f"rejected/{f.name}", "rows": len(reasons)})
    kept = sum(per_method.values())
    rejected = sum(drops.values())
    filtered = sum(n for code, n in drops.items() if code in S.FILTER_REASONS)
    return {
        "rows": kept,
        "rejected_rows": rejected,
        "filtered_rows": filtered,
        "rows_per_method": dict(sorted(per_method.items())),
        "prompts_truncated": truncated,
        "drops_per_reason": dict(sorted(drops.items())),
        "shards": shards,
        "rejected_shards": rejected_files,
    }


def write_manifest(out: Location | str | os.PathLike, manifest: dict[str, Any]) -> Location:
    path = storage.resolve(out, "output.path") / "manifest.json"
    storage.write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path
