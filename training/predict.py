"""``segfactory predict``: a trained model's masks for a folder or dataset of images.

One mask PNG per image, named by the image's id (``OUT/<id>.png``, class ids, uint8 or
16-bit past 255 classes), made by the same code as ``evaluate`` (:func:`training.inference.segment`,
the checkpoint's eval protocol), so the masks score exactly the mIoU ``evaluate`` reports.
Images are read and the model runs in a Ray Data actor pool (the model loads once per actor);
the PNGs are written by the actors, the driver only counts them. ``--checkpoint``, ``--data``
and ``--out`` may be URIs (``s3://...``): each actor copies the model down to its node's cache.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError

log = logging.getLogger("segfactory.train")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def resolve_model(path: str | Path):
    """(model dir :class:`~core.storage.Location`, segfactory.json) of a run (its final
    checkpoint: the model ``evaluate --checkpoint RUN`` scores), a checkpoint directory or a
    ``best/`` directory (the best by val mIoU, when asked for by name)."""
    from core import storage
    from training.recipe import model_dir, resolve_checkpoint
    from training.rundir import locate

    ckpt = resolve_checkpoint(locate(path, "--checkpoint"))
    return model_dir(ckpt), json.loads(storage.read_text(ckpt / "segfactory.json"))


def image_rows(data: str | Path, format: str, split: str | None) -> list[dict[str, str]]:
    """(id, image path) of the images to segment: a plain folder of images (``format=images``)
    or a source dataset's split (labels not needed)."""
    from core import storage
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError

    if format == "images":
        try:
            root = storage.resolve(str(data), "--data")
            files = storage.listdir(root, recursive=True) if storage.is_dir(root) else []
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
        rows = []
        for f in files:
            rel = f.path[len(root.path):].lstrip("/")
            stem, ext = os.path.splitext(rel)
            if ext.lower() in IMAGE_EXTS:
                rows.append({"id": stem, "path": f.uri, "format": "images"})
    else:
        try:
            index = index_source(data, format, split=split, require_masks=False)
        except SourceError as e:
            raise ConfigError(f"--data: {e}") from None
        rows = [{"id": str(r["source_id"]), "path": str(r["source_path"]), "format": format,
                 "source_row": str(r.get("source_row") or "")} for r in index.rows]
    if not rows:
        raise ConfigError(f"--data: no images in {data} ({format})")
    return rows


class Segmenter:
    """Ray Data actor: loads the model once, segments each image, writes ``OUT/<id>.png``."""

    def __init__(self, model_path: str, meta: dict[str, Any], spec: dict[str, Any], out: str, threads: int | None = None,
                 color: bool = False):
        import torch

        from training.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from core import storage
        from training.rundir import fetch_dir

        self.arch, self.meta, self.spec, self.out = meta["arch"], meta, spec, storage.resolve(out)
        self.color = color
        self.model = load_model(self.arch, fetch_dir(model_path)).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        from core import storage
        from pipelines.sources import load_pixels
        from training.accel import autocast
        from training.inference import segment

        written = []
        for i in range(len(batch["id"])):
            row = {k: batch[k][i] for k in batch}
            if row["format"] == "images":
                image = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.resolve_file(row["path"])))).convert("RGB"))
            else:
                image, _ = load_pixels({"source_id": row["id"], "source_path": row["path"],
                                        "source_row": row["source_row"] or 0}, row["format"])
            with torch.no_grad(), autocast(self.device, "auto"):
                probs = segment(self.model, self.arch, torch.from_numpy(np.ascontiguousarray(image)).to(self.device),
                                self.spec, self.meta["mean"], self.meta["std"])
            pred = probs.argmax(0).cpu().numpy()
            dest = self.out / f"{row['id']}.png"
            storage.write_bytes(dest, mask_png(pred, len(self.meta["classes"])))  # temp + rename, or one PUT
            if self.color:  # class ids look black in a viewer: a palette PNG beside them
                storage.write_bytes(self.out / "color" / f"{row['id']}.png", color_png(pred, len(self.meta["classes"])))
            written.append(str(dest))
        return {"path": np.array(written, dtype=object)}


def color_png(pred: np.ndarray, num_classes: int) -> bytes:
    """The prediction as a palette ("P") PNG in VOC colours: its pixel values are still the
    class ids (up to 255 classes), so tools reading ids read it too."""
    from PIL import Image

    from actors.colormap import voc_palette

    im = Image.fromarray(pred.astype(np.uint8), "L").convert("P")
    im.putpalette(voc_palette(256).tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def mask_png(pred: np.ndarray, num_classes: int) -> bytes:
    """Class ids as a single-channel PNG (uint8, or 16-bit past 255 classes)."""
    from PIL import Image

    im = Image.fromarray(pred.astype(np.uint8)) if num_classes <= 255 else Image.fromarray(pred.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def run_predict(checkpoint: str | Path, data: str | Path, out: str | Path, format: str = "images",
                split: str | None = None, *, batch_size: int = 4, actors: int = 1, cpus_per_actor: float = 1.0,
                gpus_per_actor: float = 0.0, eval_overrides: dict[str, Any] | None = None, ray_cfg=None,
                color: bool = False) -> dict[str, Any]:
    """Write ``OUT/<id>.png`` for every image of ``data``; returns a summary (also
    ``OUT/predict.json``)."""
    import ray

    from core import storage
    from core.config import RayConfig
    from core.runtime import init_ray
    from training.inference import eval_protocol

    model_path, meta = resolve_model(checkpoint)
    spec = eval_protocol(meta, eval_overrides)
    rows = image_rows(data, format, split)
    from training.rundir import writable

    out = writable(out, "--out")
    storage.makedirs(out)
    init_ray(ray_cfg or RayConfig(show_progress=False))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(200, len(rows) // batch_size)))
    ds = ds.map_batches(Segmenter, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                        fn_constructor_kwargs={"model_path": str(model_path), "meta": meta, "spec": spec,
                                               "out": str(out), "threads": max(1, int(cpus_per_actor)),
                                               "color": color and len(meta["classes"]) <= 256})
    written = sum(len(b["path"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
    summary = {"checkpoint": str(model_path), "step": meta.get("step"), "data": str(data), "format": format,
               "split": split, "images": written, "out": str(out), "protocol": spec}
    storage.write_text(out / "predict.json", json.dumps(summary, indent=1))
    log.info("predicted %d masks with %s -> %s", written, model_path, out)
    return summary
