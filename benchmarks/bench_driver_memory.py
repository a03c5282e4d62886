"""Driver peak RSS of the toy graph at two sizes (>= 10x apart), and toy samples/s before/after.

    .venv/bin/python benchmarks/bench_driver_memory.py [--small 2000] [--large 20000] [--old-tree DIR]

Each run is a fresh process with its own 2-CPU Ray; the driver's peak RSS is that process's
``ru_maxrss`` (Ray's workers are other processes). Prints the large/small RSS ratio (target
<= 1.2: nothing on the driver grows with samples). With ``--old-tree`` (an export of an older
commit, e.g. ``git -C /work/main archive HEAD | tar -x -C DIR``) it also runs the small size
with that code at the large size (where start-up matters least) and prints samples/s new/old,
measured in this one run.

Measured on the 2-core build machine (shared, load ~70), ``--small 1000 --large 10000``: driver
peak RSS 246.8 MB vs 259.9 MB, ratio 1.053; toy 70.33 samples/s vs the previous driver-writer
code's 69.81 at 10000 samples (new/old 1.007; the old driver peaked at 268.8 MB there). An earlier
300/3000 run: ratio 1.053 too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One generation in this process; prints a JSON line. Run with cwd = the code tree to measure.
CHILD = r"""
import json, resource, sys, time
from pipelines.config import GenerateConfig
from core.config import load_config
from pipelines.generate import run_generate
from core.runtime import init_ray
src, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(GenerateConfig, "pipelines/configs/seggen-toy.yaml", [
    f"source.path={src}", f"output.path={out}", f"source.limit={rows}", "output.rows_per_shard=64",
    "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1", "toy.resolution=32",
    "ray.show_progress=false"])
init_ray(cfg.ray, num_cpus=2)
t = time.perf_counter()
m = run_generate(cfg).manifest
wall = time.perf_counter() - t
print(json.dumps({"samples": m["rows"], "wall_s": round(wall, 2), "samples_per_s": round(m["rows"] / wall, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def run(tree: Path, source: Path, out: Path, arg: int | str, child: str = CHILD) -> dict:
    """``child`` in a fresh process with ``tree``'s code; its last stdout line (JSON)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", child, str(source), str(out), str(arg)], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{tree}: run failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="samples of the small run")
    parser.add_argument("--large", type=int, default=20000, help="samples of the large run (>= 10x small)")
    parser.add_argument("--old-tree", type=Path, default=None, help="older code to compare samples/s with")
    args = parser.parse_args()
    from pipelines.toy_data import make_toy_dataset

    with tempfile.TemporaryDirectory() as tmp:
        rows_large = args.large // 2  # one ImgSyn + one MaskSyn sample per source row
        source = make_toy_dataset(Path(tmp) / "src", n_train=rows_large, n_val=1, size=32, seed=0)
        small = run(ROOT, source, Path(tmp) / "small", args.small // 2)
        large = run(ROOT, source, Path(tmp) / "large", rows_large)
        print(f"driver peak RSS: {small['samples']} samples {small['peak_rss_mb']} MB, "
              f"{large['samples']} samples {large['peak_rss_mb']} MB, "
              f"ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} (target <= 1.2)")
        print(f"toy samples/s: {small['samples_per_s']} ({small['samples']} samples), "
              f"{large['samples_per_s']} ({large['samples']} samples)")
        if args.old_tree:  # old, new, old: the load of a shared machine drifts; best of each
            old = run(args.old_tree, source, Path(tmp) / "old1", rows_large)
            large = _best(large, run(ROOT, source, Path(tmp) / "new2", rows_large))
            old = _best(old, run(args.old_tree, source, Path(tmp) / "old2", rows_large))
            print(f"old code ({args.old_tree}): {old['samples_per_s']} samples/s, driver peak RSS "
                  f"{old['peak_rss_mb']} MB at {old['samples']} samples; new {large['samples_per_s']} samples/s; "
                  f"samples/s new/old {large['samples_per_s'] / old['samples_per_s']:.3f} (best of 2 each)")


def _best(*runs: dict) -> dict:
    return max(runs, key=lambda r: r["samples_per_s"])


if __name__ == "__main__":
    main()
