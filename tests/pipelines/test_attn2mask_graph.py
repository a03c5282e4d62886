"""The attn2mask graph end to end on the tiny preset, through the command line, on the session's
local Ray: a valid dataset (shards + manifest, resumable) that a segmentation run trains on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import schema as S

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pipelines" / "configs" / "attn2mask-tiny.yaml"
TRAIN_CONFIG = ROOT / "training" / "configs" / "toy.yaml"


@pytest.mark.slow
def test_cli_generate_attn2mask_tiny_then_train_on_it(ray_local, toy_source, tmp_path):
    from segfactory.cli import main

    out = tmp_path / "attn"
    args = ["generate", "--config", str(CONFIG), f"source.path={toy_source}", "source.format=voc",
            f"output.path={out}", "source.limit=6", "attn2mask.samples_per_source=2", "ray.show_progress=false"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kept, rejected = manifest["rows"], manifest["rejected_rows"]
    assert kept + rejected == 12 and kept > 0
    assert set(manifest["drops_per_reason"]) <= {S.NO_RELIABLE_FOREGROUND}
    assert manifest["rows_per_method"] == {"attn2mask": kept}

    df = pd.read_parquet(out / "shards")
    assert len(df) == kept and (df[S.METHOD] == "attn2mask").all() and (df[S.GENERATOR] == "tiny-random").all()
    assert df[S.SAMPLE_ID].is_unique
    n_classes = len(manifest["classes"])
    for _, row in df.iterrows():
        image = np.array(Image.open(io.BytesIO(row[S.IMAGE])))
        mask = np.array(Image.open(io.BytesIO(row[S.MASK])))
        assert image.shape == (row[S.HEIGHT], row[S.WIDTH], 3) == (64, 64, 3)
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= set(range(n_classes)) | {255}
        assert row[S.SCORE_RELIABLE_FRACTION] == pytest.approx((mask != 255).mean(), abs=1e-9)
        assert row[S.SCORE_RELIABLE_FOREGROUND] == pytest.approx(((mask != 255) & (mask != 0)).mean(), abs=1e-9)
        assert row[S.SCORE_RELIABLE_FOREGROUND] > 0
    # a rerun finds every shard complete and does no work
    shards = sorted(p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet"))
    assert main(args) == 0
    assert sorted(p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")) == shards

    run = tmp_path / "run"
    train = ["train", "--config", str(TRAIN_CONFIG), f"real.path={toy_source}", "real.format=voc",
             f"synthetic.paths=[{out}]", "strategy=synthetic_only", f"output.path={run}", "iterations=6",
             "batch_size=2", "eval_interval=6", "log_interval=3", "eval_batch_size=10", "aug.crop_size=48",
             "eval.short_side=64", "data.transform_batch_size=4",
             "ray.no_progress_timeout_s=240"]
    assert main(train) == 0
    final = json.loads((run / "final.json").read_text())
    assert 0.0 <= final["miou"] <= 1.0
