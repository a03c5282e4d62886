"""Fetch model weights once per node into its cache before the actor pools load them.

Without this, every actor of a pool calls ``from_pretrained`` at the same moment and each node
downloads the same gigabytes several times over (or actors time out waiting on the hub's file
lock). :func:`prefetch_models` runs one Ray task per node that can host a model stage, pinned
with ``NodeAffinitySchedulingStrategy``, which calls ``huggingface_hub.snapshot_download``
for the stage's model id + pinned revision with ``allow_patterns`` naming exactly the files that
stage loads (:func:`allow_patterns`: the pipeline's components, the ``variant``'s weight files,
configs and tokenizers). The models come from the graph registry's model stages; presets that
download nothing (``toy``, ``tiny``, ``sdxl-random``), models given by ``local_path`` and
checkpoint files are skipped. Where ``HF_HOME`` is a volume shared by all nodes, the first node
fills it and the others find the files in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.graphs import ModelRef, get_graph, model_refs

log = logging.getLogger(__name__)

# files of a transformers model folder besides its weights (config, processor, tokenizer)
TRANSFORMERS_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def _weights(folder: str, stem: str, variant: str | None) -> list[str]:
    """Safetensors weight files (single or sharded, + shard index) of one model folder, as
    diffusers/transformers name them: ``stem[.variant].safetensors``, shards
    ``stem[.variant]-0000k-of-0000n.safetensors``, index ``stem.safetensors.index[.variant].json``."""
    v = f".{variant}" if variant else ""
    return [f"{folder}{stem}{v}.safetensors", f"{folder}{stem}{v}-*-of-*.safetensors",
            f"{folder}{stem}.safetensors.index{v}.json"]


def allow_patterns(ref: ModelRef) -> list[str]:
    """``snapshot_download`` patterns of exactly the files the stage loading ``ref`` reads.

    Single-file checkpoints at a repo's top level (``sd_xl_base_1.0.safetensors``), ONNX /
    OpenVINO / Flax copies and the other precision's weights are never matched.
    """
    if ref.kind == "diffusers-pipeline":
        out = ["model_index.json"]
        for c in ref.components:
            out += [f"{c}/*.json", f"{c}/*.txt"]  # configs, scheduler, tokenizer vocab/merges
            if c not in ("scheduler", "tokenizer", "tokenizer_2"):
                stem = "model" if c.startswith("text_encoder") else "diffusion_pytorch_model"
                out += _weights(f"{c}/", stem, ref.variant)
        return out
    if ref.kind == "diffusers-model":
        return ["config.json", *_weights("", "diffusion_pytorch_model", ref.variant)]
    if ref.kind == "transformers":
        return [*TRANSFORMERS_FILES, *_weights("", "model", ref.variant)]
    raise ValueError(f"{ref.key}: a {ref.kind!r} model is not fetched from the hub")


@dataclass(frozen=True)
class FetchTarget:
    """One hub snapshot to fetch, and the resources of the stage that loads it (where it must be)."""

    repo_id: str
    revision: str
    allow_patterns: tuple[str, ...] = ()
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    accelerator_type: str | None = None


def fetch_targets(cfg: Any, stage_names: set[str] | None = None) -> list[FetchTarget]:
    """Hub snapshots ``cfg``'s model stages load (only ``stage_names`` when given), one per
    id@revision with the union of its patterns; empty for presets that download nothing."""
    if cfg.preset not in get_graph(cfg.pipeline).download_presets:
        return []
    out: dict[tuple[str, str], FetchTarget] = {}
    for stage, ref in model_refs(cfg, stage_names):
        if ref.kind == "file" or ref.local_path or not ref.id:  # a local path wins over the id
            continue
        res = stage.resources(cfg)
        key = (ref.id, ref.revision)
        prev = out.get(key)  # a model two stages load goes wherever either runs
        patterns = tuple(dict.fromkeys([*(prev.allow_patterns if prev else ()), *allow_patterns(ref)]))
        gpus = res.num_gpus if prev is None else min(prev.num_gpus, res.num_gpus)
        cpus = res.num_cpus if prev is None else min(prev.num_cpus, res.num_cpus)
        acc = res.accelerator_type if prev is None or prev.accelerator_type == res.accelerator_type else None
        out[key] = FetchTarget(ref.id, ref.revision, patterns, gpus, cpus, acc)
    return list(out.values())


def download(repo_id: str, revision: str, allow_patterns: tuple[str, ...] | list[str]) -> str:
    """Fetch the files of one snapshot matching ``allow_patterns`` into the HF cache."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))


def eligible_nodes(ref: FetchTarget, nodes: list[dict[str, Any]]) -> list[str]:
    """Node ids of alive nodes that could host the stage loading ``ref``."""
    out = []
    for node in nodes:
        res = node.get("Resources", {})
        if not node.get("Alive"):
            continue
        if res.get("GPU", 0) < ref.num_gpus or res.get("CPU", 0) < ref.num_cpus:
            continue
        if ref.accelerator_type and f"accelerator_type:{ref.accelerator_type}" not in res:
            continue
        out.append(node["NodeID"])
    return out


def _fetch_on_node(items: list[tuple[str, str, tuple[str, ...]]], fetch: Callable[..., Any]) -> list[Any]:
    return [fetch(repo_id, revision, patterns) for repo_id, revision, patterns in items]


def prefetch(refs: list[FetchTarget], fetch: Callable[..., Any] = download,
             timeout_s: float | None = 3600.0) -> dict[str, list[Any]]:
    """Run ``fetch`` for each model once on each node that could load it; {node_id: results}.

    Needs a connected Ray (``ray.init``). A node that fails raises here, before any actor
    starts, so a bad id/revision fails the run in seconds rather than in every actor.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = ray.nodes()
    per_node: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {}
    for ref in refs:
        targets = eligible_nodes(ref, nodes)
        if not targets:
            log.warning("no alive node can host %s (num_gpus=%s, accelerator_type=%s) yet; an "
                        "autoscaled node will download it when its actor loads",
                        ref.repo_id, ref.num_gpus, ref.accelerator_type)
        for node_id in targets:
            per_node.setdefault(node_id, []).append((ref.repo_id, ref.revision, ref.allow_patterns))
    if not per_node:
        return {}
    task = ray.remote(num_cpus=0, max_retries=2)(_fetch_on_node)
    pending = {
        node_id: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            name=f"prefetch-{node_id[:8]}").remote(items, fetch)
        for node_id, items in per_node.items()}
    log.info("prefetching %d model(s) on %d node(s)", len(refs), len(pending))
    results = ray.get(list(pending.values()), timeout=timeout_s)
    return dict(zip(pending, results, strict=True))


def prefetch_models(cfg: Any, fetch: Callable[..., Any] = download,
                    stage_names: set[str] | None = None) -> dict[str, list[Any]]:
    """The driver's one call: fetch ``cfg``'s hub models on every node that will load them
    (only the model stages in ``stage_names``, the plan's, when given)."""
    refs = fetch_targets(cfg, stage_names)
    if not refs:
        log.debug("preset %s: no weights to prefetch", cfg.preset)
        return {}
    return prefetch(refs, fetch=fetch)
