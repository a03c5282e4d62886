"""The graph registry: each generation graph is declared once, in its own module here.

A :class:`GraphSpec` says what a graph needs (masks in the source, which presets), which
config sections change its output (the config hash), its model stages (actor, config section,
weights: prefetch and the dry run read them) and its plan (the ``map_batches`` calls).
The plan, prefetch, preset validation, the config hash and the scaling sweep's extension of
a dataset all derive from it; nothing else checks the method name.

A new graph = a package ``pipelines/graphs/<name>/`` whose ``plan`` module calls :func:`register`
(every sub-package's ``plan`` is imported on first use), its config sections in its ``config``
module (added to :class:`pipelines.config.GenerateConfig`) and its method modules beside them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import ConfigError
from pipelines.graphs.types import ModelRef, RunContext, Stage

if TYPE_CHECKING:
    from pipelines.config import GenerateConfig
    from pipelines.specs import Resources

__all__ = ["GraphSpec", "ModelRef", "ModelStage", "RunContext", "Stage", "get_graph", "graph_names",
           "register", "stage_plan"]


@dataclass(frozen=True)
class ModelStage:
    """One actor pool of a graph and the weights it loads."""

    name: str  # stage name in the plan, e.g. "mask2img"
    section: str  # GenerateConfig section holding its settings and `resources`, e.g. "mask2img"
    actor: str  # "actors.mask2img:Mask2Img" (import path; imported lazily)
    models: Callable[[GenerateConfig], list[ModelRef]]  # weights it loads under cfg.preset

    def resources(self, cfg: GenerateConfig) -> Resources:
        return getattr(cfg, self.section).resources


@dataclass(frozen=True)
class GraphSpec:
    """One generation graph, as the rest of the code sees it."""

    name: str  # value of cfg.pipeline
    description: str
    needs_masks: bool  # source rows must carry masks
    hash_sections: tuple[str, ...]  # config sections (beyond the common ones) entering the hash
    # graph-specific config sections it reads (pipelines.config.GRAPH_SECTIONS); a config that
    # changes any other graph's section is refused, naming the key
    sections: tuple[str, ...]
    model_stages: Callable[[GenerateConfig], list[ModelStage]]  # the pools this config will run
    plan: Callable[[GenerateConfig, RunContext, str], list[Stage]]  # pure: stages + map_batches kwargs
    presets: tuple[str, ...] = ("toy", "tiny", "sdxl", "sd15", "sdxl-random")  # the presets it runs with
    # (section, count key) of each method a dataset can be extended by (copies first_copy..;
    # the section is named after the method, e.g. ("imgsyn", "samples_per_source")):
    # the scaling sweep tops a dataset up this way; () = the graph cannot be extended
    extendable: tuple[tuple[str, str], ...] = ()
    # entries of the hash that depend on the config (cfg, its hash view) -> {key: value}: e.g.
    # SegGen's captioner section only when it captions (a template-captioned dataset keeps its hash)
    hash_extra: Callable[[GenerateConfig, dict[str, Any]], dict[str, Any]] | None = None
    # what fills a missing caption when `captions` is null: "captioner" or "template"
    default_captions: Callable[[GenerateConfig], str] = lambda cfg: "captioner"
    # the real-weight presets whose models are downloaded (prefetch); others build in code
    download_presets: tuple[str, ...] = ("sdxl", "sd15")
    # checks that need the source's classes and palette, run before any sample is made (raise
    # ConfigError naming the key): e.g. a fine-tuned Text2Mask trained under another palette
    check_context: Callable[[GenerateConfig, RunContext], None] | None = None
    # model pools that `colocate: true` runs in one actor process (with the CPU stages between
    # them), under the resources of the last; () = the graph's pools always stay apart
    colocate: tuple[str, ...] = ()
    # most samples one source row produces: output.samples_per_shard is turned into source rows by it
    samples_per_row: Callable[[GenerateConfig], int] = lambda cfg: 1


_REGISTRY: dict[str, GraphSpec] = {}
_loaded = False


def register(spec: GraphSpec) -> GraphSpec:
    """Add ``spec`` to the registry (a module calls this once at import)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"graph {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.ispkg:  # one package per graph; its plan module registers it
                importlib.import_module(f"{__name__}.{info.name}.plan")


def get_graph(name: str) -> GraphSpec:
    """The graph called ``name``; ConfigError naming ``pipeline`` when there is none."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"pipeline: unknown graph {name!r}; known: {', '.join(graph_names())}")
    return _REGISTRY[name]


def graph_names() -> list[str]:
    """Names of every registered graph, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def stage_plan(cfg: GenerateConfig, ctx: RunContext, source_format: str) -> list[Stage]:
    """Every stage of ``cfg.pipeline``'s graph with its map_batches arguments, in order."""
    graph = get_graph(cfg.pipeline)
    plan = graph.plan(cfg, ctx, source_format)
    if cfg.colocate and graph.colocate:
        from pipelines.graphs.base import colocate_stages

        plan = colocate_stages(plan, graph.colocate)
    return plan


def model_refs(cfg: GenerateConfig, stage_names: set[str] | None = None) -> list[tuple[ModelStage, ModelRef]]:
    """(model stage, weights) pairs of ``cfg``'s graph; only stages in ``stage_names`` when given."""
    out: list[tuple[ModelStage, Any]] = []
    for stage in get_graph(cfg.pipeline).model_stages(cfg):
        if stage_names is None or stage.name in stage_names:
            out.extend((stage, ref) for ref in stage.models(cfg))
    return out
