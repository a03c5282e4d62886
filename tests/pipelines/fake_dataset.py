"""A segfactory dataset written as the contract describes it, without a generation run
(shared by the export and HTML report tests)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core import schema as S

CLASSES = ["background", "circle", "square", "triangle"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root, classes=CLASSES, n_shards=2, rows=5, seed=0, scores=False) -> dict[str, np.ndarray]:
    """A segfactory dataset as the contract describes it (manifest + shards), made without a
    run: random masks with ignore pixels, ids with '/'. Returns sample_id -> mask."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    masks = {}
    for k in range(n_shards):
        recs = []
        for i in range(rows):
            sid = f"src_{k}_{i}/imgsyn/{i % 2}"
            mask = rng.integers(0, len(classes), (12, 16)).astype(np.uint8)
            mask[0, :3] = S.IGNORE_INDEX
            masks[sid] = mask
            recs.append({S.SAMPLE_ID: sid, S.SOURCE_ID: f"src_{k}_{i}", S.METHOD: "imgsyn", S.CAPTION: f"caption {i}",
                         S.PROMPT: f"prompt {i}", S.IMAGE: _png(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)),
                         S.MASK: _png(mask), S.HEIGHT: 12, S.WIDTH: 16, S.SEED: i, S.GENERATOR: "toy@0",
                         S.DROP_REASON: "", **({S.SCORE_PREFIX + "clip": float(rng.random())} if scores else {})})
        pq.write_table(pa.Table.from_pylist(recs), root / "shards" / f"part-abc-{k:05d}.parquet", row_group_size=3)
    palette = [[i * 40, 255 - i * 40, i * 20] for i in range(len(classes))]
    (root / "manifest.json").write_text(json.dumps({
        "config_hash": "abc", "config": {"pipeline": "seggen", "preset": "toy"}, "classes": classes,
        "palette": palette, "rows": n_shards * rows, "rejected_rows": 0, "rows_per_method": {"imgsyn": n_shards * rows},
        "drops_per_reason": {}, "shards": [], "versions": {}}))
    return masks
