"""A small "real" toy dataset in PASCAL VOC layout, rendered with gap=0.

The toy preset's stand-in for a real labelled dataset: the factory reads it as a VOC source,
and training evaluates on its val split, so synthetic renders (gap > 0) face a real domain gap.
Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from actors.colormap import voc_palette
from actors.toy_domain import CLASSES, caption_for, render_image, sample_layout
from core.schema import derive_seed

JPEG_QUALITY = 95


def _sample(sample_id: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask and gap=0 image of one sample, each from its own seed-derived stream."""
    s = derive_seed(seed, sample_id)
    rng = np.random.default_rng((s, 0))
    k = int(rng.integers(1, 4))
    names = [CLASSES[i] for i in sorted(rng.choice(np.arange(1, len(CLASSES)), k, replace=False))]
    mask = sample_layout(rng, names, size, size)
    image = render_image(mask, np.random.default_rng((s, 1)), gap=0.0)
    return mask, image


def _png_p(mask: np.ndarray, palette: bytes) -> bytes:
    """A VOC-style palette ("P" mode) PNG whose pixel indices are the class ids."""
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TOY_PARTS = ("JPEGImages", "SegmentationClass", "ImageSets", "captions.jsonl", "classes.txt")


def _clear_previous(out: Path) -> None:
    """A toy dataset written there before is replaced whole (no stale images from a larger
    run); any other non-empty directory is refused rather than mixed into."""
    import shutil

    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not entries <= set(TOY_PARTS) or "classes.txt" not in entries:
        raise ValueError(f"{out}: not empty and not a toy dataset written by `segfactory toy-data`; "
                         "give a new or empty directory")
    for name in entries:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def make_toy_dataset(out: Path, n_train: int = 200, n_val: int = 100, size: int = 128,
                     seed: int = 0) -> Path:
    """Write JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/{train,val}
    .txt, captions.jsonl and classes.txt under ``out``; returns ``out``."""
    out = Path(out)
    if min(n_train, n_val) < 0 or size < 8:
        raise ValueError(f"toy data: --train {n_train} --val {n_val} --size {size}: counts must be >= 0 "
                         "and the side >= 8")
    _clear_previous(out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette(256).tobytes()
    splits = {"train": [f"toy_train_{i:05d}" for i in range(n_train)],
              "val": [f"toy_val_{i:05d}" for i in range(n_val)]}
    captions = []
    for split, ids in splits.items():
        for sid in ids:
            mask, image = _sample(sid, seed, size)
            Image.fromarray(image).save(out / "JPEGImages" / f"{sid}.jpg", quality=JPEG_QUALITY)
            (out / "SegmentationClass" / f"{sid}.png").write_bytes(_png_p(mask, palette))
            captions.append(json.dumps({"id": sid, "caption": caption_for(mask)}))
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{sid}\n" for sid in ids))
    (out / "captions.jsonl").write_text("".join(f"{c}\n" for c in captions))
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    return out
