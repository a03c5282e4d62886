"""What every graph module shares: map_batches arguments, model refs, the common model stages.

Building a graph is a pure function of the config (and of what the driver learned from the
source), so tests assert on the ``map_batches`` arguments of each :class:`Stage` without a GPU.
Ray is imported only where an actor pool strategy is made, so the config hash and the dry run
stay light.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from core import schema as S
from pipelines import stages
from pipelines.graphs import ModelRef, RunContext, Stage, get_graph

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig
    from pipelines.specs import CaptionerStage, Resources


# Sub-folders a diffusers pipeline of each family loads from its repo (the tokenizers and
# text encoders, the UNet, the VAE, the scheduler config). SD 1.5's safety checker and feature
# extractor are passed as None (actors.diffusion_models._extras), so they are not fetched.
PIPELINE_COMPONENTS = {
    "sdxl": ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"),
    "sd15": ("scheduler", "text_encoder", "tokenizer", "unet", "vae"),
}


REAL_PRESETS = ("sdxl", "sd15")  # presets that load weights (by id or local path); the others build in code


def diffusers_ref(key: str, spec: Any, kind: str = "diffusers-pipeline") -> ModelRef:
    """A ModelRef of a :class:`pipelines.config.ModelSpec` (``variant`` when the spec has one)."""
    components = PIPELINE_COMPONENTS[spec.family] if kind == "diffusers-pipeline" else ()
    return ModelRef(key, kind, spec.id, spec.revision, spec.local_path, getattr(spec, "variant", None),
                    spec.dtype, components)


def transformers_ref(key: str, spec: Any) -> ModelRef:
    """A ModelRef of a :class:`pipelines.config.HfModelSpec`."""
    return ModelRef(key, "transformers", spec.id, spec.revision, spec.local_path, getattr(spec, "variant", None),
                    spec.dtype)


class CaptionerPool(stages.Gated):
    """Captioner stage: runs on the rows without a caption (own class so Ray names it)."""


def captions_mode(cfg: GenerateConfig) -> str:
    """What fills a caption the source lacks: ``captioner`` or ``template`` (class names);
    ``captions: null`` = the graph's ``default_captions``."""
    return cfg.captions if cfg.captions is not None else get_graph(cfg.pipeline).default_captions(cfg)


def captioner_under_real_presets(cfg: GenerateConfig) -> str:
    """SegGen's default: the captioner (its BLIP-2) under the real presets; the class-name
    template under toy/tiny/sdxl-random, as before the ``captions`` key existed."""
    return "captioner" if cfg.preset in REAL_PRESETS else "template"


def captioner_actor(cfg: GenerateConfig) -> tuple[type, dict]:
    """(class, kwargs) of the captioner actor."""
    return captioner_actor_of(cfg.captioner, cfg.preset)


def captioner_actor_of(cap: CaptionerStage, preset: str, **extra: Any) -> tuple[type, dict]:
    """(class, kwargs) of the captioner actor of one ``captioner`` section (generation's, or
    ``segfactory finetune``'s); ``extra`` adds actor arguments (e.g. ``image_column``)."""
    from actors.captioner import Captioner

    return Captioner, {"kind": cap.kind, "preset": preset, "model_id": cap.model.id,
                       "revision": cap.model.revision, "local_path": cap.model.local_path, "dtype": cap.model.dtype,
                       "prompt": cap.prompt, "max_new_tokens": cap.max_new_tokens,
                       "min_new_tokens": cap.min_new_tokens, "num_beams": cap.num_beams, **extra}


def captioner_stage(cfg: GenerateConfig) -> Stage:
    """The captioner pool, gated on rows whose caption is empty."""
    return captioner_pool(cfg.captioner, cfg.preset)


def captioner_pool(cap: CaptionerStage, preset: str, **extra: Any) -> Stage:
    """The captioner pool of one ``captioner`` section, gated on rows whose caption is empty."""
    cls, kwargs = captioner_actor_of(cap, preset, **extra)
    return Stage("captioner", CaptionerPool, {**pool_args(cap.resources), "fn_constructor_kwargs": {
        "actor_cls": cls, "actor_kwargs": kwargs, "stage": "captioner", "needs": S.CAPTION}})


def pool_args(res: Resources) -> dict[str, Any]:
    """map_batches arguments of a model stage: an autoscaling actor pool, explicit batch size."""
    import ray

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


def cpu_args(cfg: GenerateConfig) -> dict[str, Any]:
    """map_batches arguments of a CPU task stage."""
    return {"batch_size": cfg.cpu.batch_size, "num_cpus": cfg.cpu.num_cpus, "batch_format": "numpy"}


def _sampling_kwargs(stage) -> dict[str, Any]:
    """Sampler, VAE override and speed options of a diffusion stage (actor keyword arguments)."""
    return {"sampler": stage.sampler, "vae": stage.vae.model_dump() if stage.vae else None,
            **stage.speed.actor_kwargs()}


def _model_kwargs(spec, prefix: str = "") -> dict[str, Any]:
    keys = ("id", "revision", "local_path", "variant") if prefix else \
        ("id", "revision", "local_path", "dtype", "variant", "lora_path")
    names = {"id": "model_id"} if not prefix else {}
    return {f"{prefix}{names.get(k, k)}": getattr(spec, k) for k in keys}


def text2mask_actor(cfg: GenerateConfig, ctx: RunContext) -> tuple[type, dict]:
    """(class, kwargs) of the Text2Mask actor for the configured preset."""
    palette = ctx.palette.tolist()
    if cfg.preset == "toy":
        from actors.toy_text2mask import ToyText2Mask

        return ToyText2Mask, {"resolution": cfg.toy.resolution, "palette": palette}
    from actors.text2mask import Text2Mask

    t2m = cfg.text2mask
    return Text2Mask, {"preset": cfg.preset, "family": t2m.model.family, "palette": palette, "steps": t2m.steps,
                       "guidance_scale": t2m.guidance_scale, "resolution": t2m.resolution,
                       **_model_kwargs(t2m.model), **_sampling_kwargs(t2m)}


def mask2img_actor(cfg: GenerateConfig, ctx: RunContext) -> tuple[type, dict]:
    """(class, kwargs) of the Mask2Img actor for the configured preset."""
    if cfg.preset == "toy":
        from actors.toy_mask2img import ToyMask2Img

        return ToyMask2Img, {"gap": cfg.toy.gap, "palette": ctx.palette.tolist()}
    from actors.mask2img import Mask2Img

    m2i = cfg.mask2img
    return Mask2Img, {"preset": cfg.preset, "family": m2i.model.family, "steps": m2i.steps,
                      "guidance_scale": m2i.guidance_scale,
                      "controlnet_conditioning_scale": m2i.controlnet_conditioning_scale,
                      "resolution": m2i.resolution, **_model_kwargs(m2i.model),
                      **_model_kwargs(m2i.controlnet, prefix="controlnet_"), **_sampling_kwargs(m2i)}


def mask2img_models(cfg: GenerateConfig) -> list[ModelRef]:
    """Weights the Mask2Img stage loads: the base pipeline and the ControlNet."""
    return [diffusers_ref("mask2img.model", cfg.mask2img.model),
            diffusers_ref("mask2img.controlnet", cfg.mask2img.controlnet, kind="diffusers-model")]


POOL_KEYS = ("compute", "num_gpus", "num_cpus", "accelerator_type", "batch_format")


def colocate_stages(plan: list[Stage], pools: tuple[str, ...]) -> list[Stage]:
    """``plan`` with the stages from the first to the last of ``pools`` merged into one actor pool
    (:class:`pipelines.stages.Colocated`): one process holds every model of the span, so two
    pools never time-slice one GPU. Pool placement comes from the last pool of the span, the
    batch size from the first. Fewer than two of ``pools`` in the plan: unchanged."""
    at = [i for i, s in enumerate(plan) if s.name in pools]
    if len(at) < 2:
        return plan
    span = plan[at[0]:at[-1] + 1]
    members = [(s.name, s.fn, s.kwargs.get("fn_constructor_kwargs") or {}, s.kwargs.get("fn_kwargs") or {},
                s.kwargs.get("batch_size")) for s in span]
    host = {k: v for k, v in span[-1].kwargs.items() if k in POOL_KEYS}
    merged = Stage("+".join(s.name for s in span), stages.Colocated,
                   {**host, "batch_size": span[0].kwargs.get("batch_size"),
                    "fn_constructor_kwargs": {"members": members}})
    return [*plan[:at[0]], merged, *plan[at[-1] + 1:]]


def build_dataset(rows, plan: list[Stage]):
    """Source rows (ids, paths, captions, shard) → the stream of finished rows (a ray Dataset).

    ``rows``: object refs of Arrow tables (the index task's slices), an Arrow table, a Dataset
    of such rows, or a list of dicts."""
    import pyarrow as pa
    import ray

    if isinstance(rows, pa.Table):  # columns, zero-copy slices: no Python object per row
        from pipelines.source_index import iter_slices

        ds = ray.data.from_arrow(list(iter_slices(rows, max(1, -(-rows.num_rows // 200)))))
    elif isinstance(rows, ray.data.Dataset):
        ds = rows
    elif rows and isinstance(rows[0], ray.ObjectRef):
        ds = ray.data.from_arrow_refs(rows)
    else:
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200)))
    for stage in plan:
        ds = stage.fn(ds, **stage.kwargs) if stage.kind == "dataset" else ds.map_batches(stage.fn, **stage.kwargs)
    return ds


def stage_label(operator_name: str, plan: list[Stage]) -> str:
    """Ray Data's operator name (``MapBatches(colorize)->MapBatches(Mask2ImgPool)``, fused
    stages joined by ``->``) in the plan's stage names (``colorize + mask2img``)."""
    names = {getattr(stage.fn, "__name__", ""): stage.name for stage in plan}
    parts = re.findall(r"MapBatches\(([^)]*)\)", operator_name)
    if not parts:
        return {"FromItems": "source rows", "InputDataBuffer": "source rows"}.get(operator_name, operator_name)
    return " + ".join(names.get(part, part) for part in parts)
