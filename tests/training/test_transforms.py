"""The Ray Data side transforms, called directly: ignore survives, shapes, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core import schema as S
from training.config import AugConfig
from training.transforms import (
    LABELS,
    PIXELS,
    SYNTHETIC,
    augment,
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


def test_transform_batch_bytes_skips_dropped_rows_and_marks_synthetic():
    image, mask = _scene()
    batch = {S.IMAGE: np.array([_png(image)] * 3, dtype=object), S.MASK: np.array([_png(mask)] * 3, dtype=object),
             S.DROP_REASON: np.array(["", "constant image", ""], dtype=object)}
    aug = AugConfig(crop_size=32).model_dump()
    out = transform_batch(batch, source="bytes", train=True, aug=aug, num_classes=6, synthetic=True)
    # uint8 on the wire (normalised on the device: training.accel.to_model_input)
    assert out[PIXELS].shape == (2, 3, 32, 32) and out[PIXELS].dtype == np.uint8
    assert out[LABELS].shape == (2, 32, 32) and out[SYNTHETIC].tolist() == [1, 1]
    ev = transform_batch(batch, source="bytes", train=False, aug=aug, num_classes=6)
    # eval rows are only decoded: the image and label at their own size
    assert ev["image"].shape == (2, 40, 56, 3) and ev[LABELS].shape == (2, 40, 56)
    np.testing.assert_array_equal(ev[LABELS][0], mask)
    np.testing.assert_array_equal(ev["image"][1], image)


def test_per_row_aug_keys_make_crops_independent_of_batching():
    """A row's crop depends on its own key, not on which batch or position it lands in."""
    image, mask = _scene()
    other, omask = _scene(seed=5)
    aug = AugConfig(crop_size=24).model_dump()
    both = {S.IMAGE: np.array([_png(image), _png(other)], dtype=object),
            S.MASK: np.array([_png(mask), _png(omask)], dtype=object), "aug_key": np.array([11, 22])}
    alone = {S.IMAGE: np.array([_png(other)], dtype=object), S.MASK: np.array([_png(omask)], dtype=object),
             "aug_key": np.array([22])}
    a = transform_batch(both, source="bytes", train=True, aug=aug, num_classes=6)
    b = transform_batch(alone, source="bytes", train=True, aug=aug, num_classes=6)
    np.testing.assert_array_equal(a[PIXELS][1], b[PIXELS][0])
    np.testing.assert_array_equal(a[LABELS][1], b[LABELS][0])


def test_transform_batch_index_rows_decode_real_source(small_real):
    from pipelines.source_index import index_source

    idx = index_source(small_real, "voc", split="val")
    rows = idx.rows[:4]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in (S.SOURCE_ID, S.SOURCE_PATH, S.SOURCE_MASK_PATH, "source_row")}
    out = transform_batch(batch, source="index", train=False, aug=AugConfig().model_dump(),
                          num_classes=6, fmt="voc")
    _, truth = idx.load(rows[0])
    np.testing.assert_array_equal(out[LABELS][0], truth)  # same size: eval is the identity on labels
