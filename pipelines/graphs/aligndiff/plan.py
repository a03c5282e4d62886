"""The ``aligndiff`` graph (seed 000): few given pairs + their embedding bank -> synthetic
image-mask pairs with masks refined by a few-shot segmenter (Algorithm 1).

given pairs (source) -> expand K prompts per pair (a bank embedding of the pair's class as an
adjective, or the plain class prompt) -> text-to-image pool that also captures the class
noun's cross-attention (image + coarse mask, one pass) -> two-round consensus refinement
(``pipelines.graphs.aligndiff.refine``: FSS pool conditioned on the given pairs, IoU > alpha keeps the
coarse mask, re-conditioning aggregate, FSS pool relabels the rest) -> finalize.

The bank comes from ``segfactory finetune`` kind=textual_inversion on the same source; a
given pair with no embedding in the bank becomes one rejected row (``no_bank_entry``).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

import numpy as np

from core import schema as S
from core.config import ConfigError
from pipelines import stages
from pipelines.graphs import GraphSpec, ModelRef, ModelStage, RunContext, Stage, register
from pipelines.graphs.aligndiff import refine as aligndiff_refine
from pipelines.graphs.base import REAL_PRESETS, cpu_args, diffusers_ref, pool_args, transformers_ref

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig

PRESETS = ("tiny", "sd15", "sdxl")
HASH_SECTIONS = ("aligndiff", "fss")
CLASS_NAME = "aligndiff_class_name"
NO_BANK_ENTRY = "no_bank_entry"
_COLUMNS: dict[str, Any] = {
    S.SAMPLE_ID: "", S.SOURCE_ID: "", S.METHOD: "aligndiff", S.CAPTION: "", S.PROMPT: "", S.SEED: 0,
    S.HEIGHT: 0, S.WIDTH: 0, S.IMAGE_RAW: b"", S.MASK_RAW: b"", S.GENERATOR: "", S.DROP_REASON: "",
    S.SHARD: 0, stages.SIBLINGS: 1, S.SOURCE_PATH: "", aligndiff_refine.TARGET_CLASS: 0, CLASS_NAME: "",
    S.PROMPT_TRUNCATED: 0,
}
_INT = {S.SEED, S.HEIGHT, S.WIDTH, S.SHARD, stages.SIBLINGS, aligndiff_refine.TARGET_CLASS, S.PROMPT_TRUNCATED}


class GeneratorPool(stages.Gated):
    """Text-to-image + attention capture (its own class so Ray's stats name it)."""


@lru_cache(maxsize=4)
def _bank_entries(bank: str) -> tuple:
    from actors.textual_inversion import load_bank

    return tuple(load_bank(bank)[0])


def expand_prompts(batch: dict[str, np.ndarray], *, bank: str, copies: int, seed: int, template: str,
                   plain_ratio: float, generator: str) -> dict[str, np.ndarray]:
    """One given pair -> ``copies`` prompt rows. Sample k names the k-th (cyclically) class of
    the pair's bank entries; with probability ``plain_ratio`` (seeded by the sample) its prompt
    is the plain class prompt, else it draws one bank embedding of that class (any given pair's)
    as the adjective."""
    from actors.textual_inversion import adjective_prompt

    entries = _bank_entries(bank)
    by_class: dict[int, list] = {}
    for e in entries:
        by_class.setdefault(e.class_id, []).append(e)
    out: dict[str, list] = {c: [] for c in _COLUMNS}
    for i in range(len(batch[S.SOURCE_ID])):
        sid = str(batch[S.SOURCE_ID][i])
        common = {S.SOURCE_ID: sid, S.SHARD: int(batch[S.SHARD][i]), S.SOURCE_PATH: str(batch[S.SOURCE_PATH][i] or ""),
                  S.GENERATOR: generator}
        own = [e for e in entries if e.source_id == sid]
        rows = []
        if not own:
            rows.append({**common, S.SAMPLE_ID: f"{sid}/source", S.METHOD: "source", stages.SIBLINGS: 1,
                         S.DROP_REASON: f"{NO_BANK_ENTRY}: given pair {sid} has no embedding in {bank}"})
        for k in range(copies if own else 0):
            entry = own[k % len(own)]
            sample_id = S.make_sample_id(sid, "aligndiff", k)
            sample_seed = S.derive_seed(seed, sample_id)
            rng = np.random.default_rng(S.derive_seed(sample_seed, "prompt"))
            plain = rng.random() < plain_ratio
            token = None if plain else by_class[entry.class_id][int(rng.integers(len(by_class[entry.class_id])))].token
            rows.append({**common, S.SAMPLE_ID: sample_id, S.SEED: sample_seed, stages.SIBLINGS: copies,
                         S.CAPTION: adjective_prompt(entry.class_name, None, template),
                         S.PROMPT: adjective_prompt(entry.class_name, token, template),
                         aligndiff_refine.TARGET_CLASS: entry.class_id, CLASS_NAME: entry.class_name})
        for row in rows:
            for col, default in _COLUMNS.items():
                out[col].append(row.get(col, default))
    return {c: (np.array(v, np.int64) if c in _INT else _objects(v)) for c, v in out.items()}


def _objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _check(cfg: GenerateConfig, ctx: RunContext) -> None:
    if not cfg.aligndiff.bank:
        raise ConfigError("aligndiff.bank: required (the embedding bank of `segfactory finetune` kind=textual_inversion)")
    if ctx.background is None:
        raise ConfigError("source: the aligndiff graph needs a background class (few-shot segmentation is "
                          "class vs background); give source.classes with the background first")


def _family(cfg: GenerateConfig) -> str:
    return {"sd15": "sd15", "sdxl": "sdxl"}.get(cfg.preset, cfg.aligndiff.model.family)


def generator_kwargs(cfg: GenerateConfig, ctx: RunContext) -> dict[str, Any]:
    a, m = cfg.aligndiff, cfg.aligndiff.model
    return {"preset": cfg.preset, "bank": a.bank, "background": ctx.background, "mask_dtype": ctx.mask_dtype,
            "steps": a.steps, "guidance_scale": a.guidance_scale, "resolution": a.resolution,
            "family": _family(cfg), "model_id": m.id, "revision": m.revision, "local_path": m.local_path,
            "dtype": m.dtype, "attention_factors": list(a.attention_factors),
            "attention_steps": tuple(a.attention_steps) if a.attention_steps else None,
            "coarse_threshold": a.coarse_threshold}


def fss_kwargs(cfg: GenerateConfig, ctx: RunContext) -> dict[str, Any]:
    f = cfg.fss
    return {"preset": cfg.preset, "background": ctx.background, "model_id": f.model.id, "revision": f.model.revision,
            "local_path": f.model.local_path, "dtype": f.model.dtype, "image_size": f.image_size}


def plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
    """Every stage of the aligndiff graph with its arguments, in order (pure)."""
    from actors.aligndiff_generator import AlignDiffGenerator
    from actors.diffusion_models import generator_name

    _check(cfg, ctx)
    a, cpu = cfg.aligndiff, cpu_args(cfg)
    name = generator_name(cfg.preset, a.model.id, a.model.revision, a.model.local_path)
    return [
        Stage("expand", expand_prompts, {**cpu, "batch_size": max(1, cfg.cpu.batch_size // a.samples_per_source),
                                         "fn_kwargs": {"bank": a.bank, "copies": a.samples_per_source, "seed": cfg.seed,
                                                       "template": a.template, "plain_ratio": a.plain_prompt_ratio,
                                                       "generator": name}}),
        Stage("generate", GeneratorPool, {**pool_args(a.resources), "fn_constructor_kwargs": {
            "actor_cls": AlignDiffGenerator, "actor_kwargs": generator_kwargs(cfg, ctx), "stage": "generate",
            "needs": S.IMAGE_RAW,
            "redo_if": partial(stages.image_needs_redo, min_image_std=cfg.validation.min_image_std)}}),
        Stage("refine", aligndiff_refine.refine, {
            "cfg": cfg, "source_format": source_format, "num_classes": len(ctx.classes), "mask_dtype": ctx.mask_dtype,
            "fss_kwargs": fss_kwargs(cfg, ctx), **pool_args(cfg.fss.resources), "cpu": cpu, "alpha": a.alpha,
            "relabel": a.relabel, "keep_masks": a.keep_masks}, kind="dataset"),
        Stage("finalize", stages.finalize, {**cpu, "fn_kwargs": {
            "image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality,
            "mask_dtype": ctx.mask_dtype, "min_image_std": cfg.validation.min_image_std}}),
    ]


def _generator_models(cfg: GenerateConfig) -> list[ModelRef]:
    return [diffusers_ref("aligndiff.model", cfg.aligndiff.model)] if cfg.preset in REAL_PRESETS else []


def _fss_models(cfg: GenerateConfig) -> list[ModelRef]:
    return [transformers_ref("fss.model", cfg.fss.model)] if cfg.preset in REAL_PRESETS else []


GENERATOR = ModelStage("generate", "aligndiff", "actors.aligndiff_generator:AlignDiffGenerator", _generator_models)
FSS = ModelStage("refine", "fss", "actors.fss_prototype:PrototypeFSS", _fss_models)

register(GraphSpec(
    name="aligndiff", description="AlignDiff: bank embeddings + coarse attention masks refined by a few-shot "
    "segmenter in two consensus rounds (seed 000)",
    needs_masks=True, hash_sections=HASH_SECTIONS, sections=("aligndiff", "fss"), model_stages=lambda cfg: [GENERATOR, FSS], plan=plan,
    presets=PRESETS,
    samples_per_row=lambda cfg: cfg.aligndiff.samples_per_source))
