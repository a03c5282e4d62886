"""SegGen's graphs: ImgSyn (real mask → new images), MaskSyn (caption → new mask → image), both.

One linear stream serves both methods: rows that already have a mask (ImgSyn) pass through
the Text2Mask pool untouched (its gate runs the model only on rows without a mask).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from pipelines import schema as S
from pipelines import stages
from pipelines.config import GenerateConfig
from pipelines.graphs import GraphSpec, ModelStage, register
from pipelines.graphs.base import (
    REAL_PRESETS,
    ModelRef,
    RunContext,
    Stage,
    cpu_args,
    diffusers_ref,
    mask2img_actor,
    mask2img_models,
    pool_args,
    text2mask_actor,
)

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


TEXT2MASK = ModelStage("text2mask", "text2mask", "actors.text2mask:Text2Mask", _text2mask_models)
MASK2IMG = ModelStage("mask2img", "mask2img", "actors.mask2img:Mask2Img", _mask2img_models)


def _model_stages(methods: tuple[str, ...]):
    def model_stages(cfg: GenerateConfig) -> list[ModelStage]:
        return ([TEXT2MASK] if copies(cfg, methods)["masksyn"] else []) + [MASK2IMG]

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

    plan = [Stage("expand", stages.expand_sources, {
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


for _name, _methods, _text in (
        ("seggen", ("imgsyn", "masksyn"), "SegGen: ImgSyn and MaskSyn in one stream"),
        ("imgsyn", ("imgsyn",), "SegGen ImgSyn: real mask -> K new images (Mask2Img)"),
        ("masksyn", ("masksyn",), "SegGen MaskSyn: caption -> M new masks (Text2Mask) -> images (Mask2Img)")):
    register(GraphSpec(
        name=_name, description=_text,
        # MaskSyn alone needs only captions, yet the hand-kept code before the registry asked
        # every SegGen graph's source for masks; kept (a caption-only source uses format=captions)
        needs_masks=True,
        hash_sections=HASH_SECTIONS, model_stages=_model_stages(_methods), plan=_plan(_methods),
        extendable=tuple(BRANCHES[m] for m in _methods)))
