"""End-of-run summary of an output with many committed shards on S3 (moto's server): before/after.

    .venv/bin/python benchmarks/bench_summary.py [--shards 10000] [--before-shards N]

Writes ``--shards`` small committed shards (a shard file, a rejected file for one in four, a
commit record each) to a bucket on a local moto S3 server, then times, in this one run:
before, the summary the driver used to make by opening every shard and rejected file in turn
(footer metadata + a column read per file); after, :func:`pipelines.commits.summarize_output`
(one listing of ``_commits/`` + the small records read in parallel). Both must give the same
counts. ``--before-shards`` times the old way on the first N shards only and scales it
linearly (it is a serial loop of per-file reads), for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> object:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[k] = v
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def write_output(uri: str, shards: int) -> None:
    """``shards`` committed shards of 4 kept rows (+ 1 rejected row in one shard of four)."""
    from core import schema as S
    from core import storage
    from pipelines.commits import ids_digest, write_commit
    from pipelines.writer import REJECTED_SCHEMA

    out = storage.resolve(uri)

    def one(shard: int) -> None:
        name = f"part-bench-{shard:05d}.parquet"
        ids = [f"s{shard}/imgsyn/{k}" for k in range(4)]
        kept = pa.table({S.SAMPLE_ID: ids, S.METHOD: ["imgsyn"] * 4, S.IMAGE: [b"x" * 64] * 4})
        storage.write_parquet(kept, out / "shards" / name)
        rejected = shard % 4 == 0
        if rejected:
            bad = pa.Table.from_pylist([{S.SAMPLE_ID: f"s{shard}/masksyn/0", S.DROP_REASON: "image_constant"}],
                                       schema=REJECTED_SCHEMA)
            storage.write_parquet(bad, out / "rejected" / name)
        write_commit(out, {"shard": shard, "config_hash": "bench", "file": f"shards/{name}", "rows": 4,
                           "sample_ids": ids_digest(ids), "rows_per_method": {"imgsyn": 4},
                           "drops_per_reason": {"image_constant": 1} if rejected else {},
                           "rejected_file": f"rejected/{name}" if rejected else None,
                           "rejected_rows": int(rejected), "filtered_rows": 0, "prompts_truncated": 0})

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(shards)))


def summarize_by_opening_every_file(uri: str, limit: int | None) -> dict:
    """The driver's summary before commit records (pipelines/writer.py before this change)."""
    from core import schema as S
    from core import storage

    out = storage.resolve(uri)
    per_method, drops, shards, truncated = Counter(), Counter(), 0, 0
    for sub, counter, col in (("shards", per_method, S.METHOD), ("rejected", drops, S.DROP_REASON)):
        files = storage.listdir(out / sub, ".parquet")
        for f in files[:limit] if sub == "shards" else [g for g in files if g.name <= files[:limit][-1].name]:
            if sub == "shards":
                truncated += int((pq.read_schema(f.path, filesystem=f.fs).metadata or {}).get(b"x", 0))
                shards += 1
            counter.update(pq.read_table(f.path, columns=[col], filesystem=f.fs).column(col).to_pylist())
    return {"rows": sum(per_method.values()), "rejected_rows": sum(drops.values()), "shards": shards}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--before-shards", type=int, default=None, help="time the old way on this many shards only")
    args = ap.parse_args()
    server = start_s3()
    try:
        from pyarrow import fs

        s3, _ = fs.FileSystem.from_uri("s3://bench?allow_bucket_creation=true")
        s3.create_dir("bench")
        uri = "s3://bench/out"
        t = time.perf_counter()
        write_output(uri, args.shards)
        print(f"wrote {args.shards} committed shards in {time.perf_counter() - t:.1f} s")
        from pipelines.commits import summarize_output

        t = time.perf_counter()
        after = summarize_output(uri)
        after_s = time.perf_counter() - t
        n_before = min(args.before_shards or args.shards, args.shards)
        t = time.perf_counter()
        before = summarize_by_opening_every_file(uri, n_before)
        before_s = (time.perf_counter() - t) * args.shards / n_before
        assert after["rows"] == 4 * args.shards and len(after["shards"]) == args.shards
        assert before["rows"] == 4 * n_before and before["shards"] == n_before
        print(json.dumps({"shards": args.shards, "before_s": round(before_s, 2),
                          "before_measured_on_shards": n_before, "after_s": round(after_s, 2),
                          "speedup": round(before_s / after_s, 1)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
