"""Writes the dataset contract: deterministic shards, rejected rows, the manifest.

A shard is a fixed range of source rows. Its rows are gathered as the stream delivers them
and written once every source row of the shard is accounted for (each source row says how
many rows it produces, kept or rejected). Files are written under a temporary name and
renamed, so a shard file on disk is always complete; a rerun skips shards that exist.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import schema as S
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


class ShardWriter:
    """Collects streamed rows per shard and writes each shard when it is complete."""

    def __init__(self, out: Path, config_hash: str, sources_per_shard: dict[int, int],
                 after_write: Callable[[int], None] | None = None):
        self.out = Path(out)
        self.after_write = after_write  # called with the count of shards written so far
        self.hash = config_hash
        self.expected_sources = sources_per_shard
        self.rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.seen: dict[int, Counter] = defaultdict(Counter)  # shard -> source_id -> rows seen
        self.siblings: dict[int, dict[str, int]] = defaultdict(dict)
        self.done_sources: dict[int, int] = defaultdict(int)
        self.written: list[int] = []
        for sub in ("shards", "rejected"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            shard, sid = int(row[S.SHARD]), row[S.SOURCE_ID]
            self.rows[shard].append(row)
            self.seen[shard][sid] += 1
            self.siblings[shard][sid] = int(row[SIBLINGS])
            if self.seen[shard][sid] == self.siblings[shard][sid]:
                self.done_sources[shard] += 1
                if self.done_sources[shard] == self.expected_sources[shard]:
                    self._write(shard)

    def pending(self) -> list[int]:
        """Shards that never completed (a bug or a lost row: reported, never silently dropped)."""
        return sorted(s for s in self.expected_sources if s not in self.written)

    def _write(self, shard: int) -> None:
        rows = sorted(self.rows.pop(shard), key=lambda r: r[S.SAMPLE_ID])
        kept = [r for r in rows if not r[S.DROP_REASON]]
        rejected = [r for r in rows if r[S.DROP_REASON]]
        name = shard_name(self.hash, shard)
        scores = score_fields(rows)  # score_* columns of the filters that ran (factory graph)
        # Rejected first: the kept shard's presence is the completion marker.
        if rejected:
            _atomic_write(pa.Table.from_pylist(rejected, schema=pa.schema([*REJECTED_SCHEMA, *scores])),
                          self.out / "rejected" / name)
        # Run statistics that are not per-row columns travel in the shard file's metadata, so
        # the manifest can be rebuilt from the files on disk alone.
        stats = {STAT_PROMPTS_TRUNCATED: str(sum(int(r.get(S.PROMPT_TRUNCATED) or 0) for r in rows))}
        table = pa.Table.from_pylist(kept, schema=pa.schema([*S.DATASET_SCHEMA, *scores]).with_metadata(stats))
        _atomic_write(table, self.out / "shards" / name)
        self.written.append(shard)
        if self.after_write:
            self.after_write(len(self.written))


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


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def prepare_output(out: Path, config_hash: str, resolved: dict[str, Any], overwrite: bool) -> set[int]:
    """Check the output belongs to this config; clear partial files; return complete shards."""
    for sub in ("shards", "rejected"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    stamp = out / "config.json"
    if stamp.exists():
        previous = json.loads(stamp.read_text()).get("config_hash")
        if previous != config_hash:
            if not overwrite:
                raise OutputConflict(
                    f"{out} holds a dataset made with another config (hash {previous}, this one "
                    f"{config_hash}); choose another output.path or pass output.overwrite=true")
            for sub in ("shards", "rejected"):
                for f in (out / sub).glob("*.parquet"):
                    f.unlink()
            (out / "manifest.json").unlink(missing_ok=True)
    stamp.write_text(json.dumps({"config_hash": config_hash, "config": resolved}, indent=2, sort_keys=True))
    for leftover in out.glob("*/.*.tmp"):
        leftover.unlink()
    prefix = f"part-{config_hash}-"
    return {int(f.stem[len(prefix):]) for f in (out / "shards").glob(f"{prefix}*.parquet")}


def summarize_output(out: Path) -> dict[str, Any]:
    """Counts read back from the files on disk (the manifest is rebuilt from these)."""
    shards, per_method = [], Counter()
    truncated = 0
    for f in sorted((out / "shards").glob("part-*.parquet")):
        truncated += int((pq.read_schema(f).metadata or {}).get(STAT_PROMPTS_TRUNCATED.encode(), 0))
        methods = pq.read_table(f, columns=[S.METHOD]).column(S.METHOD).to_pylist()
        per_method.update(methods)
        shards.append({"file": f"shards/{f.name}", "rows": len(methods)})
    drops = Counter()
    rejected_files = []
    for f in sorted((out / "rejected").glob("part-*.parquet")):
        reasons = pq.read_table(f, columns=[S.DROP_REASON]).column(S.DROP_REASON).to_pylist()
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


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / "manifest.json"
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
