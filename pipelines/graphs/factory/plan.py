"""The ``factory`` graph: Diffusion Synthesis (seed 001) as a Ray Data pipeline.

images (no masks) -> load -> captioner pool (rows without a caption) -> Grounding DINO pool ->
SAM pool (mask = pseudo-label) -> expand K (seed per copy) -> prompts (multi-way) -> colour map
-> Mask2Img pool (ControlNet) -> CLIP pool -> similarity filter (ε) -> Grounding DINO + SAM pools
again on the variant -> re-segmentation filter (τ) -> finalize.

One deviation from the issue's listed order: the prompt builder runs after SAM and the
expansion, not before grounding, because "the image's class names" it appends are the classes
in the image's mask, and each of the K variants draws its own way (and synonyms) from its own
seed. The grounding text prompt ("cat . dog .") needs only the target class list.

Row accounting: a source row that cannot be read or in which no target class is found stays
one rejected row (``siblings`` = 1); every other source row becomes exactly K rows, kept or
dropped, so the writer knows when a shard is complete. Filters never remove rows; they set
``drop_reason`` and their score, and later model pools skip dropped rows (so a variant dropped
for low similarity is never re-segmented).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from core import schema as S
from core.config import ConfigError
from pipelines import stages
from pipelines.graphs import GraphSpec, ModelRef, ModelStage, RunContext, Stage, register
from pipelines.graphs.base import (
    REAL_PRESETS,
    CaptionerPool,
    captioner_stage,
    captions_mode,
    cpu_args,
    mask2img_actor,
    mask2img_models,
    pool_args,
    transformers_ref,
)
from pipelines.graphs.factory import prompts, selection

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig

FACTORY_PRESETS = ("tiny", "sdxl", "sd15")
# Sections that change a factory dataset's bytes. imgsyn/masksyn/text2mask/toy do not, but the
# hand-kept hash before the registry included them: kept, so existing datasets keep their hash.
HASH_SECTIONS = ("imgsyn", "masksyn", "text2mask", "mask2img", "toy",
                 "captioner", "grounding", "sam", "clip", "prompts", "factory", "selection")
NO_OBJECTS = "no_objects"
_SOURCE_COLUMNS: dict[str, Any] = {
    S.SAMPLE_ID: "", S.SOURCE_ID: "", S.METHOD: "factory", S.CAPTION: "", S.PROMPT: "", S.SEED: 0,
    S.HEIGHT: 0, S.WIDTH: 0, S.IMAGE_RAW: b"", S.MASK_RAW: b"", S.COLOR_RAW: b"", S.SOURCE_IMAGE_RAW: b"",
    S.GENERATOR: "", S.DROP_REASON: "", S.SHARD: 0, stages.SIBLINGS: 1, S.SOURCE_PATH: "",
}
_INT_COLUMNS = {S.SEED, S.HEIGHT, S.WIDTH, S.SHARD, stages.SIBLINGS, S.BOX_COUNT}
_DROPPED_AFTER_SAM = (S.BOXES, S.BOX_LABELS, S.BOX_SCORES, S.BOX_COUNT)


class GroundingPool(stages.Gated):
    """Grounding DINO on the real image."""


class SamPool(stages.Gated):
    """SAM on the real image's boxes."""


class ClipPool(stages.Gated):
    """CLIP embeddings of variant and real image."""


class ResegGroundingPool(stages.Gated):
    """Grounding DINO on the variant (re-segmentation)."""


class ResegSamPool(stages.Gated):
    """SAM on the variant's boxes (re-segmentation)."""


def _columns(out: dict[str, list]) -> dict[str, np.ndarray]:
    arrays = {}
    for col, values in out.items():
        if col in _INT_COLUMNS:
            arrays[col] = np.array(values, dtype=np.int64)
        else:
            arrays[col] = np.empty(len(values), dtype=object)
            arrays[col][:] = values
    return arrays


def load_images(batch: dict[str, np.ndarray], *, source_format: str, num_classes: int) -> dict[str, np.ndarray]:
    """Index rows -> one row per source with its RGB image; an unreadable file becomes a
    rejected row naming it. A mask the source may have is not used: SAM draws the masks."""
    from pipelines.sources import SourceError, load_pixels

    out: dict[str, list] = {c: [] for c in _SOURCE_COLUMNS}
    for i in range(len(batch[S.SOURCE_ID])):
        row = {k: v[i] for k, v in batch.items()}
        sid = str(row[S.SOURCE_ID])
        values = dict(_SOURCE_COLUMNS, **{
            S.SAMPLE_ID: f"{sid}/source", S.SOURCE_ID: sid, S.SHARD: int(row[S.SHARD]),
            S.SOURCE_PATH: str(row.get(S.SOURCE_PATH) or ""), S.CAPTION: str(row.get(S.CAPTION) or "")})
        try:
            image, _ = load_pixels(row, source_format, num_classes)
            values.update({S.IMAGE_RAW: np.ascontiguousarray(image).tobytes(),
                           S.HEIGHT: image.shape[0], S.WIDTH: image.shape[1]})
        except SourceError as exc:
            values[S.DROP_REASON] = f"{getattr(exc, 'reason', 'bad_source')}: {exc}"[:500]
        for col in out:
            out[col].append(values[col])
    return _columns(out)


def expand_variants(batch: dict[str, np.ndarray], *, copies: int, seed: int, mask_dtype: str,
                    background: int | None, drop_empty: bool) -> dict[str, np.ndarray]:
    """One source row (image + SAM mask) -> K variant rows, each with its own id and seed.

    The real image moves to ``source_image_raw`` (the CLIP filter compares against it) and
    ``image_raw`` is emptied for Mask2Img to fill. A dropped source, or one whose mask holds
    no target class (``drop_empty``), stays a single rejected row.
    """
    keep_cols = [c for c in batch if c not in _DROPPED_AFTER_SAM]
    out: dict[str, list] = {c: [] for c in keep_cols}
    out.setdefault(S.SOURCE_IMAGE_RAW, [])
    for i in range(len(batch[S.SOURCE_ID])):
        row = {c: batch[c][i] for c in keep_cols}
        reason = str(row[S.DROP_REASON] or "")
        if not reason and drop_empty:
            mask = S.raw_to_array(row[S.MASK_RAW], int(row[S.HEIGHT]), int(row[S.WIDTH]), mask_dtype)
            objects = (mask != S.IGNORE_INDEX) & (mask != background) if background is not None else (
                mask != S.IGNORE_INDEX)
            if not objects.any():
                reason = f"{NO_OBJECTS}: no target class found in {row[S.SOURCE_ID]}"
        if reason:
            variants = [dict(row, **{S.DROP_REASON: reason, stages.SIBLINGS: 1, S.SOURCE_IMAGE_RAW: b""})]
        else:
            variants = []
            for k in range(copies):
                sample_id = S.make_sample_id(str(row[S.SOURCE_ID]), "factory", k)
                variants.append(dict(row, **{
                    S.SAMPLE_ID: sample_id, S.SEED: S.derive_seed(seed, sample_id), stages.SIBLINGS: copies,
                    S.SOURCE_IMAGE_RAW: row[S.IMAGE_RAW], S.IMAGE_RAW: b"", S.METHOD: "factory"}))
        for variant in variants:
            for col in out:
                out[col].append(variant[col])
    return _columns(out)


def _hf(spec) -> dict[str, Any]:
    return {"model_id": spec.id, "revision": spec.revision, "local_path": spec.local_path, "dtype": spec.dtype,
            "variant": spec.variant}


def _pool(name: str, cls: type, res, actor_cls: type, actor_kwargs: dict, needs: str | None = None) -> Stage:
    return Stage(name, cls, {**pool_args(res), "fn_constructor_kwargs": {
        "actor_cls": actor_cls, "actor_kwargs": actor_kwargs, "stage": name, "needs": needs}})


def factory_plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
    """Every stage of the factory graph with its map_batches arguments, in order (pure)."""
    from actors.clip_embedder import ClipEmbedder
    from actors.grounding import Grounding
    from actors.sam import SamMasks

    cpu = cpu_args(cfg)
    k = cfg.factory.samples_per_image
    g, sam, sel = cfg.grounding, cfg.sam, cfg.selection
    grounding_kwargs = {"classes": ctx.classes, "background": ctx.background, "preset": cfg.preset,
                        **_hf(g.model), "box_threshold": g.box_threshold, "text_threshold": g.text_threshold,
                        "nms_threshold": g.nms_threshold, "max_boxes": g.max_boxes}
    sam_kwargs = {"background": ctx.background, "mask_dtype": ctx.mask_dtype, "preset": cfg.preset,
                  "model_type": sam.model_type, "checkpoint": sam.checkpoint, "dtype": sam.dtype,
                  "uncertain_band": sam.uncertain_band}
    if captions_mode(cfg) != "captioner":
        raise ConfigError("captions: the factory graph captions with its captioner (template is not supported)")
    m2i_cls, m2i_kwargs = mask2img_actor(cfg, ctx)
    plan = [
        Stage("load", load_images, {**cpu, "fn_kwargs": {"source_format": source_format,
                                                          "num_classes": len(ctx.classes)}}),
        # the captioner pool starts only when some source rows have no caption
        *([captioner_stage(cfg)] if ctx.uncaptioned is None or ctx.uncaptioned > 0 else []),
        _pool("grounding", GroundingPool, g.resources, Grounding, grounding_kwargs),
        _pool("sam", SamPool, sam.resources, SamMasks, sam_kwargs),
        Stage("expand", expand_variants, {**cpu, "batch_size": max(1, cfg.cpu.batch_size // k), "fn_kwargs": {
            "copies": k, "seed": cfg.seed, "mask_dtype": ctx.mask_dtype, "background": ctx.background,
            "drop_empty": cfg.factory.drop_empty_masks}}),
        Stage("prompts", prompts.prompt_stage, {**cpu, "fn_kwargs": {
            "classes": ctx.classes, "background": ctx.background, "mask_dtype": ctx.mask_dtype,
            "ways": dict(cfg.prompts.ways), "synonym_probability": cfg.prompts.synonym_probability,
            "synonyms": cfg.prompts.synonyms}}),
        Stage("colorize", stages.colorize, {**cpu, "fn_kwargs": {
            "palette": ctx.palette, "mask_dtype": ctx.mask_dtype, "background": ctx.background,
            "min_foreground_fraction": 0.0}}),
        Stage("mask2img", stages.Mask2ImgPool, {**pool_args(cfg.mask2img.resources), "fn_constructor_kwargs": {
            "actor_cls": m2i_cls, "actor_kwargs": m2i_kwargs, "stage": "mask2img", "needs": S.IMAGE_RAW,
            "redo_if": partial(stages.image_needs_redo, min_image_std=cfg.validation.min_image_std)}}),
    ]
    if sel.similarity_threshold is not None:
        plan += [
            _pool("clip", ClipPool, cfg.clip.resources, ClipEmbedder, {"preset": cfg.preset, **_hf(cfg.clip.model)}),
            Stage("similarity", selection.similarity_stage, {**cpu, "fn_kwargs": {
                "threshold": sel.similarity_threshold}}),
        ]
    if sel.reseg_miou_threshold is not None:
        plan += [
            _pool("reseg_grounding", ResegGroundingPool, g.resources, Grounding,
                  {**grounding_kwargs, "prefix": S.RESEG_PREFIX}),
            _pool("reseg_sam", ResegSamPool, sam.resources, SamMasks,
                  {**sam_kwargs, "prefix": S.RESEG_PREFIX, "mask_column": S.RESEG_MASK_RAW}),
            Stage("reseg", selection.reseg_stage, {**cpu, "fn_kwargs": {
                "threshold": sel.reseg_miou_threshold, "mask_dtype": ctx.mask_dtype,
                "background": ctx.background, "include_background": sel.include_background}}),
        ]
    plan.append(Stage("finalize", stages.finalize, {**cpu, "fn_kwargs": {
        "image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality,
        "mask_dtype": ctx.mask_dtype, "min_image_std": cfg.validation.min_image_std}}))
    return plan



def _real(fn):
    """Model refs only under the real presets (tiny builds its models in code)."""
    return lambda cfg: fn(cfg) if cfg.preset in REAL_PRESETS else []


def _sam_models(cfg: GenerateConfig) -> list[ModelRef]:
    # a checkpoint file, never a hub id: segment-anything reads one file (sam.checkpoint)
    return [ModelRef("sam.checkpoint", "file", local_path=cfg.sam.checkpoint or None, dtype=cfg.sam.dtype)]


CAPTIONER = ModelStage("captioner", "captioner", "actors.captioner:Captioner",
                       _real(lambda cfg: [transformers_ref("captioner.model", cfg.captioner.model)]))
GROUNDING = ModelStage("grounding", "grounding", "actors.grounding:Grounding",
                       _real(lambda cfg: [transformers_ref("grounding.model", cfg.grounding.model)]))
SAM = ModelStage("sam", "sam", "actors.sam:SamMasks", _real(_sam_models))
MASK2IMG = ModelStage("mask2img", "mask2img", "actors.mask2img:Mask2Img", _real(mask2img_models))
CLIP = ModelStage("clip", "clip", "actors.clip_embedder:ClipEmbedder",
                  _real(lambda cfg: [transformers_ref("clip.model", cfg.clip.model)]))
RESEG_GROUNDING = ModelStage("reseg_grounding", "grounding", GROUNDING.actor, GROUNDING.models)
RESEG_SAM = ModelStage("reseg_sam", "sam", SAM.actor, SAM.models)


__all__ = ["CaptionerPool", "expand_variants", "factory_plan", "load_images"]


def factory_model_stages(cfg: GenerateConfig) -> list[ModelStage]:
    """The pools this config runs (the captioner is left out at run time when every row has a
    caption: see :func:`factory_plan`)."""
    out = [CAPTIONER, GROUNDING, SAM, MASK2IMG]
    if cfg.selection.similarity_threshold is not None:
        out.append(CLIP)
    if cfg.selection.reseg_miou_threshold is not None:
        out += [RESEG_GROUNDING, RESEG_SAM]
    return out


register(GraphSpec(
    name="factory", description="Diffusion Synthesis: captions, Grounding DINO + SAM masks, K ControlNet "
    "variants per image, selection by CLIP similarity and re-segmentation",
    needs_masks=False,  # SAM draws the masks
    hash_sections=HASH_SECTIONS, sections=tuple(s for s in HASH_SECTIONS if s != "toy"), model_stages=factory_model_stages, plan=factory_plan, presets=FACTORY_PRESETS,
    samples_per_row=lambda cfg: cfg.factory.samples_per_image))
