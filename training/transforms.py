"""CPU transforms that run inside Ray Data ``map_batches``: decode, augment, normalise.

The training loop only moves the resulting tensors to its device and normalises them there. Every function here is
Ray-free (numpy + PIL) so tests call it directly. Masks are resampled nearest-neighbour
only and padding uses the ignore index, so 255 = ignore survives every transform.

Training output columns (fixed shapes, so batches stack): ``pixel_values`` uint8 (N, 3, S, S),
normalised on the device (training.accel.to_model_input); ``labels`` uint8 (int32 past 255
classes) (N, S, S); ``synthetic`` int8 (N,) 1 for synthetic rows (how the mix ratio is
measured). Eval rows are only decoded: ``image`` uint8 (H, W, 3) and ``labels`` (H, W) at the
image's own size (the standard protocol resizes on the device: training.inference).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from core import schema as S

PIXELS, LABELS, SYNTHETIC, IMAGE = "pixel_values", "labels", "synthetic", "image"
AUG_KEY = "aug_key"  # optional int64 column: per-row augmentation seed (training.epochs.aug_keys)


def _resize(image: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear image, nearest-neighbour mask (class ids and 255 are never blended)."""
    if (h, w) == image.shape[:2]:
        return image, mask
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    mode = "L" if mask.dtype == np.uint8 else "I"
    m = Image.fromarray(mask if mode == "L" else mask.astype(np.int32), mode=mode)
    return img, np.asarray(m.resize((w, h), Image.NEAREST)).astype(mask.dtype)


def _pad(image: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least (h, w): image with 0, mask with the ignore index."""
    ph, pw = max(0, h - image.shape[0]), max(0, w - image.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=S.IGNORE_INDEX)
    return image, mask


def rescale_factor(h: int, w: int, ratio: float, aug: dict[str, Any]) -> float:
    """mmseg's keep-ratio ``RandomResize(scale=(max_long_side, base_size), ratio_range)``: the
    short side to ``base_size x ratio`` unless the long side would pass ``max_long_side x ratio``;
    no ``base_size``: ``ratio`` of the image's own size."""
    base, long = aug.get("base_size"), aug.get("max_long_side")
    if not base:
        return ratio
    s = base / min(h, w)
    if long:
        s = min(s, long / max(h, w))
    return s * ratio


def _crop_origin(mask: np.ndarray, c: int, rng: np.random.Generator, cat_max_ratio: float) -> tuple[int, int]:
    """mmseg RandomCrop: up to 10 draws while one class covers >= ``cat_max_ratio`` of the
    crop's labelled pixels (ignore excluded; a crop with one class only is kept as is)."""
    for _ in range(10 if cat_max_ratio < 1 else 1):
        y = int(rng.integers(0, mask.shape[0] - c + 1))
        x = int(rng.integers(0, mask.shape[1] - c + 1))
        if cat_max_ratio >= 1:
            break
        labels = mask[y:y + c, x:x + c]
        counts = np.bincount(labels[labels != S.IGNORE_INDEX].ravel().astype(np.int64))
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness +-32, contrast x[0.5, 1.5] (before or after the
    colour changes), saturation x[0.5, 1.5], hue +-18 of 180 — each with probability 0.5."""
    img = image.astype(np.float32)
    if rng.integers(2):
        img = img + rng.uniform(-32, 32)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = img * rng.uniform(0.5, 1.5)
    sat, hue = (rng.uniform(0.5, 1.5) if rng.integers(2) else None), (rng.integers(-18, 18) if rng.integers(2) else None)
    if sat is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if sat is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if hue is not None:  # PIL's hue is 0..255 for cv2's 0..180
            hsv[..., 0] = (hsv[..., 0] + hue * 256 / 180) % 256
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.integers(2):
        img = img * rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, aug: dict[str, Any]
            ) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's training pipeline: random keep-ratio rescale (:func:`rescale_factor`), pad,
    random ``crop_size`` crop (``cat_max_ratio``), random horizontal flip, photometric
    distortion (``photometric``). Returns uint8 image, mask."""
    h, w = image.shape[:2]
    s = rescale_factor(h, w, float(rng.uniform(aug["scale_min"], aug["scale_max"])), aug)
    image, mask = _resize(image, mask, max(1, round(h * s)), max(1, round(w * s)))
    c = aug["crop_size"]
    image, mask = _pad(image, mask, c, c)
    y, x = _crop_origin(mask, c, rng, aug.get("cat_max_ratio", 1.0))
    image, mask = image[y:y + c, x:x + c], mask[y:y + c, x:x + c]
    if aug.get("flip") and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if aug.get("photometric"):
        image = photometric(np.ascontiguousarray(image), rng)
    return image, mask


def decode_png(data: bytes, what: str) -> np.ndarray:
    """PNG/JPEG bytes → array (RGB for images, class ids for masks)."""
    im = Image.open(io.BytesIO(data))
    if what == "image":
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    return np.asarray(im)


def _rows_from_bytes(batch: dict[str, np.ndarray], synthetic: bool):
    """(image, mask, synthetic) of an encoded-bytes batch; rows with a drop_reason are skipped."""
    drops = batch.get(S.DROP_REASON)
    for i in range(len(batch[S.IMAGE])):
        if drops is not None and drops[i]:
            continue
        yield decode_png(batch[S.IMAGE][i], "image"), decode_png(batch[S.MASK][i], "mask"), synthetic


def _rows_from_index(batch: dict[str, np.ndarray], fmt: str, num_classes: int, variant_alpha: float = 0.0):
    """(image, mask, synthetic) of a source-index batch, decoded with pipelines.sources. With
    ``variant_alpha`` a row is replaced by one of its own synthetic variants (Parquet rows,
    training.variants) with that probability, drawn from its ``aug_key``."""
    from pipelines.sources import load_pixels
    from training.variants import pick_variant

    keys = [k for k in batch if k != AUG_KEY]
    aug = batch.get(AUG_KEY)
    for i in range(len(batch[keys[0]])):
        row = {k: batch[k][i] for k in keys}
        variant = pick_variant(row, None if aug is None else int(aug[i]), variant_alpha) if variant_alpha else None
        image, mask = load_pixels(variant, "parquet", num_classes) if variant else load_pixels(row, fmt, num_classes)
        if mask is None:
            raise ValueError(f"{row.get(S.SOURCE_PATH)}: no mask; training needs labelled rows")
        yield image, mask, variant is not None


def transform_batch(batch: dict[str, np.ndarray], *, source: str, train: bool, aug: dict[str, Any],
                    num_classes: int, fmt: str = "", synthetic: bool = False,
                    seed: int | None = None, variant_alpha: float = 0.0) -> dict[str, np.ndarray]:
    """The map_batches function: decode (``source`` = "index" rows or encoded "bytes" rows),
    augment and normalise (``train``), or only decode (eval: ``image`` uint8 HWC and
    ``labels`` at their own size). Rows with an ``aug_key`` column draw their
    augmentation from it (reproducible); otherwise from ``seed`` (None: fresh each run).
    ``variant_alpha`` (index rows, mix.mode=variant): the chance a row becomes one of its variants."""
    rows = (_rows_from_bytes(batch, synthetic) if source == "bytes"
            else _rows_from_index(batch, fmt, num_classes, variant_alpha if train else 0.0))
    keys = batch.get(AUG_KEY)
    if keys is not None and S.DROP_REASON in batch:
        keys = keys[np.asarray([not d for d in batch[S.DROP_REASON]], dtype=bool)]
    shared = np.random.default_rng(seed)
    images, masks, flags = [], [], []
    for i, (image, mask, is_synthetic) in enumerate(rows):
        # a row's own key (sample id, epoch, run seed): the same crop whatever batch it lands in
        rng = np.random.default_rng(int(keys[i])) if keys is not None else shared
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {image.shape}")
        if train:
            image, mask = augment(image, mask, rng, aug)
        images.append(image)
        masks.append(mask)
        flags.append(is_synthetic)
    label_dtype = np.uint8 if num_classes <= S.IGNORE_INDEX else np.int32
    n = len(images)
    if not train:  # the image and label as they are: the model side resizes (training.inference)
        return {IMAGE: _ragged(images, np.uint8), LABELS: _ragged([m.astype(label_dtype) for m in masks], label_dtype)}
    side = aug["crop_size"]
    return {
        # uint8 on the wire (4x fewer bytes than float32); training.accel.to_model_input normalises on the device
        PIXELS: np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)) if n else np.zeros((0, 3, side, side), np.uint8),
        LABELS: np.stack(masks).astype(label_dtype) if n else np.zeros((0, side, side), label_dtype),
        SYNTHETIC: np.asarray(flags, dtype=np.int8),
    }


def _ragged(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """A column of arrays that may differ in shape (Ray Data keeps them as variable-shaped tensors)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = [np.asarray(a, dtype=dtype) for a in arrays]
    return out
