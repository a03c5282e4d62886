"""SegGen captions the source images that have no caption with the captioner pool (BLIP-2 and
its question); rows with a caption in captions.jsonl keep it and skip the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from pipelines.graphs.seggen.expand import expand_sources
from pipelines.graphs.seggen.plan import load_uncaptioned
from pipelines.source_index import index_source
from pipelines.sources import caption_from_mask, load_pixels

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "seggen-tiny.yaml"


def _rows(src: Path, n: int):
    index = index_source(src, "voc")
    return index, sorted(index.rows, key=lambda r: r[S.SOURCE_ID])[:n]


def test_load_uncaptioned_reads_only_rows_without_a_caption(toy_source, tmp_path):
    index, rows = _rows(toy_source, 3)
    batch = {k: np.array([r.get(k) for r in rows], dtype=object) for k in rows[0]}
    batch[S.CAPTION] = np.array(["a given caption", "", ""], dtype=object)
    batch[S.SOURCE_PATH] = np.array([rows[0][S.SOURCE_PATH], rows[1][S.SOURCE_PATH], str(tmp_path / "gone.jpg")],
                                    dtype=object)
    batch[S.SHARD] = np.zeros(3, np.int64)
    out = load_uncaptioned(batch, source_format="voc", num_classes=len(index.classes))
    image, _ = load_pixels(rows[1], "voc", len(index.classes))
    assert out[S.IMAGE_RAW][0] == b"" and out[S.IMAGE_RAW][1] == image.tobytes()
    assert (out[S.HEIGHT][1], out[S.WIDTH][1]) == image.shape[:2]
    assert out[S.DROP_REASON][0] == out[S.DROP_REASON][1] == "" and "gone.jpg" in out[S.DROP_REASON][2]
    # the dropped row stays one rejected row through expand, with its reason
    expanded = expand_sources(out, copies={"imgsyn": 2, "masksyn": 0}, seed=0, source_format="voc",
                              classes=index.classes, background=0, mask_dtype="|u1")
    assert list(expanded[S.SAMPLE_ID]).count(f"{rows[2][S.SOURCE_ID]}/source") == 1
    assert expanded[S.DROP_REASON][-1] == out[S.DROP_REASON][2]
    assert expanded[S.CAPTION][0] == "a given caption"


def test_seggen_run_captions_with_the_tiny_blip2(ray_local, toy_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(toy_source, src)
    index, rows = _rows(src, 2)
    given = rows[0][S.SOURCE_ID]
    (src / "captions.jsonl").write_text(json.dumps({"id": given, "caption": "a caption from the source"}) + "\n")
    cfg = load_config(GenerateConfig, CONFIG, [
        f"source.path={src}", f"output.path={tmp_path / 'out'}", "source.limit=2", "pipeline=imgsyn",
        "captions=captioner", "captioner.kind=blip2", "captioner.max_new_tokens=4", "captioner.min_new_tokens=2",
        "captioner.resources.num_cpus=0.5", "ray.show_progress=false"])
    result = run_generate(cfg)
    assert any("captioner" in stage.split(" + ") for stage in result.manifest["timings"]["stage_busy_s"])
    df = pd.read_parquet(tmp_path / "out" / "shards")
    assert len(df) == 2 and result.manifest["rejected_rows"] == 0
    captions = dict(zip(df[S.SOURCE_ID], df[S.CAPTION], strict=True))
    assert captions[given] == "a caption from the source"
    for row in rows[1:]:
        _, mask = load_pixels(row, "voc", len(index.classes))
        caption = captions[row[S.SOURCE_ID]]
        assert caption and caption != caption_from_mask(mask, index.classes, 0)  # the model's, not the template
