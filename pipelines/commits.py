"""Commit records: a shard is complete only when its commit record says so.

A writer writes a shard's file (and its rejected rows), reads the file's footer and sample ids
back, and only then writes a small JSON record ``_commits/part-<hash>-<shard>.json``: rows,
bytes, row groups, a hash of the sample ids, counts per method and per drop reason. Why a
record and not "the object exists": on an object store a failed multipart upload can still
leave an object behind when the stream is closed (apache/arrow#40502), and a file system can
hold a half-renamed temp; neither has a record, so neither counts, and a rerun removes them.

Everything that asks "what is done" reads records: resume (one listing), the manifest and
``inspect`` (one listing + the small records, read in parallel), never every shard.
``_commits`` starts with ``_`` so pyarrow/Ray Data dataset discovery skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core import schema as S
from core import storage
from core.storage import Location, StorageError

log = logging.getLogger(__name__)

COMMITS = "_commits"
STAGING = ".staging"  # rows of unfinished shards (pipelines.writer); hidden from readers
READ_THREADS = 32  # parallel small reads (records, footers): latency-bound on object stores
RECORD_KEYS = ("shard", "config_hash", "file", "rows", "sample_ids", "rows_per_method", "drops_per_reason",
               "rejected_rows", "filtered_rows", "prompts_truncated")


class CorruptCommit(StorageError):
    """A commit record that cannot be read or lacks keys (exit 2, naming the file)."""


def shard_name(config_hash: str, shard: int) -> str:
    return f"part-{config_hash}-{shard:05d}.parquet"


def commit_path(out: Location, config_hash: str, shard: int) -> Location:
    return out / COMMITS / shard_name(config_hash, shard).replace(".parquet", ".json")


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 over the sample ids in file order (one per line): what the footer check compares."""
    h = hashlib.sha256()
    for sid in ids:
        h.update(sid.encode())
        h.update(b"\n")
    return h.hexdigest()


def verify_parquet(loc: Location, rows: int, digest: str) -> dict[str, int]:
    """Read back a written file's footer and sample ids; raise if they differ from what was
    written (a truncated or partial object). Returns its size and row-group count."""
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        if meta.num_rows != rows:
            raise OSError(f"{loc.uri}: footer says {meta.num_rows} rows, {rows} were written")
        got = ids_digest(pf.read(columns=[S.SAMPLE_ID]).column(S.SAMPLE_ID).to_pylist())
        if got != digest:
            raise OSError(f"{loc.uri}: its sample ids differ from those written")
        return {"bytes": int(f.size()), "row_groups": meta.num_row_groups}


def write_commit(out: Location, record: dict[str, Any]) -> None:
    """The shard's commit point: one small atomic write, after its files were verified."""
    storage.write_text(commit_path(out, record["config_hash"], record["shard"]),
                       json.dumps(record, sort_keys=True))


def commit_record_of_rejects(loc: Location, config_hash: str, table) -> str:
    """The record of a file of rejected rows that belongs to no shard (the source index's
    problems): verified like a shard's, counted by the summary, no kept rows."""
    ids = table.column(S.SAMPLE_ID).to_pylist()
    verify_parquet(loc, len(ids), ids_digest(ids))
    drops = Counter(r.split(":", 1)[0] for r in table.column(S.DROP_REASON).to_pylist())
    return json.dumps({"shard": None, "config_hash": config_hash, "file": None, "rows": 0, "sample_ids": None,
                       "rows_per_method": {}, "drops_per_reason": dict(sorted(drops.items())),
                       "rejected_file": f"rejected/{loc.name}", "rejected_rows": len(ids), "filtered_rows": 0,
                       "prompts_truncated": 0}, sort_keys=True)


def committed_shards(out: Location, config_hash: str) -> set[int]:
    """Shards of this config with a commit record: one listing, no reads."""
    prefix = f"part-{config_hash}-"
    names = (f.name[len(prefix):-len(".json")] for f in storage.listdir(out / COMMITS, ".json")
             if f.name.startswith(prefix))
    return {int(n) for n in names if n.isdigit()}


def complete_shards(out: Location, config_hash: str) -> set[int]:
    """Committed shards whose shard file is still there (two listings, no reads): a record
    whose file was deleted by hand no longer counts, and :func:`remove_uncommitted` drops it."""
    present = {f.name for f in storage.listdir(out / "shards", ".parquet")}
    return {s for s in committed_shards(out, config_hash) if shard_name(config_hash, s) in present}


def _read_record(loc: Location) -> dict[str, Any]:
    try:
        record = json.loads(storage.read_text(loc))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCommit(f"{loc.uri}: corrupt commit record ({e}); delete it and rerun to redo its shard") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise CorruptCommit(f"{loc.uri}: corrupt commit record (no {', '.join(missing)}); "
                            "delete it and rerun to redo its shard")
    return record


def read_commits(out: Location, threads: int = READ_THREADS) -> list[dict[str, Any]]:
    """Every commit record under ``out`` (one listing, reads in parallel), sorted by file."""
    files = storage.listdir(out / COMMITS, ".json")
    if not files:
        return []
    with ThreadPoolExecutor(min(threads, len(files))) as pool:
        return sorted(pool.map(_read_record, files), key=lambda r: (r["file"] or "", r.get("rejected_file") or ""))


def committed_shard_files(out: Location) -> list[Location]:
    """The kept shard files the commit records name (what readers of a dataset should read)."""
    return [out / r["file"] for r in read_commits(out) if r["file"]]


def shard_files_to_read(out: Location) -> list[Location]:
    """The shard files a reader of the dataset at ``out`` should read: those its commit records
    name (never a stopped run's partial file); a dataset written before commit records has none,
    so its ``shards/`` listing stands in."""
    if storage.is_dir(out / COMMITS):
        return committed_shard_files(out)
    return storage.listdir(out / "shards", ".parquet")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's counts, from commit records alone."""
    per_method, drops = Counter(), Counter()
    for r in records:
        per_method.update(r["rows_per_method"])
        drops.update(r["drops_per_reason"])
    return {
        "rows": sum(r["rows"] for r in records),
        "rejected_rows": sum(r["rejected_rows"] for r in records),
        "filtered_rows": sum(r["filtered_rows"] for r in records),
        "rows_per_method": dict(sorted(per_method.items())),
        "prompts_truncated": sum(r["prompts_truncated"] for r in records),
        "drops_per_reason": dict(sorted(drops.items())),
        "shards": [{"file": r["file"], "rows": r["rows"]} for r in records if r["file"]],
        "rejected_shards": [{"file": r["rejected_file"], "rows": r["rejected_rows"]}
                            for r in records if r.get("rejected_file")],
    }


def summarize_output(out: Location | str) -> dict[str, Any]:
    """Counts of a dataset from its commit records (what the manifest is rebuilt from)."""
    return summarize(read_commits(storage.resolve(out, "output.path")))


def adopt_legacy_shards(out: Location, config_hash: str) -> int:
    """Give records to the shards of an output written before commit records existed (no record
    and no staged row of this config at all), so upgrading does not redo or delete a dataset.
    Each file is read back whole (its footer, ids, methods; its rejected file's reasons); one
    that does not read is left uncommitted, for :func:`remove_uncommitted`. Returns records written."""
    if committed_shards(out, config_hash) or storage.listdir(out / STAGING / config_hash, recursive=True):
        return 0
    prefix = f"part-{config_hash}-"
    files = [f for f in storage.listdir(out / "shards", ".parquet") if f.name.startswith(prefix)
             and f.name[len(prefix):-len(".parquet")].isdigit()]
    if not files:
        return 0

    def adopt(f: Location) -> bool:
        try:
            write_commit(out, _legacy_record(out, f, config_hash, int(f.name[len(prefix):-len(".parquet")])))
            return True
        except Exception as e:  # noqa: BLE001 - an unreadable file is simply not adopted
            log.warning("%s: not adopted (%s); it is made again", f, e)
            return False

    with ThreadPoolExecutor(min(READ_THREADS, len(files))) as pool:
        adopted = sum(pool.map(adopt, files))
    log.info("%s: %d shard(s) written before commit records were given one", out, adopted)
    return adopted


def _legacy_record(out: Location, f: Location, config_hash: str, shard: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(f.path, columns=[S.SAMPLE_ID, S.METHOD], filesystem=f.fs)
    meta = pq.read_metadata(f.path, filesystem=f.fs)
    ids = table.column(S.SAMPLE_ID).to_pylist()
    truncated = int((pq.read_schema(f.path, filesystem=f.fs).metadata or {}).get(b"segfactory.prompts_truncated", 0))
    rejected = out / "rejected" / f.name
    reasons = pq.read_table(rejected.path, columns=[S.DROP_REASON], filesystem=rejected.fs).column(
        S.DROP_REASON).to_pylist() if storage.exists(rejected) else []
    drops = Counter(r.split(":", 1)[0] for r in reasons)
    return {"shard": shard, "config_hash": config_hash, "file": f"shards/{f.name}", "rows": len(ids),
            "sample_ids": ids_digest(ids), "bytes": storage.size(f), "row_groups": meta.num_row_groups,
            "rows_per_method": dict(sorted(Counter(table.column(S.METHOD).to_pylist()).items())),
            "drops_per_reason": dict(sorted(drops.items())), "rejected_file": f"rejected/{f.name}" if reasons else None,
            "rejected_rows": len(reasons), "filtered_rows": sum(drops[c] for c in S.FILTER_REASONS if c in drops),
            "prompts_truncated": truncated, "adopted": True}


def remove_uncommitted(out: Location, config_hash: str) -> int:
    """Delete what a stopped run left that no record commits: staged rows, shard and rejected
    files without a record, temp files. Returns how many files went (run under the lease)."""
    complete = complete_shards(out, config_hash)
    for shard in committed_shards(out, config_hash) - complete:
        log.warning("%s: shard %d is committed but its file is gone; it is made again", out, shard)
        storage.remove(commit_path(out, config_hash, shard))
    done = {shard_name(config_hash, s) for s in complete}
    removed = 0
    for sub in ("shards", "rejected"):
        for info in storage.iter_file_infos(out / sub, recursive=False):
            name = info.base_name
            stale = name.startswith(".") and name.endswith(".tmp")
            if name.endswith("-index.parquet"):  # the source index's rejects: rewritten by each run
                continue
            if stale or (name.startswith(f"part-{config_hash}-") and name.endswith(".parquet") and name not in done):
                out.fs.delete_file(info.path)
                removed += 1
    staging = out / STAGING
    if storage.exists(staging):
        removed += sum(1 for _ in storage.iter_file_infos(staging))
        storage.remove_tree(staging)
    if removed:
        log.info("removed %d uncommitted file(s) of an earlier run from %s", removed, out)
    return removed
