"""The Ray Data side transforms, called directly: ignore survives, shapes, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import schema as S
from training.config import AugConfig
from training.transforms import (
    LABELS,
    PIXELS,
    SYNTHETIC,
    augment,
    eval_resize,
    normalize,
    transform_batch,
)

pytestmark = pytest.mark.timeout(60)


def _scene(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    mask[5:20, 10:30] = 3
    mask[25:35, 30:50] = 1
    mask[:, :3] = S.IGNORE_INDEX
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return image, mask


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_augment_keeps_ignore_and_only_original_ids():
    image, mask = _scene()
    aug = AugConfig(crop_size=32, scale_min=0.5, scale_max=2.0, flip=True).model_dump()
    rng = np.random.default_rng(0)
    seen_ignore = 0
    for _ in range(50):
        img, m = augment(image, mask, rng, aug)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert m.shape == (32, 32) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1, 3, S.IGNORE_INDEX}  # nearest: no blended ids
        seen_ignore += int((m == S.IGNORE_INDEX).any())
    assert seen_ignore > 0


def test_augment_pads_small_images_with_ignore():
    image, mask = _scene(10, 12)
    mask[:] = 2
    aug = AugConfig(crop_size=24, scale_min=1.0, scale_max=1.0, flip=False).model_dump()
    img, m = augment(image, mask, np.random.default_rng(0), aug)
    assert m.shape == (24, 24)
    assert (m == 2).sum() == 120 and (m == S.IGNORE_INDEX).sum() == 24 * 24 - 120
    assert (img[m == S.IGNORE_INDEX] == 0).all()


def test_crop_and_flip_move_image_and_mask_together():
    image, mask = _scene()
    image[..., 0] = mask  # the image's red channel is the label: any misalignment shows
    aug = AugConfig(crop_size=40, scale_min=1.0, scale_max=1.0, flip=True).model_dump()
    sides = set()
    for s in range(200):
        img, m = augment(image, mask, np.random.default_rng(s), aug)
        np.testing.assert_array_equal(img[..., 0], m)
        ignore_cols = np.where((m == S.IGNORE_INDEX).all(0))[0]
        if ignore_cols.size:
            sides.add("left" if ignore_cols[0] == 0 else "right")
    assert sides == {"left", "right"}  # both flipped and unflipped crops occurred


def test_eval_resize_keeps_aspect_and_pads():
    image, mask = _scene(40, 80)
    img, m = eval_resize(image, mask, 64)
    assert img.shape == (64, 64, 3) and m.shape == (64, 64)
    assert (m[32:] == S.IGNORE_INDEX).all()  # 40x80 -> 32x64, padded below
    assert set(np.unique(m[:32])) <= {0, 1, 3, S.IGNORE_INDEX}


def test_normalize_values():
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    out = normalize(x, [0.5, 0.5, 0.5], [0.5, 0.25, 0.5])
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 2.0, 1.0])


def test_transform_batch_bytes_skips_dropped_rows_and_marks_synthetic():
    image, mask = _scene()
    batch = {S.IMAGE: np.array([_png(image)] * 3, dtype=object), S.MASK: np.array([_png(mask)] * 3, dtype=object),
             S.DROP_REASON: np.array(["", "constant image", ""], dtype=object)}
    aug = AugConfig(crop_size=32, eval_size=64).model_dump()
    out = transform_batch(batch, source="bytes", train=True, aug=aug, num_classes=6, synthetic=True)
    assert out[PIXELS].shape == (2, 3, 32, 32) and out[PIXELS].dtype == np.float32
    assert out[LABELS].shape == (2, 32, 32) and out[SYNTHETIC].tolist() == [1, 1]
    ev = transform_batch(batch, source="bytes", train=False, aug=aug, num_classes=6)
    assert ev[LABELS].shape == (2, 64, 64) and ev[SYNTHETIC].tolist() == [0, 0]
    # eval: resized 40x56 -> 46x64 then padded: the ignore count grows, ids stay the same
    assert set(np.unique(ev[LABELS])) <= {0, 1, 3, S.IGNORE_INDEX}


def test_transform_batch_index_rows_decode_real_source(small_real):
    from pipelines.sources import index_source

    idx = index_source(small_real, "voc", split="val")
    rows = idx.rows[:4]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in (S.SOURCE_ID, S.SOURCE_PATH, S.SOURCE_MASK_PATH, "source_row")}
    out = transform_batch(batch, source="index", train=False, aug=AugConfig(eval_size=64).model_dump(),
                          num_classes=6, fmt="voc")
    _, truth = idx.load(rows[0])
    np.testing.assert_array_equal(out[LABELS][0], truth)  # same size: eval is the identity on labels
