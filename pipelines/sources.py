"""Real (source) datasets: a cheap index of rows, then lazy decoding of one row's pixels.

Reading is split in two so it scales to millions of rows: :func:`index_source`
(:mod:`pipelines.source_index`) only lists files into an Arrow table (no image decoding) and
:func:`load_pixels` decodes one row inside a Ray Data task. Errors while decoding raise
:class:`SourceError` naming the file.

Pure python/numpy/pyarrow/PIL — no ray import — so tests and ``training/`` can use it.
EXIF orientation is not applied (masks are drawn on the stored pixels); RGBA drops alpha.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from core import schema, storage

log = logging.getLogger(__name__)

FORMATS = ("voc", "ade20k", "coco", "folder", "parquet", "captions")
PANOPTIC_SEGMENTS = "#segments="  # coco panoptic mask path: PNG#segments=<segment id>:<class id>,... (source_index)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# The 150 SceneParse150 classes (ADEChallengeData2016), annotation value k -> class id k-1.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# Readable forms of run-together class names, used only in generated captions.
_READABLE = {
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}
_BACKGROUND_NAMES = {"background", "_background_", "bg"}

Problem = tuple[str, str, str]  # (source_id, path, reason)


class SourceError(ValueError):
    """A source file (or the source as a whole) cannot be read; the message names the file.

    ``reason`` is a short code (``corrupt_image``, ``mask_size_mismatch``, ...) that the
    manifest counts rejected rows by.
    """

    def __init__(self, message: str, reason: str = "bad_source"):
        super().__init__(message)
        self.reason = reason


# --- decoding ------------------------------------------------------------------------------


def _parquet_file(path: str) -> pq.ParquetFile:
    loc = storage.resolve_file(path)
    return pq.ParquetFile(loc.path, filesystem=loc.fs)


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str) -> tuple[int, ...]:
    md = _parquet_file(path).metadata
    return tuple(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]))


@functools.lru_cache(maxsize=2)
def _row_group(path: str, group: int) -> Any:
    pf = _parquet_file(path)
    cols = [c for c in (schema.IMAGE, schema.MASK) if c in pf.schema_arrow.names]
    return pf.read_row_group(group, columns=cols)


def _parquet_bytes(path: str, i: int) -> tuple[bytes | None, bytes | None]:
    """One row's image/mask bytes; a worker keeps the last row groups it read in memory."""
    try:
        starts = _row_group_starts(path)
        group = int(np.searchsorted(starts, i, side="right")) - 1
        if i < 0 or group >= len(starts) - 1:
            raise SourceError(f"{path}: row {i} out of range ({starts[-1]} rows)")
        table = _row_group(path, group)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{path}: unreadable parquet file ({e})") from e
    j = i - int(starts[group])
    mask = table.column(schema.MASK)[j].as_py() if schema.MASK in table.column_names else None
    return table.column(schema.IMAGE)[j].as_py(), mask


def _open(data: bytes | str | None, where: str, what: str) -> Image.Image:
    try:
        if data is None:
            raise SourceError(f"{where}: no {what} data", f"missing_{what}")
        if isinstance(data, str):
            data = Path(data).read_bytes() if "://" not in data else storage.read_bytes(storage.resolve_file(data))
        if not data:
            raise SourceError(f"{where}: empty {what} file (0 bytes)", f"empty_{what}")
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{where}: {what} file not found", f"missing_{what}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise SourceError(
            f"{where}: corrupt or unreadable {what} ({type(e).__name__}: {e})", f"corrupt_{what}"
        ) from e


def _to_rgb(im: Image.Image, where: str) -> np.ndarray:
    """uint8 HxWx3; 16/32-bit grayscale is scaled (PIL would clip), alpha is dropped."""
    if im.mode.startswith("I"):
        a = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    try:
        return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise SourceError(
            f"{where}: cannot convert image mode {im.mode} to RGB ({e})", "bad_image_mode"
        ) from e


def _mask_ids(im: Image.Image, where: str, reduce_zero: bool, n: int | None) -> np.ndarray:
    """Class ids from a palette (indices, never colours), grayscale or 16-bit PNG."""
    if im.mode not in ("P", "L", "1") and not im.mode.startswith("I"):
        raise SourceError(
            f"{where}: mask has mode {im.mode}; expected a single-channel PNG of class ids",
            "mask_not_class_ids",
        )
    a = np.array(im)
    if reduce_zero or a.dtype.kind != "u":
        a = a.astype(np.int64)
    if reduce_zero:
        a = np.where(a == 0, schema.IGNORE_INDEX, a - 1)
    present = np.unique(a)
    limit = n if n else 65536
    bad = present[(present != schema.IGNORE_INDEX) & ((present < 0) | (present >= limit))]
    if bad.size:
        raise SourceError(
            f"{where}: class ids {bad[:10].tolist()} out of range (num_classes={n}, "
            f"ignore={schema.IGNORE_INDEX})",
            "class_out_of_range",
        )
    big = present.size and int(present.max()) > 255
    dtype = schema.mask_dtype(n) if n else np.dtype("<u2" if big else np.uint8)
    return a.astype(dtype, copy=False)


def load_pixels(
    row: Mapping[str, Any], format: str, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one index row: (uint8 HxWx3 RGB image, HxW class-id mask or None).

    Grayscale/RGBA/palette/CMYK/16-bit images become RGB. The mask is uint8 (uint16 past 255
    classes, see :func:`schema.mask_dtype`), 255 = ignore; ADE20K masks are shifted (0 -> 255,
    k -> k-1). Raises :class:`SourceError` naming the file for a missing or corrupt file, a
    mask whose size differs from the image's, or class ids >= ``num_classes`` (255 aside).
    """
    sid = row.get(schema.SOURCE_ID, "")
    path = str(row.get(schema.SOURCE_PATH) or "")
    if not path:
        raise SourceError(f"source {sid!r}: row has no image ({format} source)", "missing_image")
    segments = ""
    if format == "parquet":
        i = int(row["source_row"])
        where = f"{path} row {i} ({sid})"
        img_data, mask_data = _parquet_bytes(path, i)
        image = _to_rgb(_open(img_data, where, "image"), where)
        mask_im = None if mask_data is None else _open(mask_data, where, "mask")
        mwhere = where
    else:
        image = _to_rgb(_open(path, path, "image"), path)
        mwhere = str(row.get(schema.SOURCE_MASK_PATH) or "")
        mwhere, _, segments = mwhere.partition(PANOPTIC_SEGMENTS)
        mask_im = _open(mwhere, mwhere, "mask") if mwhere else None
    if mask_im is None:
        return image, None
    if segments:
        _check_size(mask_im, image, mwhere, path)
        return image, panoptic_to_semantic(_to_rgb(mask_im, mwhere), segments, num_classes)
    _check_size(mask_im, image, mwhere, path)
    return image, _mask_ids(mask_im, mwhere, format == "ade20k", num_classes)


def _check_size(mask_im: Image.Image, image: np.ndarray, mwhere: str, path: str) -> None:
    if (mask_im.height, mask_im.width) != image.shape[:2]:
        raise SourceError(
            f"{mwhere}: mask size {mask_im.width}x{mask_im.height} != image size "
            f"{image.shape[1]}x{image.shape[0]} ({path})",
            "mask_size_mismatch",
        )


def panoptic_to_semantic(rgb: np.ndarray, segments: str, num_classes: int | None) -> np.ndarray:
    """A COCO panoptic PNG (segment id = R + 256 G + 256^2 B) → class ids, by the index's
    ``<segment id>:<class id>`` list; void (0) and unlisted segments → 255 (ignore)."""
    ids = rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64) + 65536 * rgb[..., 2].astype(np.int64)
    out = np.full(ids.shape, schema.IGNORE_INDEX, dtype=schema.mask_dtype(num_classes) if num_classes else np.uint8)
    for pair in segments.split(","):
        if pair:
            seg, cls = pair.split(":")
            out[ids == int(seg)] = int(cls)
    return out


def caption_from_mask(
    mask: np.ndarray, classes: Sequence[str], background_index: int | None = 0
) -> str:
    """A caption like "a photo of a dog, grass and sky": classes present, largest area first.

    255 is skipped; ``background_index`` (VOC/folder: 0) is left out when other classes exist.
    """
    ids, counts = np.unique(np.asarray(mask), return_counts=True)
    present = [
        (-c, int(i)) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
        if i != schema.IGNORE_INDEX and 0 <= i < len(classes)
    ]  # fmt: skip
    if background_index is not None and len(present) > 1:
        present = [p for p in present if p[1] != background_index]
    names = [
        _READABLE.get(classes[i], classes[i]).replace("_", " ").strip() for _, i in sorted(present)
    ]
    if not names:
        return "a photo"
    names[0] = ("an " if names[0][:1].lower() in "aeiou" else "a ") + names[0]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"a photo of {text}"
