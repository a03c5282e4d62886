"""The SegGen graph end to end with the toy preset on a local Ray: contract, determinism, resume."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from pipelines.source_index import index_source
from pipelines.sources import load_pixels
from pipelines.writer import OutputConflict

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "seggen-toy.yaml"


def toy_cfg(source: Path, out: Path, *extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, CONFIG, [
        f"source.path={source}", f"output.path={out}", "source.limit=12", "output.rows_per_shard=4",
        "imgsyn.samples_per_source=2", "masksyn.samples_per_caption=2", "ray.show_progress=false", *extra])


def read_rows(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((out / "shards").glob("*.parquet"))], ignore_index=True)


@pytest.fixture(scope="module")
def toy_run(ray_local, toy_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    result = run_generate(toy_cfg(toy_source, out))
    return result, out


def test_manifest_counts_and_contract(toy_run):
    result, out = toy_run
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_per_method"] == {"imgsyn": 24, "masksyn": 24}
    assert m["rows"] == 48 and m["rejected_rows"] == 0 and not result.over_limit
    assert [s["rows"] for s in m["shards"]] == [16, 16, 16]
    assert m["classes"][:2] == ["background", "circle"] and m["ignore_index"] == 255
    assert m["config_hash"] in m["shards"][0]["file"]
    df = read_rows(out)
    assert list(df.columns) == S.DATASET_SCHEMA.names
    assert df[S.SAMPLE_ID].is_unique
    assert set(df[S.DROP_REASON]) == {""}
    assert df[S.SAMPLE_ID].str.fullmatch(r"toy_train_\d{5}/(imgsyn|masksyn)/[01]").all()
    assert (df[S.GENERATOR] == "toy-mask2img@gap=0.3").all()


def test_images_and_masks_decode_at_the_recorded_size(toy_run):
    df = read_rows(toy_run[1])
    for _, row in df.iterrows():
        image = np.array(Image.open(io.BytesIO(row[S.IMAGE])))
        mask = np.array(Image.open(io.BytesIO(row[S.MASK])))
        assert image.shape == (row[S.HEIGHT], row[S.WIDTH], 3) and image.dtype == np.uint8
        assert mask.shape == (row[S.HEIGHT], row[S.WIDTH]) and mask.max() < 6
        assert image.std() > 1.0


def test_imgsyn_keeps_the_source_mask_exactly(toy_run, toy_source):
    df = read_rows(toy_run[1])
    index = index_source(toy_source, "voc")
    rows = {r[S.SOURCE_ID]: r for r in index.rows}
    imgsyn = df[df[S.METHOD] == "imgsyn"]
    assert len(imgsyn) == 24
    for _, row in imgsyn.iterrows():
        _, source_mask = load_pixels(rows[row[S.SOURCE_ID]], "voc", len(index.classes))
        assert np.array_equal(np.array(Image.open(io.BytesIO(row[S.MASK]))), source_mask)


def test_masksyn_carries_the_text2mask_mask(toy_run):
    from actors.toy_text2mask import ToyText2Mask

    df = read_rows(toy_run[1])
    masksyn = df[df[S.METHOD] == "masksyn"].head(4)
    batch = {k: masksyn[k].to_numpy() for k in (S.SAMPLE_ID, S.PROMPT, S.SEED, S.HEIGHT, S.WIDTH)}
    redrawn = ToyText2Mask(resolution=128)(batch)
    for i, (_, row) in enumerate(masksyn.iterrows()):
        expected = np.frombuffer(redrawn[S.MASK_RAW][i], np.uint8).reshape(row[S.HEIGHT], row[S.WIDTH])
        assert np.array_equal(np.array(Image.open(io.BytesIO(row[S.MASK]))), expected)
    # new masks, not copies of the source's
    src = df[(df[S.METHOD] == "imgsyn") & (df[S.SOURCE_ID] == masksyn.iloc[0][S.SOURCE_ID])].iloc[0]
    assert src[S.MASK] != masksyn.iloc[0][S.MASK]


def test_readable_by_ray_pyarrow_and_datasets(toy_run, ray_local):
    import datasets
    import ray

    out = toy_run[1]
    assert ray.data.read_parquet(str(out / "shards")).count() == 48
    assert pq.read_table(out / "shards").num_rows == 48
    hf = datasets.load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train")
    assert hf.num_rows == 48 and set(hf.column_names) == set(S.DATASET_SCHEMA.names)


def test_same_config_and_seed_give_identical_bytes_and_rerun_resumes(toy_run, toy_source, tmp_path):
    _, first = toy_run
    second = tmp_path / "again"
    run_generate(toy_cfg(toy_source, second))
    files = sorted(p.name for p in (first / "shards").glob("*.parquet"))
    assert files == sorted(p.name for p in (second / "shards").glob("*.parquet"))
    for name in files:
        assert (first / "shards" / name).read_bytes() == (second / "shards" / name).read_bytes()

    # a rerun regenerates only the missing shard, with the same bytes
    victim = second / "shards" / files[1]
    kept_mtime = (second / "shards" / files[0]).stat().st_mtime_ns
    victim.unlink()
    (second / "shards" / f".{files[2]}.tmp").write_bytes(b"partial")
    run_generate(toy_cfg(toy_source, second))
    assert victim.read_bytes() == (first / "shards" / files[1]).read_bytes()
    assert (second / "shards" / files[0]).stat().st_mtime_ns == kept_mtime
    assert not list((second / "shards").glob(".*.tmp"))


def test_other_seed_changes_images(toy_run, toy_source, tmp_path):
    run_generate(toy_cfg(toy_source, tmp_path / "s1", "seed=1"))
    a, b = read_rows(toy_run[1]), read_rows(tmp_path / "s1")
    assert (a[S.IMAGE] != b[S.IMAGE]).all()


def test_another_config_on_the_same_output_is_refused(toy_run, toy_source, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(toy_run[1], out)
    with pytest.raises(OutputConflict, match="another config"):
        run_generate(toy_cfg(toy_source, out, "seed=5"))
    result = run_generate(toy_cfg(toy_source, out, "seed=5", "output.overwrite=true"))
    assert result.manifest["rows"] == 48 and len(list((out / "shards").glob("*.parquet"))) == 3


def test_inspect_counts_frequencies_and_contact_sheet(toy_run, tmp_path, capsys):
    from segfactory.cli import main

    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(toy_run[1]), "--samples", "6", "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "rows: 48" in printed and "imgsyn     24" in printed
    shares = {line.split()[0]: float(line.split()[1]) for line in printed.splitlines()
              if line.startswith("  ") and line.split()[0] in ("background", "circle", "square")}
    assert shares["background"] > 0.3
    image = Image.open(sheet)
    # 6 samples: 3 rows of 2 (image | mask overlay) pairs, a caption line under each, a legend below
    assert image.format == "PNG" and image.size[0] == 4 * 160 and image.size[1] > 3 * (160 + 14)
    pixels = np.array(image)
    assert pixels.std() > 10  # real content, not a blank canvas
