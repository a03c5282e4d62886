"""Run the real SegGen graph on a two-node Ray cluster on one machine; print where stages ran.

Executed by ``test_cluster_placement.py`` in a subprocess of its own, because it owns its Ray
(``ray.cluster_utils.Cluster``) and must not meet the session-wide ``ray_local`` of the other
tests. Nodes:

- head: 2 CPUs, no GPU — where the driver and the CPU tasks can go;
- gpu:  1 logical GPU tagged ``accelerator_type:A100``, no CPU, so only actors that ask for a
  GPU (and no CPU) fit there and no CPU task can — placement is decided by resources alone,
  not by the scheduler's timing.

Each stage of ``stage_plan`` is wrapped to stamp the node id it ran on into a ``where_<stage>``
column; GPU actors also report ``CUDA_VISIBLE_DEVICES`` and what ``pick_device`` chose (a
logical GPU with no CUDA must fall back to CPU). Then ``pipelines.prefetch`` runs with a fake
fetch that reports its node. Output: one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import index_rows, resolve_context
from pipelines.graphs import Stage, stage_plan
from pipelines.graphs.base import build_dataset
from pipelines.prefetch import FetchTarget, prefetch, prefetch_models
from pipelines.toy_data import make_toy_dataset

ROOT = Path(__file__).resolve().parents[2]


STAMPS = ("where_", "cuda_", "device_")


def _stamp(batch: dict, out: dict, stage: str) -> dict:
    n = len(out[S.SAMPLE_ID])
    for col, values in batch.items():  # finalize keeps only dataset columns: carry ours along
        if col.startswith(STAMPS) and col not in out:
            out[col] = values
    out[f"where_{stage}"] = np.array([ray.get_runtime_context().get_node_id()] * n, dtype=object)
    return out


def _wrap_cls(cls: type, stage: str) -> type:
    """A subclass of a model stage's class that also says where it runs and which device."""

    class Where(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from actors.diffusion_models import pick_device

            self.where_cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            self.where_device = pick_device()

        def __call__(self, batch: dict) -> dict:
            out = _stamp(batch, super().__call__(batch), stage)
            n = len(out[S.SAMPLE_ID])
            out[f"cuda_{stage}"] = np.array([self.where_cuda] * n, dtype=object)
            out[f"device_{stage}"] = np.array([self.where_device] * n, dtype=object)
            return out

    Where.__name__ = Where.__qualname__ = f"Where{cls.__name__}"
    return Where


def _wrap_fn(fn, stage: str):
    def where(batch: dict, **kwargs) -> dict:
        return _stamp(batch, fn(batch, **kwargs), stage)

    return where


def wrap(plan: list[Stage]) -> list[Stage]:
    """The same stages and map_batches arguments, each stamping the node it ran on."""
    return [Stage(st.name, (_wrap_cls if isinstance(st.fn, type) else _wrap_fn)(st.fn, st.name), st.kwargs)
            for st in plan]


def fake_fetch(repo_id: str, revision: str, allow_patterns=()) -> list[str]:
    return [ray.get_runtime_context().get_node_id(), repo_id, revision]


def main() -> None:
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=0, num_gpus=1, resources={"accelerator_type:A100": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_no_progress_timeout_s = 120
        ctx.enable_progress_bars = False
        nodes = {("gpu" if n["Resources"].get("GPU") else "head"): n["NodeID"]
                 for n in ray.nodes() if n["Alive"]}
        tmp = Path(tempfile.mkdtemp(prefix="sf-place-"))
        src = make_toy_dataset(tmp / "src", n_train=8, n_val=2, size=64, seed=0)
        gpu_res = {"num_gpus": 0.5, "num_cpus": 0}
        overrides = [f"source.path={src}", f"output.path={tmp / 'out'}", "source.limit=8",
                     "mask2img.resources.accelerator_type=A100"]
        overrides += [f"{stage}.resources.{k}={v}" for stage in ("text2mask", "mask2img")
                      for k, v in gpu_res.items()]
        cfg = load_config(GenerateConfig, ROOT / "pipelines/configs/seggen-toy.yaml", overrides)
        index, rows = index_rows(cfg)
        plan = stage_plan(cfg, resolve_context(cfg, index), cfg.source.format)
        requested = {st.name: {k: st.kwargs.get(k) for k in ("num_gpus", "num_cpus", "accelerator_type")}
                     for st in plan}
        ds = build_dataset(rows, wrap(plan))
        cols = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for col, values in batch.items():
                if col.startswith(STAMPS):
                    cols.setdefault(col, []).extend(str(v) for v in values)
        fetched = prefetch([FetchTarget("org/on-gpu-nodes", "r1", num_gpus=0.5),
                            FetchTarget("org/cpu-stage", "r3", num_cpus=1),
                            FetchTarget("org/everywhere", "r2")], fetch=fake_fetch)
        sdxl = load_config(GenerateConfig, ROOT / "pipelines/configs/seggen-sdxl.yaml",
                           ["mask2img.resources.num_gpus=0.5", "mask2img.resources.num_cpus=0", "captions=template"])
        fetched_cfg = prefetch_models(sdxl, fetch=fake_fetch)
        report = {"nodes": nodes, "prefetch_sdxl": fetched_cfg, "requested": requested, "rows": len(cols.get("where_finalize", [])),
                  "placement": {c: sorted(set(v)) for c, v in cols.items()}, "prefetch": fetched}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
