"""SegGen's graphs: ImgSyn (real mask → new images), MaskSyn (caption → new mask → image), both.

One linear stream serves both methods: rows that already have a mask (ImgSyn) pass through
the Text2Mask pool untouched (its gate runs the model only on rows without a mask).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core import schema as S
from core.config import ConfigError
from pipelines import stages
from pipelines.graphs import GraphSpec, ModelRef, ModelStage, RunContext, Stage, register
from pipelines.graphs.base import (
    REAL_PRESETS,
    captioner_stage,
    captioner_under_real_presets,
    captions_mode,
    cpu_args,
    diffusers_ref,
    mask2img_actor,
    mask2img_models,
    pool_args,
    text2mask_actor,
    transformers_ref,
)
from pipelines.graphs.seggen.expand import expand_sources

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig

# Sections that change a SegGen dataset's bytes. The factory's sections are left out, so
# editing them never changes a SegGen hash (as before the registry).
HASH_SECTIONS = ("imgsyn", "masksyn", "text2mask", "mask2img", "toy")
BRANCHES = {"imgsyn": ("imgsyn", "samples_per_source"), "masksyn": ("masksyn", "samples_per_caption")}


def copies(cfg: GenerateConfig, methods: tuple[str, ...]) -> dict[str, int]:
    """Copies per source row of each SegGen method (0 for a method this graph does not run)."""
    return {m: getattr(getattr(cfg, sec), key) if m in methods else 0 for m, (sec, key) in BRANCHES.items()}


def _text2mask_models(cfg: GenerateConfig) -> list[ModelRef]:
    return [diffusers_ref("text2mask.model", cfg.text2mask.model)] if cfg.preset in REAL_PRESETS else []


def _mask2img_models(cfg: GenerateConfig) -> list[ModelRef]:
    return mask2img_models(cfg) if cfg.preset in REAL_PRESETS else []


def _captioner_models(cfg: GenerateConfig) -> list[ModelRef]:
    return [transformers_ref("captioner.model", cfg.captioner.model)] if cfg.preset in REAL_PRESETS else []


CAPTIONER = ModelStage("captioner", "captioner", "actors.captioner:Captioner", _captioner_models)
TEXT2MASK = ModelStage("text2mask", "text2mask", "actors.text2mask:Text2Mask", _text2mask_models)
MASK2IMG = ModelStage("mask2img", "mask2img", "actors.mask2img:Mask2Img", _mask2img_models)


def _model_stages(methods: tuple[str, ...]):
    def model_stages(cfg: GenerateConfig) -> list[ModelStage]:
        captioner = [CAPTIONER] if captions_mode(cfg) == "captioner" and cfg.source.format != "captions" else []
        return captioner + ([TEXT2MASK] if copies(cfg, methods)["masksyn"] else []) + [MASK2IMG]

    return model_stages


def _plan(methods: tuple[str, ...]):
    def plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
        return seggen_plan(cfg, ctx, source_format, methods)

    return plan


def seggen_plan(cfg: GenerateConfig, ctx: RunContext, source_format: str, methods: tuple[str, ...]) -> list[Stage]:
    """Every stage of the graph running ``methods`` with its map_batches arguments, in order."""
    n = copies(cfg, methods)
    first_copy = {"imgsyn": cfg.imgsyn.first_copy, "masksyn": cfg.masksyn.first_copy}
    cpu = cpu_args(cfg)
    t2m_cls, t2m_kwargs = text2mask_actor(cfg, ctx)
    m2i_cls, m2i_kwargs = mask2img_actor(cfg, ctx)

    def fault_for(stage: str) -> dict[str, Any] | None:
        if cfg.faults.stage != stage:
            return None
        return {**cfg.faults.model_dump(), "marker_dir": str(Path(cfg.output.path) / ".faults")}

    plan = []
    if captions_mode(cfg) == "captioner" and cfg.preset == "toy":
        raise ConfigError("captions: the toy preset has no captioner; use captions=template")
    if (captions_mode(cfg) == "captioner" and source_format != "captions"
            and (ctx.uncaptioned is None or ctx.uncaptioned > 0)):
        # SegGen captions images with BLIP-2; rows whose source has a caption skip the pool
        plan += [Stage("caption_load", load_uncaptioned, {**cpu, "fn_kwargs": {
            "source_format": source_format, "num_classes": len(ctx.classes)}}), captioner_stage(cfg)]
    plan += [Stage("expand", expand_sources, {
        **cpu, "batch_size": max(1, cfg.cpu.batch_size // max(1, sum(n.values()))),
        "fn_kwargs": {"copies": n, "first_copy": first_copy, "seed": cfg.seed, "source_format": source_format,
                      "classes": ctx.classes, "background": ctx.background,
                      "mask_dtype": ctx.mask_dtype}})]
    if n["masksyn"]:
        plan.append(Stage("text2mask", stages.Text2MaskPool, {
            **pool_args(cfg.text2mask.resources),
            "fn_constructor_kwargs": {"actor_cls": t2m_cls, "actor_kwargs": t2m_kwargs, "stage": "text2mask",
                                      "needs": S.MASK_RAW, "fault": fault_for("text2mask")}}))
    plan.append(Stage("colorize", stages.colorize, {**cpu, "fn_kwargs": {
        "palette": ctx.palette, "mask_dtype": ctx.mask_dtype, "background": ctx.background,
        "min_foreground_fraction": cfg.validation.min_foreground_fraction}}))
    plan.append(Stage("mask2img", stages.Mask2ImgPool, {
        **pool_args(cfg.mask2img.resources),
        "fn_constructor_kwargs": {
            "actor_cls": m2i_cls, "actor_kwargs": m2i_kwargs, "stage": "mask2img", "needs": S.IMAGE_RAW,
            "redo_if": partial(stages.image_needs_redo, min_image_std=cfg.validation.min_image_std),
            "fault": fault_for("mask2img")}}))
    plan.append(Stage("finalize", stages.finalize, {**cpu, "fn_kwargs": {
        "image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality,
        "mask_dtype": ctx.mask_dtype, "min_image_std": cfg.validation.min_image_std}}))
    return plan


def load_uncaptioned(batch: dict[str, np.ndarray], *, source_format: str, num_classes: int) -> dict[str, np.ndarray]:
    """Index rows -> the same rows with the RGB image of each row that has no caption (for the
    captioner); an unreadable image drops the row here, naming the file (expand keeps the reason)."""
    from pipelines.sources import SourceError, load_pixels

    n = len(batch[S.SOURCE_ID])
    out = dict(batch)
    images, heights, widths, reasons = [b""] * n, [0] * n, [0] * n, [""] * n
    for i in range(n):
        if S.CAPTION in batch and batch[S.CAPTION][i]:
            continue
        try:
            image, _ = load_pixels({k: v[i] for k, v in batch.items()}, source_format, num_classes)
            images[i], (heights[i], widths[i]) = np.ascontiguousarray(image).tobytes(), image.shape[:2]
        except SourceError as exc:
            reasons[i] = f"{getattr(exc, 'reason', 'bad_source')}: {exc}"[:500]
    out[S.SAMPLE_ID] = stages._objects([f"{sid}/source" for sid in batch[S.SOURCE_ID]])
    out[S.CAPTION] = stages._objects([str(c or "") for c in batch.get(S.CAPTION, [""] * n)])
    out[S.IMAGE_RAW], out[S.DROP_REASON] = stages._objects(images), stages._objects(reasons)
    out[S.HEIGHT], out[S.WIDTH] = np.array(heights, dtype=np.int64), np.array(widths, dtype=np.int64)
    return out


def _hash_extra(cfg: GenerateConfig, view: dict[str, Any]) -> dict[str, Any]:
    # captions by the captioner change the bytes: its settings enter the hash then (template
    # captions were the only kind before the key existed: those datasets keep their hash)
    if captions_mode(cfg) != "captioner":
        return {}
    return {"captions": "captioner", "captioner": view["captioner"]}


def _check_text2mask_palette(methods: tuple[str, ...]):
    def check(cfg: GenerateConfig, ctx: RunContext) -> None:
        """A fine-tuned Text2Mask records its palette: refuse one that differs, in one line."""
        from actors.diffusion_models import check_palette

        if cfg.preset != "toy" and "masksyn" in methods and cfg.masksyn.samples_per_caption:
            try:
                check_palette(cfg.text2mask.model.local_path, ctx.palette)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return check


def _samples_per_row(methods: tuple[str, ...]):
    """K ImgSyn + M MaskSyn copies of each source row (ImgSyn only for rows with a mask)."""
    return lambda cfg: sum(getattr(getattr(cfg, BRANCHES[m][0]), BRANCHES[m][1]) for m in methods)


for _name, _methods, _text in (
        ("seggen", ("imgsyn", "masksyn"), "SegGen: ImgSyn and MaskSyn in one stream"),
        ("imgsyn", ("imgsyn",), "SegGen ImgSyn: real mask -> K new images (Mask2Img)"),
        ("masksyn", ("masksyn",), "SegGen MaskSyn: caption -> M new masks (Text2Mask) -> images (Mask2Img)")):
    register(GraphSpec(
        name=_name, description=_text,
        # MaskSyn alone needs only captions, yet the hand-kept code before the registry asked
        # every SegGen graph's source for masks; kept (a caption-only source uses format=captions)
        needs_masks=True,
        hash_sections=HASH_SECTIONS, sections=("imgsyn", "masksyn", "text2mask", "mask2img", "captioner"),
        model_stages=_model_stages(_methods), plan=_plan(_methods),
        hash_extra=_hash_extra, default_captions=captioner_under_real_presets,
        extendable=tuple(BRANCHES[m] for m in _methods), check_context=_check_text2mask_palette(_methods),
        colocate=("text2mask", "mask2img"),
        samples_per_row=_samples_per_row(_methods)))
