"""`segfactory export` throughput: the Ray Data stream against one process writing the same files.

    .venv/bin/python benchmarks/bench_export.py [--shards 8] [--rows 50] [--size 128] [--formats voc,coco,hf]

Writes a synthetic dataset in the contract's layout (random PNG images and masks), then per
format exports it once through Ray (the CLI's path: workers write, Ray already started so its
~5 s start-up is not counted) and once with a plain loop over the same per-shard function in
this process. Prints rows/s of each and their ratio (compare ratios from one run: the machines
here are shared and noisy). Also the time of the HTML report over the whole dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core import schema as S
from pipelines.export import export_dataset
from pipelines.export.writers import Target, _export_one

CLASSES = ["background", "a", "b", "c", "d", "e"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(root: Path, shards: int, rows: int, size: int) -> int:
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    for k in range(shards):
        recs = []
        for i in range(rows):
            mask = (rng.integers(0, len(CLASSES), (size // 16, size // 16)).repeat(16, 0).repeat(16, 1)).astype(np.uint8)
            recs.append({S.SAMPLE_ID: f"s{k}_{i}/imgsyn/0", S.SOURCE_ID: f"s{k}_{i}", S.METHOD: "imgsyn",
                         S.CAPTION: "c", S.PROMPT: "p", S.IMAGE: _png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                         S.MASK: _png(mask), S.SEED: i, S.GENERATOR: "toy"})
        pq.write_table(pa.Table.from_pylist(recs), root / "shards" / f"part-x-{k:05d}.parquet", row_group_size=64)
    palette = [[i * 40, 0, 255 - i * 40] for i in range(len(CLASSES))]
    (root / "manifest.json").write_text(json.dumps({"classes": CLASSES, "palette": palette, "rows": shards * rows,
                                                    "rejected_rows": 0, "shards": [], "config": {}}))
    return shards * rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=50, help="rows per shard")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--formats", default="voc,coco,hf")
    args = parser.parse_args()
    from core.runtime import init_ray
    from pipelines.export.run import join_parts

    init_ray()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        data = Path(tmp) / "ds"
        n = make_dataset(data, args.shards, args.rows, args.size)
        shards = sorted((data / "shards").iterdir())
        export_dataset(str(data), "folder", str(Path(tmp) / "warm-up"))  # Ray's workers start and import once
        for fmt in args.formats.split(","):
            out = Path(tmp) / f"ray-{fmt}"
            start = time.perf_counter()
            export_dataset(str(data), fmt, str(out))
            ray_s = time.perf_counter() - start
            loop_out = Path(tmp) / f"loop-{fmt}"
            start = time.perf_counter()
            target = Target(fmt, str(loop_out), json.loads((data / "manifest.json").read_text())["palette"], 0.0, CLASSES)
            for i, shard in enumerate(shards):
                _export_one(target, str(shard), i)
            join_parts(target, len(shards))
            loop_s = time.perf_counter() - start
            print(f"{fmt:<6} {n} rows: ray {n / ray_s:7.1f} rows/s ({ray_s:.1f} s)   one process {n / loop_s:7.1f} "
                  f"rows/s ({loop_s:.1f} s)   ratio ray/loop {loop_s / ray_s:.2f}")
            shutil.rmtree(out)
            shutil.rmtree(loop_out)
        from pipelines.html_report import dataset_report, render_html

        start = time.perf_counter()
        page = render_html(dataset_report(data))
        print(f"html report over {n} rows: {time.perf_counter() - start:.1f} s, {len(page) / 1e6:.1f} MB (120 cards)")


if __name__ == "__main__":
    main()
