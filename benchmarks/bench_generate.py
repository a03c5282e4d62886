"""Samples/s of the SegGen graph per preset on this machine, measured in one run.

    .venv/bin/python benchmarks/bench_generate.py [--rows 24] [--presets toy,tiny]

Prints one line per preset and the throughput ratio to the first preset (machines here are
noisy: compare ratios from the same run, not absolute numbers across runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from core.config import load_config
from core.runtime import init_ray
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from pipelines.toy_data import make_toy_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def bench(preset: str, source: Path, out: Path, rows: int) -> dict:
    cfg = load_config(GenerateConfig, CONFIGS / f"seggen-{preset}.yaml", [
        f"source.path={source}", f"output.path={out}", f"source.limit={rows}", "ray.show_progress=false"])
    start = time.perf_counter()
    result = run_generate(cfg)
    wall = time.perf_counter() - start
    m = result.manifest
    return {"preset": preset, "samples": m["rows"], "wall_s": round(wall, 2),
            "samples_per_s": round(m["rows"] / wall, 3), "stage_busy_s": m["timings"]["stage_busy_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="source rows per preset")
    parser.add_argument("--presets", default="toy,tiny")
    args = parser.parse_args()
    init_ray(None, num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_toy_dataset(Path(tmp) / "src", n_train=args.rows, n_val=1, size=64)
        results = [bench(p, source, Path(tmp) / p, args.rows) for p in args.presets.split(",")]
    base = results[0]["samples_per_s"]
    for r in results:
        print(f"{r['preset']:<12} {r['samples']:>5} samples  {r['wall_s']:>7.1f} s  "
              f"{r['samples_per_s']:>8.3f} samples/s  ratio to {results[0]['preset']}: "
              f"{r['samples_per_s'] / base:.3f}")
        print(f"{'':<12} stage busy s: {json.dumps(r['stage_busy_s'])}")


if __name__ == "__main__":
    main()
