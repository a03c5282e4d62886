"""A shard writer's peak RSS at two shard sizes 8x apart (target ratio <= 1.2), before/after.

    .venv/bin/python benchmarks/bench_writer_memory.py [--small 64] [--kb 256] [--out DIR]

Each measurement is a fresh process (its ``ru_maxrss``) that feeds one shard's rows, in blocks of
16 as the routing task would, to :class:`pipelines.writer.ShardWriter` (``row_group_rows`` 32),
each row carrying ``--kb`` KiB of incompressible image bytes. "after" is the writer as it is;
"before" holds a shard's rows until it is complete and writes them with one
``pq.write_table`` (one row group), as the writer did before bounded row groups. Prints the
peak RSS of each and the large/small ratios, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys
import pyarrow as pa, pyarrow.parquet as pq
from core import schema as S
from pipelines.stages import SIBLINGS
from pipelines.writer import ShardWriter
mode, n, kb, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def block(start, count):
    return pa.Table.from_pylist([{
        S.SAMPLE_ID: f"s{i:06d}/imgsyn/0", S.SOURCE_ID: f"s{i:06d}", S.METHOD: "imgsyn", S.CAPTION: "c",
        S.PROMPT: "c", S.IMAGE: os.urandom(kb * 1024), S.MASK: b"m" * 64, S.HEIGHT: 1, S.WIDTH: 1, S.SEED: i,
        S.GENERATOR: "g", S.DROP_REASON: "", S.SHARD: 0, SIBLINGS: 1, S.SOURCE_PATH: "", S.PROMPT_TRUNCATED: 0}
        for i in range(start, start + count)])

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "after":
    writer = ShardWriter(out, "bench", {0: n}, row_group_rows=32)
    for start in range(0, n, 16):
        writer.add(block(start, min(16, n - start)))
    assert writer.written == [0]
else:  # before: the whole shard held, then one write
    rows = []
    for start in range(0, n, 16):
        rows += block(start, min(16, n - start)).to_pylist()
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r[S.SAMPLE_ID]))
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "part.parquet"), compression="zstd")
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_mb": base / 1024}))
"""


def measure(mode: str, n: int, kb: int, out: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(kb), out], cwd=ROOT,
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=64, help="samples in the small shard (the large one: 8x)")
    ap.add_argument("--kb", type=int, default=256, help="KiB of image bytes per sample")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="bench-writer-")
    result = {}
    for mode in ("after", "before"):
        small = measure(mode, args.small, args.kb, f"{root}/{mode}-small")
        large = measure(mode, 8 * args.small, args.kb, f"{root}/{mode}-large")
        result[mode] = {"small_mb": round(small, 1), "large_mb": round(large, 1), "ratio": round(large / small, 3)}
    print(json.dumps({"samples": [args.small, 8 * args.small], "kb_per_sample": args.kb, **result}))


if __name__ == "__main__":
    main()
