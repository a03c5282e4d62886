"""CPU transforms that run inside Ray Data ``map_batches``: decode, augment, normalise.

The training loop only moves the resulting tensors to its device. Every function here is
Ray-free (numpy + PIL) so tests call it directly. Masks are resampled nearest-neighbour
only and padding uses the ignore index, so 255 = ignore survives every transform.

Output columns of every transform (fixed shapes, so batches stack):
``pixel_values`` float32 (N, 3, S, S) normalised; ``labels`` uint8 (int32 past 255 classes)
(N, S, S); ``synthetic`` int8 (N,) 1 for synthetic rows (how the mix ratio is measured).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from pipelines import schema as S

PIXELS, LABELS, SYNTHETIC = "pixel_values", "labels", "synthetic"


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


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, aug: dict[str, Any]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale (relative to the image, or to ``base_size`` on its short side), pad,
    random ``crop_size`` crop, random horizontal flip. Returns uint8 image, mask."""
    h, w = image.shape[:2]
    base = aug.get("base_size")
    s = float(rng.uniform(aug["scale_min"], aug["scale_max"]))
    if base:
        s *= base / min(h, w)
    image, mask = _resize(image, mask, max(1, round(h * s)), max(1, round(w * s)))
    c = aug["crop_size"]
    image, mask = _pad(image, mask, c, c)
    y = int(rng.integers(0, image.shape[0] - c + 1))
    x = int(rng.integers(0, image.shape[1] - c + 1))
    image, mask = image[y:y + c, x:x + c], mask[y:y + c, x:x + c]
    if aug.get("flip") and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def eval_resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest side to ``size`` (aspect kept), then pad to size x size with ignore."""
    h, w = image.shape[:2]
    if max(h, w) != size:
        r = size / max(h, w)
        image, mask = _resize(image, mask, max(1, round(h * r)), max(1, round(w * r)))
    return _pad(image, mask, size, size)


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W), ``(x / 255 - mean) / std``."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return (x - m) / s


def decode_png(data: bytes, what: str) -> np.ndarray:
    """PNG/JPEG bytes → array (RGB for images, class ids for masks)."""
    im = Image.open(io.BytesIO(data))
    if what == "image":
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    return np.asarray(im)


def _rows_from_bytes(batch: dict[str, np.ndarray]):
    """(image, mask) pairs of an encoded-bytes batch; rows with a drop_reason are skipped."""
    drops = batch.get(S.DROP_REASON)
    for i in range(len(batch[S.IMAGE])):
        if drops is not None and drops[i]:
            continue
        yield decode_png(batch[S.IMAGE][i], "image"), decode_png(batch[S.MASK][i], "mask")


def _rows_from_index(batch: dict[str, np.ndarray], fmt: str, num_classes: int):
    """(image, mask) pairs of a source-index batch, decoded with pipelines.sources."""
    from pipelines.sources import load_pixels

    keys = list(batch)
    for i in range(len(batch[keys[0]])):
        row = {k: batch[k][i] for k in keys}
        image, mask = load_pixels(row, fmt, num_classes)
        if mask is None:
            raise ValueError(f"{row.get(S.SOURCE_PATH)}: no mask; training needs labelled rows")
        yield image, mask


def transform_batch(batch: dict[str, np.ndarray], *, source: str, train: bool, aug: dict[str, Any],
                    num_classes: int, fmt: str = "", synthetic: bool = False,
                    seed: int | None = None) -> dict[str, np.ndarray]:
    """The map_batches function: decode (``source`` = "index" rows or encoded "bytes" rows),
    augment (``train``) or eval-resize, normalise. ``seed`` None draws fresh augmentations
    each time the stream runs (a new epoch gets new crops)."""
    rows = _rows_from_bytes(batch) if source == "bytes" else _rows_from_index(batch, fmt, num_classes)
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for image, mask in rows:
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {image.shape}")
        if train:
            image, mask = augment(image, mask, rng, aug)
        else:
            image, mask = eval_resize(image, mask, aug["eval_size"])
        images.append(image)
        masks.append(mask)
    side = aug["crop_size"] if train else aug["eval_size"]
    label_dtype = np.uint8 if num_classes <= S.IGNORE_INDEX else np.int32
    n = len(images)
    return {
        PIXELS: normalize(np.stack(images), aug["mean"], aug["std"]) if n else np.zeros((0, 3, side, side), np.float32),
        LABELS: np.stack(masks).astype(label_dtype) if n else np.zeros((0, side, side), label_dtype),
        SYNTHETIC: np.full(n, int(synthetic), np.int8),
    }
