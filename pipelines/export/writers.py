"""Worker side of ``segfactory export``: one shard in, the format's files out.

Each call reads one shard of the dataset row group by row group (bounded memory), writes every
sample's files in the target layout, and writes the shard's *parts* (split lists, caption lines,
COCO records) under ``OUT/.parts/``; :mod:`pipelines.export.run` joins the parts at the end.
It returns one small record per shard. Paths on both sides may be URIs.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core import schema as S
from core import storage

FORMATS = ("voc", "ade20k", "cityscapes", "coco", "hf", "folder")
# the most classes an 8-bit PNG label format encodes (255 = ignore; ADE20K: 0 = other, ids + 1)
MAX_CLASSES = {"voc": 255, "ade20k": 255, "cityscapes": 255, "folder": 255}
CITY = "segfactory"  # Cityscapes files sit in leftImg8bit/<split>/<city>/
PARTS = ".parts"


@dataclass(frozen=True)
class Target:
    """Where one export writes and how (what every worker needs to know)."""

    fmt: str
    out: str  # OUT as given (path or URI)
    palette: list[list[int]]
    val_fraction: float
    classes: list[str]


def split_of(sample_id: str, val_fraction: float) -> str:
    """``val`` for a stable share ``val_fraction`` of sample ids (sha256, never Python's hash)."""
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def file_id(sample_id: str) -> str:
    """A sample id as a file name: ``a/imgsyn/0`` -> ``a__imgsyn__0``."""
    return sample_id.replace("/", "__")


def _ext(image: bytes) -> str:
    return ".png" if image[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def _png(mask: np.ndarray, mode: str, palette: bytes | None = None) -> bytes:
    img = Image.fromarray(mask.astype(np.uint8), "L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _as_png(image: bytes) -> bytes:
    if _ext(image) == ".png":
        return image
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _palette_bytes(palette: list[list[int]]) -> bytes:
    """256 RGB entries: the dataset's colours, 255 (ignore) in VOC's boundary colour."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.array(palette, np.uint8)[:256]
    table[S.IGNORE_INDEX] = (224, 224, 192)
    return table.tobytes()


def _decode(mask_png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(mask_png)) as img:
        return np.array(img)


def write_sample(t: Target, row: dict[str, Any], split: str) -> dict[str, Any] | None:
    """Write one sample's files; return its COCO record (``coco``), else None."""
    root = storage.resolve(t.out, "OUT")
    fid, image = file_id(row[S.SAMPLE_ID]), row[S.IMAGE]
    mask = _decode(row[S.MASK])
    if t.fmt == "voc":
        storage.write_bytes(root / "JPEGImages" / f"{fid}{_ext(image)}", image)
        storage.write_bytes(root / "SegmentationClass" / f"{fid}.png", _png(mask, "P", _palette_bytes(t.palette)))
    elif t.fmt == "ade20k":
        sub = {"train": "training", "val": "validation"}[split]
        ade = np.where(mask == S.IGNORE_INDEX, 0, mask.astype(np.int64) + 1)  # 0 = other
        storage.write_bytes(root.join("images", sub, f"{fid}{_ext(image)}"), image)
        storage.write_bytes(root.join("annotations", sub, f"{fid}.png"), _png(ade, "L"))
    elif t.fmt == "folder":
        storage.write_bytes(root.join("images", split, f"{fid}{_ext(image)}"), image)
        storage.write_bytes(root.join("masks", split, f"{fid}.png"), _png(mask, "L"))
    elif t.fmt == "cityscapes":
        storage.write_bytes(root.join("leftImg8bit", split, CITY, f"{fid}_leftImg8bit.png"), _as_png(image))
        gt = root.join("gtFine", split, CITY)
        storage.write_bytes(gt / f"{fid}_gtFine_labelTrainIds.png", _png(mask, "L"))
        storage.write_bytes(gt / f"{fid}_gtFine_color.png", _png(mask, "P", _palette_bytes(t.palette)))
    elif t.fmt == "coco":
        name = f"{split}/{fid}{_ext(image)}"
        storage.write_bytes(root.join("images", name), image)
        return {"file_name": name, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                "sample_id": row[S.SAMPLE_ID], "anns": coco_annotations(mask)}
    return None


def coco_annotations(mask: np.ndarray) -> list[dict[str, Any]]:
    """One COCO "stuff" annotation per class present: RLE, area, bbox; ``category_id`` = class
    id + 1 (COCO ids start at 1); ignore pixels belong to no annotation."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # an optional dependency: `pip install segfactory[export]`
        raise ImportError("--format coco needs pycocotools: pip install 'segfactory[export]'") from None

    out = []
    for c in np.unique(mask):
        if int(c) == S.IGNORE_INDEX:
            continue
        rle = mask_utils.encode(np.asfortranarray((mask == c).astype(np.uint8)))
        out.append({"category_id": int(c) + 1, "segmentation": {"size": rle["size"],
                                                                "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0})
    return out


HF_COLUMNS = (S.SAMPLE_ID, S.SOURCE_ID, S.METHOD, S.CAPTION, S.PROMPT, S.SEED, S.GENERATOR)


def hf_table(t: Target, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows in the Hugging Face layout: ``image``/``annotation`` as Image structs, ``classes``
    (the class ids present) as a sequence of ClassLabel; the features ride in the schema metadata."""
    def img(data: bytes, name: str) -> dict[str, Any]:
        return {"bytes": data, "path": name}

    cols: dict[str, list[Any]] = {
        "image": [img(r[S.IMAGE], file_id(r[S.SAMPLE_ID]) + _ext(r[S.IMAGE])) for r in rows],
        "annotation": [img(r[S.MASK], file_id(r[S.SAMPLE_ID]) + ".png") for r in rows],
        "classes": [[int(c) for c in np.unique(_decode(r[S.MASK])) if int(c) != S.IGNORE_INDEX] for r in rows]}
    for c in HF_COLUMNS:
        cols[c] = [r.get(c) for r in rows]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrow = pa.schema([("image", image), ("annotation", image), ("classes", pa.list_(pa.int64())),
                       *[(c, pa.int64() if c == S.SEED else pa.string()) for c in HF_COLUMNS]])
    table = pa.table(cols, schema=arrow)
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": hf_features(t.classes)}})})


def hf_features(classes: list[str]) -> dict[str, Any]:
    """The ``datasets`` features of :func:`hf_table` (its JSON form)."""
    value = {"dtype": "string", "_type": "Value"}
    return {"image": {"_type": "Image"}, "annotation": {"_type": "Image"},
            "classes": {"feature": {"names": list(classes), "_type": "ClassLabel"}, "_type": "List"},
            S.SAMPLE_ID: value, S.SOURCE_ID: value, S.METHOD: value, S.CAPTION: value, S.PROMPT: value,
            S.SEED: {"dtype": "int64", "_type": "Value"}, S.GENERATOR: value}


def export_shard(batch: dict[str, np.ndarray], target: Target) -> dict[str, np.ndarray]:
    """Ray Data UDF: each row names one shard (``shard``: URI, ``index``); returns per shard
    the rows written per split."""
    out: dict[str, list[int]] = {"index": [], "train": [], "val": []}
    for uri, index in zip(batch["shard"], batch["index"], strict=True):
        counts = _export_one(target, str(uri), int(index))
        out["index"].append(int(index))
        out["train"].append(counts["train"])
        out["val"].append(counts["val"])
    return {k: np.array(v, np.int64) for k, v in out.items()}


def _export_one(t: Target, uri: str, index: int) -> dict[str, int]:
    loc = storage.resolve(uri, "shard")
    pf = pq.ParquetFile(loc.path, filesystem=loc.fs)
    names = [c for c in (S.SAMPLE_ID, S.SOURCE_ID, S.METHOD, S.CAPTION, S.PROMPT, S.SEED, S.GENERATOR,
                         S.IMAGE, S.MASK) if c in pf.schema_arrow.names]
    parts: dict[str, list[str]] = {"train": [], "val": [], "captions": [], "coco": []}
    root = storage.resolve(t.out, "OUT")
    for group in range(pf.num_row_groups):  # one row group in memory at a time
        hf_rows: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        for row in pf.read_row_group(group, columns=names).to_pylist():
            split = split_of(row[S.SAMPLE_ID], t.val_fraction)
            parts[split].append(file_id(row[S.SAMPLE_ID]))
            parts["captions"].append(json.dumps({"id": file_id(row[S.SAMPLE_ID]), "caption": row.get(S.CAPTION) or ""}))
            if t.fmt == "hf":
                hf_rows[split].append(row)
            elif (rec := write_sample(t, row, split)) is not None:
                parts["coco"].append(json.dumps({"split": split, **rec}))
        for split, rows in hf_rows.items():  # hf: one Parquet file per shard row group and split
            if rows:
                storage.write_parquet(hf_table(t, rows), root.join("data", f"{split}-{index:05d}-{group:04d}.parquet"))
    for name, lines in parts.items():
        storage.write_text(root.join(PARTS, name, f"{index:08d}.txt"), "".join(f"{ln}\n" for ln in lines))
    return {"train": len(parts["train"]), "val": len(parts["val"])}
