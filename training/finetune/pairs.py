"""[caption, colour map, image] training pairs from any source ``generate`` reads.

:func:`make_pairs` runs as a Ray Data CPU task on rows of :func:`pipelines.source_index.index_source`:
it decodes one row (``load_pixels``), resizes the short side to the resolution and centre
crops (mask with NEAREST, so no blended colours), paints the colour map with the same codec
and palette the generation graph decodes with (``actors.colormap.mask_to_color``) and picks
the caption (``captions.source``; a caption left empty is filled by generation's captioner
pool, :func:`pipelines.graphs.base.captioner_pool`). A row that cannot be read keeps its
reason; :func:`split_rejected` writes such rows to ``OUTPUT/rejected/`` (the dataset
contract's rejected schema) and passes the others on, so the run goes on.
:class:`EncodeActor` is the caching pass's actor.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from core import schema as S

log = logging.getLogger(__name__)

CAPTION, TARGET, COND = S.CAPTION, "target", "cond"
ORIG_HW, CROP_TL, DROP = "orig_hw", "crop_tl", S.DROP_REASON
METHOD = "finetune"  # the ``method`` of rejected pair rows


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
                source: str, template: str, fill: str = "template") -> str:
    """One pair's caption per ``captions.source``; "" = left for the captioner pool.

    ``fill`` is what ``auto`` gives a row without a source caption (``captioner`` or
    ``template``). ``file`` without a source caption raises ``SourceError`` (missing_caption).
    """
    from pipelines.sources import SourceError, caption_from_mask

    if source in ("auto", "file") and row_caption:
        return row_caption
    if source == "file":
        raise SourceError("no caption in the source's captions.jsonl (captions.source=file)", "missing_caption")
    if source == "captioner" or (source == "auto" and fill == "captioner"):
        return ""
    return template.replace("{caption}", caption_from_mask(mask, classes, background))


def make_pairs(batch: dict[str, np.ndarray], *, format: str, classes: list[str], background: int | None,
               palette: list[list[int]], resolution: int, caption_source: str, template: str,
               fill: str = "template") -> dict[str, np.ndarray]:
    """Index rows -> pairs: ``caption``, ``target`` (image, uint8 R x R x 3), ``cond`` (colour
    map, same shape), ``orig_hw``, ``crop_tl``, ``sample_id``/``source_path`` (for the captioner
    gate and rejected rows); a bad row keeps a ``drop_reason`` naming its file."""
    from actors.colormap import mask_to_color
    from pipelines.sources import SourceError, load_pixels

    pal = np.asarray(palette, dtype=np.uint8)
    n = len(batch[S.SOURCE_ID])
    out: dict[str, list] = {k: [] for k in (CAPTION, TARGET, COND, ORIG_HW, CROP_TL, DROP, S.SOURCE_ID,
                                            S.SAMPLE_ID, S.SOURCE_PATH)}
    blank = np.zeros((resolution, resolution, 3), np.uint8)
    for i in range(n):
        row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        reason, cap, img, col, hw, tl = "", "", blank, blank, (0, 0), (0, 0)
        where = str(row.get(S.SOURCE_PATH) or "")
        try:
            image, mask = load_pixels(row, format, len(classes))
            if mask is None:
                raise SourceError(f"{where}: no mask", "missing_mask")
            hw = image.shape[:2]
            img, msk, tl = resize_crop(image, mask, resolution)
            col = mask_to_color(msk, pal)
            try:
                cap = caption_for(str(row.get(CAPTION) or ""), msk, classes, background, caption_source, template, fill)
            except SourceError as exc:  # its message names no file: add the image's
                raise SourceError(f"{where}: {exc}", exc.reason) from None
        except (SourceError, ValueError) as exc:
            reason = f"{getattr(exc, 'reason', 'bad_source')}: {str(exc).splitlines()[0]}"[:500]
            img, col, cap = blank, blank, ""
            log.warning("finetune pairs: rejecting %s (%s)", row.get(S.SOURCE_ID), reason)
        out[S.SOURCE_ID].append(str(row[S.SOURCE_ID]))
        out[S.SAMPLE_ID].append(f"{row[S.SOURCE_ID]}/{METHOD}")
        out[S.SOURCE_PATH].append(where)
        out[CAPTION].append(cap)
        out[TARGET].append(img)
        out[COND].append(col)
        out[ORIG_HW].append(np.asarray(hw, np.int32))
        out[CROP_TL].append(np.asarray(tl, np.int32))
        out[DROP].append(reason)
    strings = (CAPTION, DROP, S.SOURCE_ID, S.SAMPLE_ID, S.SOURCE_PATH)
    return {k: (_objects(v) if k in strings else np.stack(v)) for k, v in out.items()}


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def rejected_table(rows: list[dict[str, str]]):
    """Rejected rows (``source_id``, ``source_path``, ``drop_reason``, optional ``caption``) as a
    table in the dataset contract's rejected schema (``pipelines.writer.REJECTED_SCHEMA``)."""
    import pyarrow as pa

    from pipelines.writer import REJECTED_SCHEMA

    return pa.Table.from_pylist(
        [{S.SAMPLE_ID: f"{r[S.SOURCE_ID]}/{METHOD}", S.SOURCE_ID: r[S.SOURCE_ID], S.METHOD: METHOD,
          S.CAPTION: r.get(CAPTION, ""), S.DROP_REASON: r[DROP], S.SOURCE_PATH: r[S.SOURCE_PATH]} for r in rows],
        schema=REJECTED_SCHEMA)


def write_rejected(rows: list[dict[str, str]], out: str | None, split: str) -> None:
    """``rows`` (``source_id``, ``source_path``, ``drop_reason``) to ``out/rejected/`` (a local
    path or a URI). The file name is a digest of the ids, so a retried task (or a pass re-run
    every epoch when latents are not cached) rewrites the same file instead of adding one."""
    if not rows or out is None:
        return
    from core import storage

    digest = hashlib.sha256("\n".join(sorted(r[S.SOURCE_ID] for r in rows)).encode()).hexdigest()[:16]
    storage.write_parquet(rejected_table(rows),
                          storage.resolve(out, "output.path") / "rejected" / f"part-{METHOD}-{split}-{digest}.parquet")


def split_rejected(batch: dict[str, np.ndarray], *, out: str | None, split: str) -> dict[str, np.ndarray]:
    """Write the batch's rejected rows to ``out/rejected/`` (``out`` None: only log them) and
    return the kept pairs only.

    A kept row whose caption is still empty (the captioner returned no text) is rejected here.
    """
    reasons = [str(r) for r in batch[DROP]]
    for i, cap in enumerate(batch[CAPTION]):
        if not reasons[i] and not str(cap).strip():
            reasons[i] = f"empty_caption: {batch[S.SOURCE_PATH][i]}: the captioner returned no text"
    bad = np.array([bool(r) for r in reasons], dtype=bool)
    write_rejected([{S.SOURCE_ID: str(batch[S.SOURCE_ID][i]), S.SOURCE_PATH: str(batch[S.SOURCE_PATH][i]),
                     DROP: reasons[i]} for i in np.flatnonzero(bad)], out, split)
    keep = ~bad
    return {k: v[keep] for k, v in batch.items() if k not in (DROP, S.SAMPLE_ID, S.SOURCE_PATH)}


def caption_fill(cfg: Any) -> str:
    """What ``captions.source=auto`` gives a row without a source caption: generation's default
    for SegGen's graphs (the captioner under the sdxl/sd15 presets, else the template)."""
    from pipelines.graphs.base import REAL_PRESETS

    return "captioner" if cfg.preset in REAL_PRESETS else "template"


def uses_captioner(cfg: Any, rows: Sequence[dict[str, Any]]) -> bool:
    """Whether any of ``rows`` gets its caption from the captioner pool."""
    mode = cfg.captions.source
    if mode == "captioner":
        return bool(rows)
    return mode == "auto" and caption_fill(cfg) == "captioner" and any(not r.get(CAPTION) for r in rows)


def captioner_stage(cfg: Any) -> Any:
    """Generation's captioner pool (``Gated`` around ``actors.captioner.Captioner``) reading the
    pair's picture: the cropped image the model is trained on, so the caption describes it."""
    from pipelines.graphs.base import captioner_pool

    return captioner_pool(cfg.captioner, cfg.preset, image_column=TARGET)


def pair_kwargs(cfg: Any, index: Any, palette: np.ndarray) -> dict[str, Any]:
    """``make_pairs`` keyword arguments of a run."""
    return {"format": index.format, "classes": list(index.classes), "background": index.background_index,
            "palette": palette.tolist(), "resolution": cfg.data.resolution, "caption_source": cfg.captions.source,
            "template": cfg.captions.template, "fill": caption_fill(cfg)}


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
