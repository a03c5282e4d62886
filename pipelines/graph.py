"""Compatibility names: the graphs now live in :mod:`pipelines.graphs` (one module per graph)."""

from pipelines.graphs import stage_plan
from pipelines.graphs.base import RunContext, Stage, build_dataset, pool_args, stage_label

__all__ = ["RunContext", "Stage", "build_dataset", "pool_args", "stage_label", "stage_plan"]
