"""The SegGen graphs (ImgSyn, MaskSyn, both) as Ray Data pipelines.

Building the graph is a pure function of the config: :func:`stage_plan` lists each stage
with its exact ``map_batches`` arguments (asserted on in tests, no GPU needed) and
:func:`build_dataset` applies them to a source Dataset. One linear stream serves both
methods: rows that already have a mask (ImgSyn) pass through the Text2Mask pool untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipelines import schema as S
from pipelines import stages
from pipelines.config import GenerateConfig, Resources


@dataclass
class Stage:
    """One ``map_batches`` call: the callable and its keyword arguments."""

    name: str
    fn: Any
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What the driver learned from the source and passes to the stages."""

    classes: list[str]
    palette: np.ndarray
    background: int | None  # class id that does not count as an object (None: every class does)

    @property
    def mask_dtype(self) -> str:
        return S.mask_dtype(len(self.classes)).str


def pool_args(res: Resources) -> dict[str, Any]:
    """map_batches arguments of a model stage: an autoscaling actor pool, explicit batch size."""
    args: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        "batch_size": res.batch_size,
        "num_gpus": res.num_gpus,
        "num_cpus": res.num_cpus,
        "batch_format": "numpy",
    }
    if res.accelerator_type:
        args["accelerator_type"] = res.accelerator_type
    return args


def _model_actors(cfg: GenerateConfig, ctx: RunContext) -> tuple[tuple[type, dict], tuple[type, dict]]:
    """(class, kwargs) of the Text2Mask and Mask2Img actors for the configured preset."""
    palette = ctx.palette.tolist()
    if cfg.preset == "toy":
        from actors.toy_mask2img import ToyMask2Img
        from actors.toy_text2mask import ToyText2Mask

        return ((ToyText2Mask, {"resolution": cfg.toy.resolution, "palette": palette}),
                (ToyMask2Img, {"gap": cfg.toy.gap, "palette": palette}))
    from actors.mask2img import Mask2Img
    from actors.text2mask import Text2Mask

    t2m, m2i = cfg.text2mask, cfg.mask2img
    return (
        (Text2Mask, {"preset": cfg.preset, "family": t2m.model.family, "palette": palette, "steps": t2m.steps,
                     "guidance_scale": t2m.guidance_scale, "resolution": t2m.resolution,
                     **_model_kwargs(t2m.model)}),
        (Mask2Img, {"preset": cfg.preset, "family": m2i.model.family, "steps": m2i.steps,
                    "guidance_scale": m2i.guidance_scale,
                    "controlnet_conditioning_scale": m2i.controlnet_conditioning_scale,
                    "resolution": m2i.resolution, **_model_kwargs(m2i.model),
                    **_model_kwargs(m2i.controlnet, prefix="controlnet_")}),
    )


def _model_kwargs(spec, prefix: str = "") -> dict[str, Any]:
    keys = ("id", "revision", "local_path") if prefix else ("id", "revision", "local_path", "dtype")
    names = {"id": "model_id"} if not prefix else {}
    return {f"{prefix}{names.get(k, k)}": getattr(spec, k) for k in keys}


def stage_plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
    """Every stage of the graph with its map_batches arguments, in order."""
    if cfg.pipeline == "factory":  # Diffusion Synthesis: its own stage list
        from pipelines.factory import factory_plan

        return factory_plan(cfg, ctx, source_format)
    copies = {"imgsyn": cfg.imgsyn.samples_per_source if cfg.pipeline in ("imgsyn", "seggen") else 0,
              "masksyn": cfg.masksyn.samples_per_caption if cfg.pipeline in ("masksyn", "seggen") else 0}
    first_copy = {"imgsyn": cfg.imgsyn.first_copy, "masksyn": cfg.masksyn.first_copy}
    cpu = {"batch_size": cfg.cpu.batch_size, "num_cpus": cfg.cpu.num_cpus, "batch_format": "numpy"}
    (t2m_cls, t2m_kwargs), (m2i_cls, m2i_kwargs) = _model_actors(cfg, ctx)

    def fault_for(stage: str) -> dict[str, Any] | None:
        if cfg.faults.stage != stage:
            return None
        return {**cfg.faults.model_dump(), "marker_dir": str(Path(cfg.output.path) / ".faults")}

    plan = [Stage("expand", stages.expand_sources, {
        **cpu, "batch_size": max(1, cfg.cpu.batch_size // max(1, sum(copies.values()))),
        "fn_kwargs": {"copies": copies, "first_copy": first_copy, "seed": cfg.seed, "source_format": source_format,
                      "classes": ctx.classes, "background": ctx.background,
                      "mask_dtype": ctx.mask_dtype}})]
    if copies["masksyn"]:
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


def build_dataset(rows: list[dict[str, Any]] | pa.Table, plan: list[Stage]) -> ray.data.Dataset:
    """Source rows (ids, paths, captions, shard; dicts or an Arrow table) → the stream of finished rows."""
    if isinstance(rows, pa.Table):  # columns, zero-copy slices: no Python object per row
        step = max(1, -(-rows.num_rows // 200))
        ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, max(rows.num_rows, 1), step)])
    else:
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200)))
    for stage in plan:
        ds = ds.map_batches(stage.fn, **stage.kwargs)
    return ds
