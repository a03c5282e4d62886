"""[caption, colour map, image] training pairs from any source ``generate`` reads.

:func:`make_pairs` runs as a Ray Data CPU task on rows of :func:`pipelines.sources.index_source`:
it decodes one row (``load_pixels``), resizes the short side to the resolution and centre
crops (mask with NEAREST, so no blended colours), paints the colour map with the same codec
and palette the generation graph decodes with (``actors.colormap.mask_to_color``) and picks
the caption. A row that cannot be read is dropped with its reason (logged and counted in
``final.json``); the run goes on. :class:`EncodeActor` is the caching pass's actor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CAPTION, TARGET, COND = "caption", "target", "cond"
ORIG_HW, CROP_TL, DROP = "orig_hw", "crop_tl", "drop_reason"


def resize_crop(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Short side -> ``side`` (image Lanczos, mask NEAREST), centre crop; returns the crop's
    top-left in resized pixels (SDXL's crop conditioning)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
    msk = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.Resampling.NEAREST))
    top, left = (nh - side) // 2, (nw - side) // 2
    return (img[top:top + side, left:left + side], msk[top:top + side, left:left + side], (top, left))


def caption_for(row_caption: str, mask: np.ndarray, classes: Sequence[str], background: int | None,
                source: str, template: str) -> str:
    """The source's caption (``auto`` and present), else the class-name template."""
    from pipelines.sources import caption_from_mask

    if source == "auto" and row_caption:
        return row_caption
    return template.replace("{caption}", caption_from_mask(mask, classes, background))


def make_pairs(batch: dict[str, np.ndarray], *, format: str, classes: list[str], background: int | None,
               palette: list[list[int]], resolution: int, caption_source: str, template: str) -> dict[str, np.ndarray]:
    """Index rows -> pairs: ``caption``, ``target`` (image, uint8 R x R x 3), ``cond`` (colour
    map, same shape), ``orig_hw``, ``crop_tl``; bad rows keep a ``drop_reason``."""
    from actors.colormap import mask_to_color
    from pipelines.sources import SourceError, load_pixels

    pal = np.asarray(palette, dtype=np.uint8)
    n = len(batch["source_id"])
    out: dict[str, list] = {k: [] for k in (CAPTION, TARGET, COND, ORIG_HW, CROP_TL, DROP, "source_id")}
    blank = np.zeros((resolution, resolution, 3), np.uint8)
    for i in range(n):
        row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        reason, cap, img, col, hw, tl = "", "", blank, blank, (0, 0), (0, 0)
        try:
            image, mask = load_pixels(row, format, len(classes))
            if mask is None:
                raise SourceError(f"{row['source_path']}: no mask", "missing_mask")
            hw = image.shape[:2]
            img, msk, tl = resize_crop(image, mask, resolution)
            col = mask_to_color(msk, pal)
            cap = caption_for(str(row.get("caption") or ""), msk, classes, background, caption_source, template)
        except (SourceError, ValueError) as exc:
            reason = f"{getattr(exc, 'reason', 'bad_source')}: {str(exc).splitlines()[0]}"
            log.warning("finetune pairs: dropping %s (%s)", row.get("source_id"), reason)
        out["source_id"].append(str(row["source_id"]))
        out[CAPTION].append(cap)
        out[TARGET].append(img)
        out[COND].append(col)
        out[ORIG_HW].append(np.asarray(hw, np.int32))
        out[CROP_TL].append(np.asarray(tl, np.int32))
        out[DROP].append(reason)
    return {k: (np.array(v, dtype=object) if k in (CAPTION, DROP, "source_id") else np.stack(v))
            for k, v in out.items()}


class EncodeActor:
    """The caching pass: pairs -> ``latents`` (+ ``latents_flip``) of the denoised picture and
    text embeddings, computed once so training steps run only the UNet / ControlNet.

    ``target_key`` is the picture the model learns to draw: the colour map (Text2Mask) or the
    image (Mask2Img, LoRA). Pixels are dropped; ``cond`` (the colour map) stays for ControlNet.
    """

    def __init__(self, build: dict[str, Any], family: str, target_key: str, flip: bool, seed: int,
                 device: str | None = None) -> None:
        from actors.diffusion_models import pick_device
        from training.finetune.models import PairEncoder, build_components

        self.device = pick_device(device)
        comps = build_components(**build, device=self.device)
        self.encoder = PairEncoder(comps, family, self.device)
        self.target_key, self.flip, self.seed = target_key, flip, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        gen = torch.Generator(self.device).manual_seed(self.seed + len(batch[CAPTION]))
        pixels = np.ascontiguousarray(batch[self.target_key])
        out = {k: batch[k] for k in ("source_id", CAPTION, COND, ORIG_HW, CROP_TL)}
        out["latents"] = self.encoder.encode_pixels(pixels, gen).float().cpu().numpy()
        if self.flip:
            out["latents_flip"] = self.encoder.encode_pixels(pixels[:, :, ::-1].copy(), gen).float().cpu().numpy()
        text = self.encoder.encode_text([str(c) for c in batch[CAPTION]])
        out["prompt_embeds"] = text["prompt_embeds"].float().cpu().numpy()
        if "pooled" in text:
            out["pooled"] = text["pooled"].float().cpu().numpy()
        return out
