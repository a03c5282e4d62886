"""The attn2mask graph (seed 002): prompts -> images + cross-attention -> pseudo-masks.

source rows (ids, captions; no pixels read) -> ``prompts`` (expand to samples, synonym
augmentation, class word spans) -> ``attn_text2img`` pool (diffusers text-to-image with
attention capture) -> ``attn_masks`` (normalise, threshold, dense CRF, reliability 255)
-> ``finalize`` (checks, PNG). Rows with no reliable object pixel go to rejected/.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from core import schema as S
from pipelines import stages
from pipelines.graphs import GraphSpec, ModelRef, ModelStage, RunContext, Stage, register
from pipelines.graphs.attn2mask.masks import attn_mask_stage
from pipelines.graphs.attn2mask.prompts import expand_prompts
from pipelines.graphs.base import REAL_PRESETS, cpu_args, diffusers_ref, pool_args

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig

PRESETS = ("tiny", "sd15", "sdxl", "sdxl-random")
HASH_SECTIONS = ("attn2mask",)


class Attn2MaskPool(stages.Gated):
    """The attn2mask text-to-image stage (its own class so Ray's progress and stats name it)."""


def actor_kwargs(cfg: GenerateConfig) -> dict[str, Any]:
    """Constructor arguments of ``actors.attn_text2img.AttnText2Img`` for this config."""
    a = cfg.attn2mask
    return {"preset": cfg.preset, "family": a.model.family, "steps": a.steps,
            "guidance_scale": a.guidance_scale, "resolution": a.resolution,
            "attention_factors": list(a.attention_factors), "step_window": tuple(a.step_window),
            "model_id": a.model.id, "revision": a.model.revision, "local_path": a.model.local_path,
            "dtype": a.model.dtype, "lora_path": a.lora_path, "lora_scale": a.lora_scale,
            "sampler": a.sampler, "variant": a.model.variant}


def plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
    """Every stage of the attn2mask graph with its map_batches arguments, in order (pure)."""
    from actors.attn_text2img import AttnText2Img

    a, p = cfg.attn2mask, cfg.attn2mask.prompts
    cpu = cpu_args(cfg)
    mask_params = a.mask.model_dump(exclude={"min_reliable_foreground"})
    return [
        Stage("prompts", expand_prompts, {
            **cpu, "batch_size": max(1, cfg.cpu.batch_size // a.samples_per_source), "fn_kwargs": {
                "copies": a.samples_per_source, "first_copy": a.first_copy, "seed": cfg.seed,
                "classes": ctx.classes, "background": ctx.background, "mode": p.mode,
                "templates": list(p.templates), "max_objects": p.max_objects,
                "synonym_probability": p.synonym_probability, "synonyms": p.synonyms}}),
        Stage("attn_text2img", Attn2MaskPool, {**pool_args(a.resources), "fn_constructor_kwargs": {
            "actor_cls": AttnText2Img, "actor_kwargs": actor_kwargs(cfg), "stage": "attn_text2img",
            "needs": S.IMAGE_RAW,
            "redo_if": partial(stages.image_needs_redo, min_image_std=cfg.validation.min_image_std)}}),
        Stage("attn_masks", attn_mask_stage, {**cpu, "fn_kwargs": {
            "background": ctx.background, "mask_dtype": ctx.mask_dtype, "params": mask_params,
            "min_reliable_foreground": a.mask.min_reliable_foreground}}),
        Stage("finalize", stages.finalize, {**cpu, "fn_kwargs": {
            "image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality,
            "mask_dtype": ctx.mask_dtype, "min_image_std": cfg.validation.min_image_std}}),
    ]


def _models(cfg: GenerateConfig) -> list[ModelRef]:
    if cfg.preset not in REAL_PRESETS:
        return []
    refs = [diffusers_ref("attn2mask.model", cfg.attn2mask.model)]
    if cfg.attn2mask.lora_path:
        refs.append(ModelRef("attn2mask.lora_path", "file", local_path=cfg.attn2mask.lora_path))
    return refs


ATTN_TEXT2IMG = ModelStage("attn_text2img", "attn2mask", "actors.attn_text2img:AttnText2Img", _models)

register(GraphSpec(
    name="attn2mask", description="attn2mask: prompts (synonyms) -> text-to-image with cross-attention capture "
    "-> pseudo-masks (threshold, dense CRF, reliability 255)",
    needs_masks=False,  # the model's own attention draws the masks; source images are never read
    hash_sections=HASH_SECTIONS, sections=("attn2mask",), model_stages=lambda cfg: [ATTN_TEXT2IMG], plan=plan, presets=PRESETS,
    samples_per_row=lambda cfg: cfg.attn2mask.samples_per_source))
