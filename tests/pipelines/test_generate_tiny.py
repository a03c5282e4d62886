"""The same SegGen graph with the `tiny` preset: real diffusers SDXL + SDXL-ControlNet classes
(random tiny weights) in Ray actor pools on a local Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from pipelines.source_index import index_source
from pipelines.sources import load_pixels

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "seggen-tiny.yaml"


def test_tiny_preset_runs_the_real_diffusers_graph(ray_local, toy_source, tmp_path):
    out = tmp_path / "tiny"
    cfg = load_config(GenerateConfig, CONFIG, [f"source.path={toy_source}", f"output.path={out}",
                                               "source.limit=3", "ray.show_progress=false"])
    result = run_generate(cfg)
    m = result.manifest
    assert m["rows_per_method"] == {"imgsyn": 3, "masksyn": 3} and m["rejected_rows"] == 0
    stages = " ".join(m["timings"]["stage_busy_s"])
    assert "expand + text2mask" in stages and "colorize + mask2img" in stages  # plan names, fused by Ray

    df = pd.read_parquet(out / "shards")
    assert (df[S.GENERATOR] == "tiny-random").all()
    index = index_source(toy_source, "voc")
    rows = {r[S.SOURCE_ID]: r for r in index.rows}
    for _, row in df.iterrows():
        image = np.array(Image.open(io.BytesIO(row[S.IMAGE])))
        mask = np.array(Image.open(io.BytesIO(row[S.MASK])))
        assert image.shape == (row[S.HEIGHT], row[S.WIDTH], 3)
        assert mask.shape == (row[S.HEIGHT], row[S.WIDTH])
        assert set(np.unique(mask)) <= set(range(len(index.classes))) | {255}
        if row[S.METHOD] == "imgsyn":  # ImgSyn: the human mask, pixel for pixel, image at its size
            _, source_mask = load_pixels(rows[row[S.SOURCE_ID]], "voc", len(index.classes))
            assert np.array_equal(mask, source_mask)
        else:  # MaskSyn: drawn by Text2Mask at its generation size (64 px in this config)
            assert max(row[S.HEIGHT], row[S.WIDTH]) >= 56
