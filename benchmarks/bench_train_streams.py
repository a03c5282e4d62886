"""The toy mixed recipe trained by two versions of this repo in one benchmark run: a base
commit (default: the one before per-rank row-group streams) on the synthetic dataset as it was
written then (one row group per shard), and the working tree on the same samples written as
now (bounded row groups, ``output.row_group_rows``), ≥ 8 shards. Prints each one's read
amplification (compressed image + mask bytes one epoch reads ÷ bytes of the rows it uses, from
the Parquet footers; the base read a whole row group per 64-row slice — its 512 MB cache aside,
which misses once a dataset outgrows it), median steps/s, data-wait, wall time and val mIoU, and
their ratios. With --reruns N the working tree's run is repeated N times with the same seed: the
spread of val mIoU is what two runs of one sweep trial disagree by.

    python benchmarks/bench_train_streams.py [--base f742911] [--iterations 300] [--reruns 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` as files (git archive: nothing added to the repository)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def train(tree: Path, run: Path, real: Path, syn: Path, iterations: int, seed: int) -> dict:
    """One `segfactory train` of ``tree``'s code (its own process and Ray instance)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", "from segfactory.cli import main; raise SystemExit(main())", "train",
           "--config", str(tree / "training" / "configs" / "toy.yaml"), f"real.path={real}", f"synthetic.paths=[{syn}]",
           "strategy=mix", "p_aug=0.6", f"iterations={iterations}", f"eval_interval={iterations}", f"seed={seed}",
           f"output.path={run}", "ray.show_progress=false"]
    t0 = time.time()
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = json.loads((run / "final.json").read_text())
    final["process_s"] = time.time() - t0
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="f742911", help="git revision to compare against")
    ap.add_argument("--iterations", type=int, default=300, help="training steps per run")
    ap.add_argument("--reruns", type=int, default=1, help="runs of the working tree with the same seed")
    ap.add_argument("--skip-base", action="store_true", help="only the working tree (rerun spread)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generate
    from pipelines.toy_data import make_toy_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = make_toy_dataset(tmp / "real", n_train=40, n_val=50, size=128, seed=0)
        layouts = {"base": 1 << 20, "now": 32}  # rows per row group: one per shard (before), bounded (now)
        for name, group_rows in layouts.items():
            run_generate(load_config(GenerateConfig, ROOT / "pipelines" / "configs" / "seggen-toy.yaml", [
                f"source.path={real}", f"output.path={tmp / ('syn-' + name)}", "imgsyn.samples_per_source=10",
                "masksyn.samples_per_caption=10", "output.rows_per_shard=5", f"output.row_group_rows={group_rows}",
                "ray.show_progress=false"]))
        from training.data import _shard_files
        from training.epochs import plan_chunks, read_amplification

        amplification = {name: read_amplification(plan_chunks(_shard_files(str(tmp / f"syn-{name}")),
                                                              cap=64 if name == "base" else 1024, warn=False)[0])
                         for name in layouts}
        shards = len(_shard_files(str(tmp / "syn-now")))
        import ray

        ray.shutdown()  # each training run starts its own Ray
        results = {}
        if not args.skip_base:
            results["base"] = [train(export(args.base, tmp / "base"), tmp / "run-base", real, tmp / "syn-base",
                                     args.iterations, 0)]
        results["now"] = [train(ROOT, tmp / f"run-now-{i}", real, tmp / "syn-now", args.iterations, 0)
                          for i in range(args.reruns)]
        print(f"synthetic: {shards} shards")
        for name, finals in results.items():
            for f in finals:
                print(f"{name:5s} read amplification {amplification[name]:5.2f}  {f['steps_per_s']:6.2f} steps/s (median of "
                      f"logged)  data-wait {f['data_wait_fraction']:6.1%}  wall {f['wall_s']:6.1f} s  val mIoU {f['miou']:.4f}")
        now = results["now"][0]
        if "base" in results:
            base = results["base"][0]
            print(f"ratio (now / base): steps/s {now['steps_per_s'] / base['steps_per_s']:.2f}, "
                  f"data-wait {now['data_wait_fraction'] / max(base['data_wait_fraction'], 1e-9):.2f}, "
                  f"wall {now['wall_s'] / base['wall_s']:.2f}")
        if len(results["now"]) > 1:
            mious = [f["miou"] for f in results["now"]]
            print(f"rerun spread (same seed, {len(mious)} runs): max - min val mIoU = {max(mious) - min(mious):.4f}")


if __name__ == "__main__":
    main()
