"""Fetch model weights once per node into its cache before the actor pools load them.

Without this, every actor of a pool calls ``from_pretrained`` at the same moment and each node
downloads the same gigabytes several times over (or actors time out waiting on the hub's file
lock). :func:`prefetch_models` runs one Ray task per node that can host a model stage, pinned
with ``NodeAffinitySchedulingStrategy``, which calls ``huggingface_hub.snapshot_download``
for the stage's model id + pinned revision (safetensors and configs only). Presets that
download nothing (``toy``, ``tiny``, ``sdxl-random``) and models given by ``local_path`` are
skipped. Where ``HF_HOME`` is a volume shared by all nodes, the first node fills it and the
others find the files in place.

Only Ray is imported (inside functions); the config is read by attribute, not imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NO_DOWNLOAD_PRESETS = frozenset({"toy", "tiny", "sdxl-random"})
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model"]


@dataclass(frozen=True)
class ModelRef:
    """One model to fetch, and the resources of the stage that loads it (where it must be)."""

    repo_id: str
    revision: str
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    accelerator_type: str | None = None


def model_refs(cfg: Any) -> list[ModelRef]:
    """Hub models a GenerateConfig will load, deduplicated; empty for offline presets."""
    if cfg.preset in NO_DOWNLOAD_PRESETS:
        return []
    stages = []
    if cfg.pipeline in ("masksyn", "seggen") and cfg.masksyn.samples_per_caption > 0:
        stages.append((cfg.text2mask.resources, [cfg.text2mask.model]))
    stages.append((cfg.mask2img.resources, [cfg.mask2img.model, cfg.mask2img.controlnet]))
    out: dict[tuple[str, str], ModelRef] = {}
    for res, specs in stages:
        for spec in specs:
            if spec.local_path or not spec.id:  # a local path wins over the id
                continue
            key = (spec.id, spec.revision)
            prev = out.get(key)  # a model two stages load goes wherever either runs
            gpus = res.num_gpus if prev is None else min(prev.num_gpus, res.num_gpus)
            cpus = res.num_cpus if prev is None else min(prev.num_cpus, res.num_cpus)
            acc = res.accelerator_type if prev is None or prev.accelerator_type == res.accelerator_type else None
            out[key] = ModelRef(spec.id, spec.revision, gpus, cpus, acc)
    return list(out.values())


def download(repo_id: str, revision: str) -> str:
    """Fetch one snapshot (weights as safetensors, configs, tokenizer files) into the HF cache."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)


def eligible_nodes(ref: ModelRef, nodes: list[dict[str, Any]]) -> list[str]:
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


def _fetch_on_node(items: list[tuple[str, str]], fetch: Callable[[str, str], Any]) -> list[Any]:
    return [fetch(repo_id, revision) for repo_id, revision in items]


def prefetch(refs: list[ModelRef], fetch: Callable[[str, str], Any] = download,
             timeout_s: float | None = 3600.0) -> dict[str, list[Any]]:
    """Run ``fetch`` for each model once on each node that could load it; {node_id: results}.

    Needs a connected Ray (``ray.init``). A node that fails raises here, before any actor
    starts, so a bad id/revision fails the run in seconds rather than in every actor.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = ray.nodes()
    per_node: dict[str, list[tuple[str, str]]] = {}
    for ref in refs:
        targets = eligible_nodes(ref, nodes)
        if not targets:
            log.warning("no alive node can host %s (num_gpus=%s, accelerator_type=%s) yet; an "
                        "autoscaled node will download it when its actor loads",
                        ref.repo_id, ref.num_gpus, ref.accelerator_type)
        for node_id in targets:
            per_node.setdefault(node_id, []).append((ref.repo_id, ref.revision))
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


def prefetch_models(cfg: Any, fetch: Callable[[str, str], Any] = download) -> dict[str, list[Any]]:
    """The driver's one call: fetch ``cfg``'s hub models on every node that will load them."""
    refs = model_refs(cfg)
    if not refs:
        log.debug("preset %s: no weights to prefetch", cfg.preset)
        return {}
    return prefetch(refs, fetch=fetch)
