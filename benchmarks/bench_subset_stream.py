"""A small synthetic subset read for many epochs: one Ray Data read of every file per epoch
(what training once did) against one stream whose units are the subset's Parquet row groups,
read in the map tasks epoch after epoch (training.data.rank_stream now). Prints rows/s of each and their ratio, measured
in one run.

    python benchmarks/bench_subset_stream.py [--rows 3000] [--volume 250] [--epochs 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000, help="rows in the synthetic dataset")
    ap.add_argument("--volume", type=int, default=250, help="the subset trained on")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the subset the budget needs")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.training.conftest's writer
    import ray

    from core.config import load_config
    from core.runtime import init_ray
    from tests.training.conftest import write_synthetic
    from training.config import TrainConfig
    from training.data import _map, index_inputs, rank_stream, synthetic_spec
    from training.subsets import keep_rows, read_sample_ids, volume_threshold

    with tempfile.TemporaryDirectory() as tmp:
        syn = write_synthetic(Path(tmp) / "syn", n=args.rows, size=128, shards=max(1, args.rows // 700))
        real = Path(tmp) / "real"
        from pipelines.toy_data import make_toy_dataset

        make_toy_dataset(real, n_train=8, n_val=4, size=64, seed=0)
        cfg = load_config(TrainConfig, Path(__file__).parents[1] / "training" / "configs" / "toy.yaml", [
            f"real.path={real}", f"synthetic.paths=[{syn}]", f"synthetic.volume={args.volume}", "ray.show_progress=false"])
        init_ray(cfg.ray)
        src = index_inputs(cfg)
        need = args.volume * args.epochs
        threshold = volume_threshold(read_sample_ids(src.synthetic_files), args.volume)

        def rows_of(ds) -> int:
            return sum(len(b["pixel_values"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))

        def per_epoch_reads() -> int:  # a new execution per epoch, every file read each time
            n = 0
            for _ in range(args.epochs):
                ds = ray.data.read_parquet(src.synthetic_files, shuffle="files").map_batches(
                    keep_rows, batch_format="numpy", fn_kwargs={"threshold": threshold})
                n += rows_of(_map(ds.select_columns(["image", "mask"]), cfg, src.classes, source="bytes",
                                  train=True, synthetic=True))
            return n

        def one_stream() -> int:
            return rows_of(rank_stream(synthetic_spec(cfg, src, need, 1), cfg, 0, 1))

        timings = {}
        for name, fn in (("per-epoch Ray Data reads", per_epoch_reads), ("one stream of chunks", one_stream)):
            t = time.perf_counter()
            rows = fn()
            timings[name] = (rows, time.perf_counter() - t)
            print(f"{name:28s} {rows:6d} rows in {timings[name][1]:6.1f} s  {rows / timings[name][1]:7.1f} rows/s")
        (r0, t0), (r1, t1) = timings.values()
        print(f"ratio (one stream / per-epoch reads, rows/s): {(r1 / t1) / (r0 / t0):.2f}")


if __name__ == "__main__":
    main()
