"""The toy preset: domain, ToyText2Mask, ToyMask2Img and the VOC-layout toy dataset."""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.colormap import voc_palette
from actors.toy_domain import (
    CLASSES,
    caption_for,
    class_words_in,
    render_image,
    sample_layout,
)
from actors.toy_mask2img import ToyMask2Img
from actors.toy_text2mask import ToyText2Mask
from core.schema import derive_seed, raw_to_array


def _prompt_batch(prompts: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    ids = [f"cap{i}/masksyn/0" for i in range(len(prompts))]
    return {
        "sample_id": np.array(ids, dtype=object),
        "prompt": np.array(prompts, dtype=object),
        "seed": np.array([derive_seed(seed, s) for s in ids], dtype=np.int64),
    }


def _masks(out: dict) -> list[np.ndarray]:
    return [raw_to_array(b, int(h), int(w)) for b, h, w in
            zip(out["mask_raw"], out["height"], out["width"], strict=True)]


# --- domain -------------------------------------------------------------------------------


def test_class_words_plurals_synonyms_and_order() -> None:
    assert class_words_in("Two STARS next to a donut, and circles") == ["star", "ring", "circle"]
    assert class_words_in("a box and a pyramid on a backdrop") == ["square", "triangle", "background"]
    assert class_words_in("a photo of a dog") == []


def test_caption_round_trips_through_class_words() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[2:10, 2:10], mask[20:30, 20:30] = 1, 4
    cap = caption_for(mask)
    assert cap == "a photo of a circle, a star and background"
    assert class_words_in(cap) == ["circle", "star", "background"]


@pytest.mark.parametrize("names", [["circle"], ["square", "triangle"], CLASSES[1:]])
def test_layout_draws_every_named_class_and_nothing_else(names) -> None:
    for seed in range(15):
        mask = sample_layout(np.random.default_rng(seed), list(names), 64, 96)
        assert mask.shape == (64, 96) and mask.dtype == np.uint8
        ids = set(np.unique(mask).tolist()) - {0}
        assert ids == {CLASSES.index(n) for n in names}
        for n in names:  # visible, not a stray pixel
            assert (mask == CLASSES.index(n)).sum() >= 16


def test_layout_without_class_words_still_draws_shapes() -> None:
    mask = sample_layout(np.random.default_rng(3), ["dog", "background"], 48, 48)
    assert len(np.unique(mask)) >= 2


def test_render_follows_mask_regions_and_gap_restyles() -> None:
    mask = sample_layout(np.random.default_rng(0), ["circle", "square"], 64, 64)
    img = render_image(mask, np.random.default_rng(1), 0.0)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    means = [img[mask == c].mean(0) for c in np.unique(mask)]
    assert min(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1:]) > 5
    assert np.array_equal(img, render_image(mask, np.random.default_rng(1), 0.0))
    assert not np.array_equal(img, render_image(mask, np.random.default_rng(2), 0.0))


def _stats(gap: float) -> tuple[float, float, float]:
    """Mean hue of circle pixels, mean saturation, mean absolute neighbour difference."""
    hues, sats, rough = [], [], []
    for seed in range(30):
        mask = sample_layout(np.random.default_rng(seed), ["circle"], 64, 64)
        img = render_image(mask, np.random.default_rng(seed), gap).astype(np.float32) / 255
        px = img[mask == 1].mean(0)
        h, s, _ = colorsys.rgb_to_hsv(*px)
        hues.append((h + 0.5) % 1.0 - 0.5)  # red wraps around 0
        sats.append(colorsys.rgb_to_hsv(*img.reshape(-1, 3).mean(0))[1])
        rough.append(np.abs(np.diff(img, axis=1)).mean())
    return float(np.mean(hues)), float(np.mean(sats)), float(np.mean(rough))


def test_gap_shifts_pixel_statistics() -> None:
    hue0, sat0, rough0 = _stats(0.0)
    hue1, sat1, rough1 = _stats(1.0)
    assert hue1 - hue0 > 0.06  # hues rotate by +0.12 at gap=1
    assert sat1 < sat0
    assert rough1 > 1.5 * rough0  # finer textures and more noise


# --- actors -------------------------------------------------------------------------------


def test_text2mask_deterministic_and_follows_prompts() -> None:
    prompts = ["a photo of a circle and background", "three stars and a ring", "a square"]
    batch = _prompt_batch(prompts)
    t2m = ToyText2Mask(resolution=48)
    out = t2m(batch)
    assert out["mask_raw"].dtype == object and out["height"].dtype == np.int32
    assert list(out["sample_id"]) == list(batch["sample_id"])  # input columns kept
    masks = _masks(out)
    assert [set(np.unique(m).tolist()) - {0} for m in masks] == [{1}, {4, 5}, {2}]
    assert all(m.shape == (48, 48) for m in masks)
    again = t2m(_prompt_batch(prompts))
    assert list(again["mask_raw"]) == list(out["mask_raw"])
    other = t2m(_prompt_batch(prompts, seed=1))
    assert list(other["mask_raw"]) != list(out["mask_raw"])


def test_text2mask_keeps_given_size_and_emits_colours_with_palette() -> None:
    batch = _prompt_batch(["a triangle"])
    batch["height"], batch["width"] = np.array([40], np.int32), np.array([56], np.int32)
    pal = voc_palette(len(CLASSES))
    out = ToyText2Mask(palette=pal)(batch)
    mask = _masks(out)[0]
    assert mask.shape == (40, 56)
    color = raw_to_array(out["color_raw"][0], 40, 56, channels=3)
    assert np.array_equal(color, pal[mask])


def test_actors_name_missing_columns() -> None:
    with pytest.raises(KeyError, match="prompt"):
        ToyText2Mask()({"sample_id": np.array(["a"]), "seed": np.array([1])})
    with pytest.raises(KeyError, match="mask_raw"):
        ToyMask2Img()(_prompt_batch(["a circle"]))


def test_mask2img_renders_per_seed_and_gap() -> None:
    batch = ToyText2Mask(resolution=40)(_prompt_batch(["a circle", "a ring and a star"]))
    out = ToyMask2Img(gap=0.3)(dict(batch))
    assert list(out["generator"]) == ["toy-mask2img@gap=0.3"] * 2
    imgs = [raw_to_array(b, 40, 40, channels=3) for b in out["image_raw"]]
    assert all(len(b) == 40 * 40 * 3 for b in out["image_raw"])
    assert list(ToyMask2Img(gap=0.3)(dict(batch))["image_raw"]) == list(out["image_raw"])
    reseeded = dict(batch, seed=batch["seed"] + 1)
    assert all(a != b for a, b in zip(ToyMask2Img(0.3)(reseeded)["image_raw"],
                                      out["image_raw"], strict=True))
    gap0 = [raw_to_array(b, 40, 40, channels=3) for b in ToyMask2Img(0.0)(dict(batch))["image_raw"]]
    assert all(np.abs(a.astype(int) - b).mean() > 2 for a, b in zip(imgs, gap0, strict=True))
    with pytest.raises(ValueError):
        ToyMask2Img(gap=1.5)


# --- toy dataset --------------------------------------------------------------------------


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_toy_dataset_voc_layout(tmp_path: Path) -> None:
    from pipelines.toy_data import make_toy_dataset

    root = make_toy_dataset(tmp_path / "a", n_train=12, n_val=5, size=48, seed=3)
    sets = root / "ImageSets" / "Segmentation"
    train, val = sets.joinpath("train.txt").read_text().split(), sets.joinpath("val.txt").read_text().split()
    assert (len(train), len(val)) == (12, 5) and not set(train) & set(val)
    assert (root / "classes.txt").read_text().split() == list(CLASSES)
    captions = {}
    for line in (root / "captions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        captions[rec["id"]] = rec["caption"]
    assert sorted(captions) == sorted(train + val)
    for sid in train + val:
        img = Image.open(root / "JPEGImages" / f"{sid}.jpg")
        png = Image.open(root / "SegmentationClass" / f"{sid}.png")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)
        assert png.mode == "P" and png.size == (48, 48)
        assert np.array_equal(np.array(png.getpalette()[:9]).reshape(3, 3), voc_palette(3))
        mask = np.array(png)
        present = set(np.unique(mask).tolist())
        assert present <= set(range(len(CLASSES))) and len(present - {0}) >= 1
        assert set(class_words_in(captions[sid])) == {CLASSES[c] for c in present}
    again = make_toy_dataset(tmp_path / "b", n_train=12, n_val=5, size=48, seed=3)
    assert _digest(root) == _digest(again)
    other = make_toy_dataset(tmp_path / "c", n_train=12, n_val=5, size=48, seed=4)
    assert _digest(root) != _digest(other)
