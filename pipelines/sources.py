"""Real (source) datasets: a cheap index of rows, then lazy decoding of one row's pixels.

Reading is split in two so it scales to millions of rows: :func:`index_source` only lists
files (no image decoding, one directory listing instead of a ``stat`` per file) and
:func:`load_pixels` decodes one row inside a Ray Data task. Per-row problems found while
indexing (duplicate ids, missing masks, unreadable caption lines) never raise: they are kept
in :attr:`SourceIndex.problems` for ``rejected/``. Errors while decoding raise
:class:`SourceError` naming the file. Only a source that cannot be read at all (missing root,
no class list, unknown format) makes :func:`index_source` raise.

Pure python/numpy/pyarrow/PIL — no ray import — so tests and ``training/`` can use it.
EXIF orientation is not applied (masks are drawn on the stored pixels); RGBA drops alpha.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines import schema, storage
from pipelines.storage import Location

log = logging.getLogger(__name__)

FORMATS = ("voc", "ade20k", "folder", "parquet", "captions")
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


@dataclass
class SourceIndex:
    """Rows of a source, listed without decoding any pixels.

    Each row is a dict with ``source_id``, ``source_path``, ``source_mask_path`` ("" when
    absent), ``source_row`` (row within a Parquet file, -1 otherwise) and ``caption``
    ("" when unknown) — the same keys for every row, so it feeds ``ray.data.from_items``.
    """

    format: str
    root: str
    rows: list[dict[str, Any]]
    classes: list[str]
    palette_hint: str | None = None  # "voc", "ade20k" or None
    background_index: int | None = None  # class left out of generated captions
    problems: list[Problem] = field(default_factory=list)

    def load(self, row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`load_pixels` with this source's format and class count."""
        return load_pixels(row, self.format, len(self.classes) or None)


def _row(
    sid: str, path: Location | str, mask: Location | str | None, caption: str = "", i: int = -1
) -> dict:
    return {
        schema.SOURCE_ID: sid,
        schema.SOURCE_PATH: str(path),
        schema.SOURCE_MASK_PATH: str(mask) if mask else "",
        "source_row": i,
        schema.CAPTION: caption,
    }


def _read_classes(path: Location) -> list[str] | None:
    if not storage.is_file(path):
        return None
    return [ln.strip() for ln in storage.read_text(path).splitlines() if ln.strip()]


def _walk(d: Location, exts: set[str] = IMAGE_EXTS) -> list[tuple[str, str]]:
    """Sorted ``(id, path or URI)`` for files under ``d`` (id = relative path without suffix),
    hidden entries skipped; two files with one id are both kept (the caller reports the
    duplicate). One recursive listing (a ``LIST`` per 1000 keys on object stores)."""
    from pyarrow.fs import FileType

    out: list[tuple[str, str]] = []
    base = d.path.rstrip("/") + "/"
    for info in storage.iter_file_infos(d):
        if info.type != FileType.File or not info.path.startswith(base):
            continue
        rel = info.path[len(base):]
        parts = rel.split("/")
        stem, dot, ext = parts[-1].rpartition(".")
        if any(p.startswith(".") for p in parts) or not (dot and stem) or "." + ext.lower() not in exts:
            continue
        out.append(("/".join([*parts[:-1], stem]), d.join(rel).uri))
    return sorted(out)


def _first(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``{id: path}`` keeping the first path of each id, in order."""
    out: dict[str, str] = {}
    for k, p in pairs:
        out.setdefault(k, p)
    return out


def _pair(
    images: Iterable[tuple[str, str | None]], masks: Mapping[str, str], require_masks: bool
) -> tuple[list[dict], list[Problem]]:
    """Rows for ``(id, image path or None)`` pairs; duplicates and missing files to problems."""
    rows: list[dict] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for sid, img in images:
        mask = masks.get(sid)
        if sid in seen:
            problems.append((sid, str(img or mask or ""), "duplicate_id: kept the first"))
        elif img is None:
            problems.append((sid, str(mask or ""), "missing_image: listed but not on disk"))
        elif mask is None and require_masks:
            problems.append((sid, str(img), "missing_mask: no mask file for this image"))
        else:
            rows.append(_row(sid, img, mask))
        seen.add(sid)
    return rows, problems


def _index_voc(root: Location, split: str | None, require_masks: bool):
    masks = _first(_walk(root / "SegmentationClass", {".png"}))
    images = _first(_walk(root / "JPEGImages"))
    sets_dir = root / "ImageSets" / "Segmentation"
    split_file = sets_dir / f"{split or 'train'}.txt"
    if storage.is_file(split_file):
        ids = [ln.split()[0] for ln in storage.read_text(split_file).splitlines() if ln.strip()]
    elif split is not None and storage.is_dir(sets_dir):
        raise SourceError(f"{split_file}: split file not found (split={split!r})")
    else:
        log.warning("%s missing: using every mask in %s", split_file, root / "SegmentationClass")
        ids = list(masks)
    return _pair(((i, images.get(i)) for i in ids), masks, require_masks)


def _index_dirs(img_dir: Location, mask_dir: Location, require_masks: bool):
    if not storage.is_dir(img_dir):
        raise SourceError(f"{img_dir}: image directory not found")
    return _pair(_walk(img_dir), _first(_walk(mask_dir, {".png"})), require_masks)


def _parquet_files(root: Location) -> list[Location]:
    if storage.is_file(root):
        return [root]
    shards = root / "shards"
    return storage.listdir(shards if storage.is_dir(shards) else root, ".parquet")


def _find_manifest(root: Location) -> Location | None:
    start = root if storage.is_dir(root) else root.parent
    for d in (start, start.parent, start.parent.parent):
        if d.path and storage.is_file(d / "manifest.json"):
            return d / "manifest.json"
    return None


def _index_parquet(files: list[Location]) -> tuple[list[dict], list[Problem]]:
    """Reads only ``sample_id`` and ``caption``; pixels are read per row group at load time."""
    rows: list[dict] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for f in files:
        try:
            pf = pq.ParquetFile(f.path, filesystem=f.fs)
            names = pf.schema_arrow.names
            if schema.SAMPLE_ID not in names or schema.IMAGE not in names:
                problems.append(("", str(f), f"bad_parquet: no {schema.SAMPLE_ID}/{schema.IMAGE} column"))
                continue
            cols = [c for c in (schema.SAMPLE_ID, schema.CAPTION) if c in names]
            table = pf.read(columns=cols)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            problems.append(("", str(f), f"corrupt_parquet: unreadable parquet file ({e})"))
            continue
        ids = table.column(schema.SAMPLE_ID).to_pylist()
        caps = table.column(schema.CAPTION).to_pylist() if len(cols) == 2 else [""] * len(ids)
        mask = f if schema.MASK in names else None
        for i, (raw, cap) in enumerate(zip(ids, caps, strict=True)):
            sid = "" if raw is None else str(raw)
            if not sid or sid in seen:
                why = "duplicate_id: kept the first" if sid else "missing_id: empty sample_id"
                problems.append((sid or f"row {i}", str(f), why))
                continue
            seen.add(sid)
            rows.append(_row(sid, f, mask, cap or "", i))
    return rows, problems


MAX_CAPTION_CHARS = 2000  # longer is a broken file, not a caption; prompts are cut to the tokenizer


def _read_captions(path: Location) -> tuple[list[tuple[str, str]], list[Problem]]:
    """``(id, caption)`` pairs from a ``captions.jsonl``, read line by line in bytes so one
    bad line never hides the others. Empty, non-UTF-8 and over-long captions become
    problems under their id (the row is rejected); unparseable lines under ``line N``."""
    pairs: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for n, raw in enumerate(storage.iter_lines(path), 1):
        if not raw.strip():
            continue
        why = ""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line, why = raw.decode("utf-8", errors="replace"), "caption_not_utf8: line {n}"
        try:
            d = json.loads(line)
            sid, cap = d.get("id", d.get("source_id")), d.get("caption")
        except (json.JSONDecodeError, AttributeError):
            sid, cap = None, None
        if sid is None or not isinstance(cap, str):
            problems.append((f"line {n}", str(path), "bad_caption_line: not a JSON object with id and caption"))
            continue
        if not why and not cap.strip():
            why = "empty_caption: line {n}"
        elif not why and len(cap) > MAX_CAPTION_CHARS:
            why = f"caption_too_long: line {{n}} has {len(cap)} characters (> {MAX_CAPTION_CHARS})"
        if why:
            problems.append((str(sid), str(path), why.format(n=n)))
        else:
            pairs.append((str(sid), cap))
    return pairs, problems


def _index_captions(root: Location) -> tuple[list[dict], list[Problem]]:
    path = root if storage.is_file(root) else root / "captions.jsonl"
    if not storage.is_file(path):
        raise SourceError(f"{path}: captions file not found")
    pairs, problems = _read_captions(path)
    rows: list[dict] = []
    seen: set[str] = set()
    for sid, cap in pairs:
        if sid in seen:
            problems.append((sid, str(path), "duplicate_id: kept the first"))
            continue
        seen.add(sid)
        rows.append(_row(sid, "", None, cap))
    return rows, problems


def index_source(
    path: str | os.PathLike | Location,
    format: str,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    require_masks: bool = True,
) -> SourceIndex:
    """List a source's rows and class names without decoding pixels.

    Class names: ``classes`` if given, else ``classes.txt`` in the source root, else the
    format's own (VOC's 21, ADE20K's 150, the Parquet dataset's ``manifest.json``); a folder
    (or Parquet) source without any class list is an error naming the missing file.
    ``split``: VOC reads ``ImageSets/Segmentation/<split>.txt`` (default ``train``; with no
    split file, every mask present — unless a split was asked for and other split files exist,
    which is an error); ADE20K maps ``train``/``val`` to ``training``/``validation``; a folder
    reads ``images/<split>`` and ``masks/<split>``; Parquet and captions ignore it.
    ADE20K annotations use 0 = "other": :func:`load_pixels` maps 0 to 255 (ignore) and k to
    k-1 (mmseg's ``reduce_zero_label``), so class id 0 is "wall".
    ``require_masks=False`` keeps images without a mask (``source_mask_path`` = "").
    """
    if format not in FORMATS:
        raise SourceError(f"unknown source format {format!r}; expected one of {FORMATS}")
    try:
        root = storage.resolve(path, "source.path")
    except storage.StorageError as e:
        raise SourceError(str(e)) from None
    if not storage.exists(root):
        raise SourceError(f"{root}: source path not found")
    base = root if storage.is_dir(root) else root.parent
    manifest: dict[str, Any] = {}
    if format == "voc":
        rows, problems = _index_voc(root, split, require_masks)
    elif format == "ade20k":
        sub = {"train": "training", "val": "validation"}.get(split or "train", split or "train")
        rows, problems = _index_dirs(
            root / "images" / sub, root / "annotations" / sub, require_masks
        )
    elif format == "folder":
        parts = (split,) if split else ()
        rows, problems = _index_dirs(
            root.join("images", *parts), root.join("masks", *parts), require_masks
        )
    elif format == "parquet":
        files = _parquet_files(root)
        if not files:
            raise SourceError(f"{root}: no .parquet files found")
        rows, problems = _index_parquet(files)
        mpath = _find_manifest(root)
        if mpath is not None:
            base = mpath.parent
            try:
                manifest = json.loads(storage.read_text(mpath))
            except (OSError, ValueError) as e:
                raise SourceError(f"{mpath}: unreadable manifest ({e})") from e
    else:
        rows, problems = _index_captions(root)

    names = _resolve_classes(format, classes, base, manifest)
    if format != "captions" and storage.is_file(base / "captions.jsonl"):
        pairs, bad = _read_captions(base / "captions.jsonl")
        bad_ids = {sid for sid, _, _ in bad}
        problems += [p for p in bad if p[0] in {r[schema.SOURCE_ID] for r in rows}]
        rows = [r for r in rows if r[schema.SOURCE_ID] not in bad_ids]  # rejected, not re-captioned
        caps = dict(reversed(pairs))  # first occurrence wins
        for r in rows:
            if not r[schema.CAPTION]:
                r[schema.CAPTION] = caps.get(r[schema.SOURCE_ID], "")
    if format in ("voc", "folder"):
        background: int | None = 0
    elif format == "ade20k" or not names:
        background = None
    else:
        background = 0 if names[0].lower() in _BACKGROUND_NAMES else None
    hint = {"voc": "voc", "ade20k": "ade20k"}.get(format) or manifest.get("palette_hint")
    if problems:
        log.warning("%s: %d row problem(s), e.g. %s", root, len(problems), problems[0])
    return SourceIndex(
        format, str(root), rows, names, hint if hint in ("voc", "ade20k") else None,
        background, problems,
    )  # fmt: skip


def _resolve_classes(
    format: str, classes: Sequence[str] | None, base: Location, manifest: Mapping[str, Any]
) -> list[str]:
    if classes is not None:
        return [str(c) for c in classes]
    from_file = _read_classes(base / "classes.txt")
    if from_file:
        return from_file
    if format == "voc":
        return list(VOC_CLASSES)
    if format == "ade20k":
        return list(ADE20K_CLASSES)
    if format == "parquet" and manifest.get("classes"):
        return [c["name"] if isinstance(c, Mapping) else str(c) for c in manifest["classes"]]
    if format == "captions":
        return []
    where = "manifest.json (classes) or classes.txt" if format == "parquet" else "classes.txt"
    raise SourceError(f"{base}: no class list ({where}); write classes.txt there (one name per line, "
                      "id 0 first) or name them in the config: source.classes=[background,cat,dog] "
                      "(real.classes=[...] for train)")


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
        mask_im = _open(mwhere, mwhere, "mask") if mwhere else None
    if mask_im is None:
        return image, None
    if (mask_im.height, mask_im.width) != image.shape[:2]:
        raise SourceError(
            f"{mwhere}: mask size {mask_im.width}x{mask_im.height} != image size "
            f"{image.shape[1]}x{image.shape[0]} ({path})",
            "mask_size_mismatch",
        )
    return image, _mask_ids(mask_im, mwhere, format == "ade20k", num_classes)


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
