"""Nothing lost: bad input quarantined per row, crashing actors, injected errors, exit 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from segfactory.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "seggen-toy.yaml"
CLASSES = ["background", "circle", "square", "triangle", "star", "ring"]


def toy_cfg(source: Path, out: Path, *extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, CONFIG, [
        f"source.path={source}", f"output.path={out}", "output.rows_per_shard=4", "ray.show_progress=false",
        "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1", *extra])


def _mask(h=32, w=32, value=1) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[8:24, 8:24] = value
    return Image.fromarray(m, mode="L")


def _image(mode: str = "RGB", h=32, w=32) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.random.default_rng(1).integers(0, 65535, (h, w), dtype=np.uint16))
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory) -> Path:
    """A folder source with one file of each bad kind, plus good files in odd image modes."""
    root = tmp_path_factory.mktemp("bad") / "src"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    good = {"good_rgb": ("RGB", "png"), "good_gray": ("L", "png"), "good_rgba": ("RGBA", "png"),
            "good_palette": ("P", "png"), "good_cmyk": ("CMYK", "jpg"), "good_16bit": ("I;16", "png")}
    for name, (mode, ext) in good.items():
        _image(mode).save(root / "images" / f"{name}.{ext}")
        _mask().save(root / "masks" / f"{name}.png")
    full = root / "images" / "truncated.png"
    _image().save(full)
    full.write_bytes(full.read_bytes()[:200])
    _mask().save(root / "masks" / "truncated.png")
    (root / "images" / "zero.png").write_bytes(b"")
    _mask().save(root / "masks" / "zero.png")
    _image().save(root / "images" / "nomask.png")
    _image().save(root / "images" / "wrongsize.png")
    _mask(16, 16).save(root / "masks" / "wrongsize.png")
    _image().save(root / "images" / "badclass.png")
    _mask(value=9).save(root / "masks" / "badclass.png")
    _image().save(root / "images" / "dup.png")
    _image().save(root / "images" / "dup.jpg")
    _mask().save(root / "masks" / "dup.png")
    for name in ("emptycap", "latin1cap", "longcap"):
        _image().save(root / "images" / f"{name}.png")
        _mask().save(root / "masks" / f"{name}.png")
    lines = [json.dumps({"id": "emptycap", "caption": " "}).encode(),
             '{"id": "latin1cap", "caption": "caf\u00e9"}'.encode("latin-1"),
             json.dumps({"id": "longcap", "caption": "word " * 1000}).encode(),
             json.dumps({"id": "good_rgb", "caption": "a photo of a circle"}).encode()]
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


EXPECTED_REASONS = {
    "truncated": "corrupt_image", "zero": "empty_image", "nomask": "missing_mask",
    "wrongsize": "mask_size_mismatch", "badclass": "class_out_of_range", "dup": "duplicate_id",
    "emptycap": "empty_caption", "latin1cap": "caption_not_utf8", "longcap": "caption_too_long",
}


def test_bad_input_is_quarantined_per_row_and_counted(ray_local, bad_source, tmp_path):
    out = tmp_path / "out"
    code = main(["generate", "--config", str(CONFIG), f"source.path={bad_source}", "source.format=folder", "source.split=null",
                 f"output.path={out}", "palette=auto", "ray.show_progress=false", "output.rows_per_shard=4",
                 "validation.max_rejected_fraction=1.0"])
    assert code == 0
    rejected = pd.read_parquet(out / "rejected")
    by_source = {}
    for _, row in rejected.iterrows():
        by_source.setdefault(row[S.SOURCE_ID], set()).add(row[S.DROP_REASON].split(":")[0])
    assert by_source == {k: {v} for k, v in EXPECTED_REASONS.items()}
    # the rejected rows say which file
    truncated = rejected[rejected[S.SOURCE_ID] == "truncated"].iloc[0]
    assert truncated[S.SOURCE_PATH].endswith("images/truncated.png")
    assert "truncated.png" in truncated[S.DROP_REASON]
    kept = pd.read_parquet(out / "shards")
    good = {"good_rgb", "good_gray", "good_rgba", "good_palette", "good_cmyk", "good_16bit"}
    assert set(kept[S.SOURCE_ID]) == good | {"dup"}  # the first 'dup' is kept, the second rejected
    assert len(kept) == 6 * len(good | {"dup"})  # K = M = 3 in seggen-toy.yaml
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["drops_per_reason"] == {reason: 1 for reason in EXPECTED_REASONS.values()}
    assert manifest["rejected_rows"] == len(rejected) == 9 and manifest["rows"] == len(kept)


def expected_ids(source: Path, limit: int) -> set[str]:
    ids = sorted(p.stem for p in (source / "SegmentationClass").glob("*.png") if "train" in p.stem)[:limit]
    return {f"{i}/{m}/0" for i in ids for m in ("imgsyn", "masksyn")}


def test_actor_that_dies_mid_batch_is_restarted_and_nothing_is_lost(ray_local, toy_source, tmp_path):
    out = tmp_path / "out"
    result = run_generate(toy_cfg(toy_source, out, "source.limit=16", "faults.die_after_batches=1",
                                  "mask2img.resources.batch_size=4"))
    assert (out / ".faults" / "died-mask2img").exists()  # the actor really died once
    df = pd.read_parquet(out / "shards")
    assert set(df[S.SAMPLE_ID]) == expected_ids(toy_source, 16) and df[S.SAMPLE_ID].is_unique
    assert result.manifest["rejected_rows"] == 0


def test_a_broken_device_restarts_the_actor_and_rejects_nothing(ray_local, toy_source, tmp_path):
    out = tmp_path / "out"
    result = run_generate(toy_cfg(toy_source, out, "source.limit=8", "faults.device_error_after_batches=1",
                                  "mask2img.resources.batch_size=4"))
    assert (out / ".faults" / "device-error-mask2img").exists()  # a CUDA error really was raised
    df = pd.read_parquet(out / "shards")
    assert set(df[S.SAMPLE_ID]) == expected_ids(toy_source, 8) and df[S.SAMPLE_ID].is_unique
    assert result.manifest["rejected_rows"] == 0
    restarts = result.manifest["restarts"]
    assert sum(n for name, n in restarts.items() if "Mask2ImgPool" in name) == 1, restarts


def test_a_row_that_raises_goes_to_rejected_and_the_run_goes_on(ray_local, toy_source, tmp_path):
    ids = sorted(expected_ids(toy_source, 8))
    victim = ids[3]
    out = tmp_path / "out"
    result = run_generate(toy_cfg(toy_source, out, "source.limit=8", f"faults.raise_on_sample={victim}",
                                  "validation.max_rejected_fraction=0.5"))
    rejected = pd.read_parquet(out / "rejected")
    assert rejected[S.SAMPLE_ID].tolist() == [victim]
    assert rejected[S.DROP_REASON].iloc[0] == f"mask2img_error: RuntimeError: injected fault on {victim}"
    assert set(pd.read_parquet(out / "shards")[S.SAMPLE_ID]) == set(ids) - {victim}
    assert result.manifest["drops_per_reason"] == {"mask2img_error": 1}


def test_too_many_rejections_exit_3_with_the_reasons(ray_local, bad_source, tmp_path, capsys):
    code = main(["generate", "--config", str(CONFIG), f"source.path={bad_source}", "source.format=folder",
                 "source.split=null", f"output.path={tmp_path / 'out'}", "palette=auto",
                 "ray.show_progress=false", "validation.max_rejected_fraction=0.05"])
    err = capsys.readouterr().err
    assert code == 3
    assert "rejected 9 of 51 rows (17.6% > validation.max_rejected_fraction=0.05)" in err
    assert "corrupt_image=1" in err and "duplicate_id=1" in err
    assert (tmp_path / "out" / "manifest.json").exists()  # finished writing before exiting
