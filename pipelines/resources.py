"""GPU accounting of a graph's actor pools: the GPUs their minimum sizes need, the one-GPU
profile, and the fail-fast check that replaces an endless wait for GPUs that are not there.

Ray Data starts every pool at ``min_actors`` before any row flows; a pool whose actors cannot be
placed waits for ever (or until the no-progress timeout). :func:`gpu_shortage` names that
before the run starts. Fractional ``num_gpus`` lets pools share a GPU: Ray places an actor
on a GPU with that fraction free, it does not limit the memory the actor uses. Fractional
sharing makes two processes time-slice one GPU (DESIGN.md's H200 trace); ``colocate: true``
instead runs a graph's diffusion pools in one actor per GPU, counted here once, under the last
pool's resources (benchmarks/bench_graph_vs_loop.py compares the two; not yet run on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import ConfigError
from pipelines.config import GenerateConfig

PRECISION = 10_000  # Ray accounts fractional resources in 1e-4 units


@dataclass(frozen=True)
class PoolNeed:
    """One actor pool's share of the GPUs: ``min_actors`` actors of ``num_gpus`` each."""

    stage: str
    section: str
    min_actors: int
    num_gpus: float

    @property
    def min_gpus(self) -> float:
        return self.min_actors * self.num_gpus


def pool_needs(cfg: GenerateConfig, stage_names: set[str] | None = None) -> list[PoolNeed]:
    """The pools ``cfg`` runs (only ``stage_names`` when given) and their minimum GPU needs."""
    from pipelines.graphs import get_graph

    graph = get_graph(cfg.pipeline)
    merged = set(graph.colocate[:-1]) if cfg.colocate else set()  # their models run in the last pool's actors
    out = []
    for stage in graph.model_stages(cfg):
        if (stage_names is None or stage.name in stage_names) and stage.name not in merged:
            res = stage.resources(cfg)
            out.append(PoolNeed(stage.name, stage.section, res.min_actors, res.num_gpus))
    return out


def min_gpus(needs: list[PoolNeed]) -> float:
    """GPUs needed to start every pool at its minimum size (sum of min_actors × num_gpus)."""
    return round(sum(n.min_gpus for n in needs), 4)


def packs(needs: list[PoolNeed], gpus: int) -> bool:
    """Whether every pool's minimum actors fit on ``gpus`` GPUs (first-fit decreasing: an actor
    of n ≥ 1 GPUs takes n whole GPUs, a fractional one shares a GPU with others)."""
    free = [PRECISION] * gpus
    items = sorted((round(n.num_gpus * PRECISION) for n in needs for _ in range(n.min_actors) if n.num_gpus),
                   reverse=True)
    for item in items:
        if item >= PRECISION:
            whole = [i for i, f in enumerate(free) if f == PRECISION][: math.ceil(item / PRECISION)]
            if len(whole) < math.ceil(item / PRECISION):
                return False
            for i in whole:
                free[i] = 0
            continue
        slot = next((i for i, f in enumerate(free) if f >= item), None)
        if slot is None:
            return False
        free[slot] -= item
    return True


def apply_profile(cfg: GenerateConfig, gpus: int, stage_names: set[str] | None = None) -> GenerateConfig:
    """``cfg`` with the ``resources_profile`` applied for a cluster of ``gpus`` GPUs.

    ``fit``: when the pools' minimums do not fit on ``max(gpus, 1)`` GPUs, every GPU pool's
    ``num_gpus`` is scaled by one factor (ratios kept) until they do — on one GPU all pools share
    it. ``per-pool``: as configured. Resources never enter the config hash. Only the pools in
    ``stage_names`` (the plan's) count when given.
    """
    needs = pool_needs(cfg, stage_names)
    target = max(gpus, 1)
    if cfg.resources_profile != "fit" or packs(needs, target):
        return cfg
    factor = target / max(min_gpus(needs), 1e-9)
    while factor > 1e-3:
        scaled = [PoolNeed(n.stage, n.section, n.min_actors, _scale(n.num_gpus, factor)) for n in needs]
        if packs(scaled, target):
            break
        factor *= 0.98  # bin packing left a gap: shrink a little more
    update = {}
    for section in {n.section for n in needs}:
        stage = getattr(cfg, section)
        res = stage.resources
        if res.num_gpus:
            update[section] = stage.model_copy(update={"resources": res.model_copy(
                update={"num_gpus": _scale(res.num_gpus, factor)})})
    return cfg.model_copy(update=update)


def _scale(num_gpus: float, factor: float) -> float:
    return math.floor(num_gpus * factor * PRECISION) / PRECISION if num_gpus else 0.0


def gpu_shortage(cfg: GenerateConfig, gpus: int, where: str, stage_names: set[str] | None = None) -> str | None:
    """One line naming the shortage when the pools' minimums cannot be placed on ``gpus``."""
    needs = [n for n in pool_needs(cfg, stage_names) if n.num_gpus]
    if packs(needs, gpus):
        return None
    per_pool = ", ".join(f"{n.stage} {n.min_actors}x{n.num_gpus:g}" for n in needs)
    fix = ("set resources_profile=fit, or lower <stage>.resources.num_gpus/min_actors" if
           cfg.resources_profile == "per-pool" and gpus else "run where there are GPUs (ray.address=...)")
    return (f"resources: the pools' minimum sizes need {min_gpus(needs):g} GPU(s) ({per_pool}) but {where} has "
            f"{gpus}: {fix}, or ray.wait_for_gpus=true on a cluster that adds GPU nodes on demand")


class GpuShortage(ConfigError):
    """The run would wait for ever for GPUs the cluster does not have (exit 2)."""


def cluster_gpus() -> int:
    """GPUs of the connected Ray cluster (needs ``ray.init``)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def check_cluster(cfg: GenerateConfig, stage_names: set[str] | None = None) -> GenerateConfig:
    """The driver's call after ``ray.init``: apply the profile for the cluster's GPUs, then fail
    fast (:class:`GpuShortage`) if the pools still cannot start — unless ``ray.wait_for_gpus``."""
    gpus = cluster_gpus()
    cfg = apply_profile(cfg, gpus, stage_names)
    problem = None if cfg.ray.wait_for_gpus else gpu_shortage(cfg, gpus, "the Ray cluster", stage_names)
    if problem:
        raise GpuShortage(problem)
    return cfg
