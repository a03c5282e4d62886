"""The seggen graph on Ray against the same stages in a plain one-process loop.

    python benchmarks/bench_graph_vs_loop.py                 # a GPU box: sdxl-random, 768², 20 + 20 steps
    python benchmarks/bench_graph_vs_loop.py --smoke         # CPU, tiny preset: proves the script runs

Both arms take the same config and source and the same ``stage_plan`` (the ``map_batches``
calls the graph is made of): the graph arm is ``run_generate`` (Ray Data actor pools, writers,
shards on disk); the loop arm builds each stage's callable once in this process and pushes the
source rows through the stages in order, chunk by chunk, re-batched to each stage's
``batch_size`` — what a user with a plain diffusers loop would write. The loop does not write
Parquet (the graph does): that favours the loop.

A third arm, ``colocated``, runs the graph with ``colocate: true`` (Text2Mask, colour coding
and Mask2Img in one actor holding a whole GPU) against the default fractional sharing (two
pools at 0.5 GPU each, two processes time-slicing the GPU).

Per arm: samples/s end to end from nothing (Ray start-up and model loading included), and in
steady state (graph: rows of the shards committed after the first one ÷ time from the first
shard to the last; loop: rows after the first chunk ÷ their time), the ratio graph/loop of
each, and the GPU's busy fraction (``nvidia-smi`` every 200 ms) where a GPU is present. Prints
one JSON line per arm, then the ratios. Whole-dataset stages (AlignDiff's rounds) have no loop
arm here: the seggen family and factory graphs are supported.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import GpuSampler  # noqa: E402

log = logging.getLogger("bench_graph_vs_loop")


def make_config(args: argparse.Namespace, source: Path, out: Path) -> Any:
    """The seggen config both arms run (the DESIGN.md GPU setting unless --smoke)."""
    from pipelines.config import GenerateConfig

    res = {"batch_size": args.batch, "min_actors": 1, "max_actors": 1, "num_gpus": args.gpus_per_pool,
           "num_cpus": 0.5 if args.smoke else 2}
    diffusion = {"resolution": args.resolution, "model": {"dtype": "bfloat16"}, "resources": res}
    return GenerateConfig.model_validate({
        "pipeline": "seggen", "preset": args.preset, "palette": "voc",
        "source": {"path": str(source), "format": "voc", "limit": args.rows},
        "output": {"path": str(out), "rows_per_shard": args.rows_per_shard},
        "imgsyn": {"samples_per_source": 1}, "masksyn": {"samples_per_caption": 1},
        "text2mask": {**diffusion, "steps": args.steps[0]},
        "mask2img": {**diffusion, "steps": args.steps[1]},
        "cpu": {"batch_size": args.rows_per_shard, "num_cpus": 0.5},
        "validation": {"min_image_std": 0.0, "max_rejected_fraction": 1.0},
        "ray": {"show_progress": False}})


def graph_arm(cfg: Any, smoke: bool) -> dict:
    """``run_generate`` from a cold start; steady state from the shard files' completion times."""
    from core.runtime import init_ray
    from pipelines.generate import run_generate

    start = time.time()
    with GpuSampler() as gpu:
        init_ray(cfg.ray, **({"num_cpus": 2} if smoke else {}))
        result = run_generate(cfg)
    wall = time.time() - start
    import pyarrow.parquet as pq

    shards = sorted((Path(cfg.output.path) / "shards").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    done = [(p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in shards]
    steady = None
    if len(done) > 1 and done[-1][0] > done[0][0]:
        steady = sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])
    rows = int(result.manifest["rows"])
    return {"arm": "graph", "rows": rows, "wall_s": round(wall, 2), "samples_per_s": round(rows / wall, 4),
            "steady_samples_per_s": round(steady, 4) if steady else None, "gpu_busy_fraction": gpu.busy_fraction()}


def _stage_callables(plan: list) -> list[tuple[str, Any, int | None]]:
    """(name, callable, batch size) per stage: actor classes built once, functions bound to their kwargs."""
    out = []
    for stage in plan:
        if stage.kind != "map_batches":
            raise SystemExit(f"stage {stage.name!r} is a whole-dataset step: no loop arm for this graph")
        kw = stage.kwargs
        fn = stage.fn(**kw.get("fn_constructor_kwargs", {})) if isinstance(stage.fn, type) else \
            functools.partial(stage.fn, **kw.get("fn_kwargs", {}))
        out.append((stage.name, fn, kw.get("batch_size")))
    return out


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else {}


def _run_stage(fn: Any, batch: dict[str, np.ndarray], size: int | None) -> dict[str, np.ndarray]:
    n = len(next(iter(batch.values()))) if batch else 0
    step = size or n or 1
    return _concat([fn({k: v[i:i + step] for k, v in batch.items()}) for i in range(0, n, step)])


def loop_arm(cfg: Any) -> dict:
    """The same stages in this process: build once, then chunk by chunk through every stage."""
    from pipelines.generate import index_rows, resolve_context
    from pipelines.graphs import stage_plan
    from pipelines.source_index import iter_slices

    start = time.time()
    with GpuSampler() as gpu:
        index, rows = index_rows(cfg)
        ctx = resolve_context(cfg, index)
        stages = _stage_callables(stage_plan(cfg, ctx, cfg.source.format))
        loaded = time.time()
        made, times = 0, []
        for chunk in iter_slices(rows, cfg.cpu.batch_size):
            batch = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in chunk.column_names}
            for _, fn, size in stages:
                batch = _run_stage(fn, batch, size)
            kept = int(np.sum(batch.get("drop_reason", np.array([""] * len(batch["sample_id"]))) == ""))
            made += kept
            times.append((time.time(), kept))
    wall = time.time() - start
    steady = None
    if len(times) > 1 and times[-1][0] > times[0][0]:
        steady = sum(n for _, n in times[1:]) / (times[-1][0] - times[0][0])
    return {"arm": "loop", "rows": made, "wall_s": round(wall, 2), "load_s": round(loaded - start, 2),
            "samples_per_s": round(made / wall, 4), "steady_samples_per_s": round(steady, 4) if steady else None,
            "gpu_busy_fraction": gpu.busy_fraction()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes: checks the script runs")
    p.add_argument("--rows", type=int, default=None, help="toy source rows (default 32; smoke 4)")
    p.add_argument("--rows-per-shard", type=int, default=None, help="source rows per shard and loop chunk "
                   "(default 4; smoke 2)")
    p.add_argument("--steps", default=None, help="text2mask,mask2img steps (default 20,20; smoke 1,1)")
    p.add_argument("--resolution", type=int, default=None, help="generation side (default 768; smoke 32)")
    p.add_argument("--batch", type=int, default=4, help="pool batch size of both diffusion stages")
    p.add_argument("--gpus-per-pool", type=float, default=None, help="num_gpus of each diffusion pool "
                   "(default 0.5: both share one GPU; smoke 0)")
    p.add_argument("--arms", default="graph,colocated,loop", help="which arms, in order: graph (one pool per "
                   "model, fractional GPUs), colocated (colocate=true: Text2Mask + Mask2Img in one actor per GPU), loop")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.smoke else "sdxl-random"
    args.rows = args.rows or (4 if args.smoke else 32)
    args.rows_per_shard = args.rows_per_shard or (2 if args.smoke else 4)
    args.steps = tuple(int(s) for s in (args.steps or ("1,1" if args.smoke else "20,20")).split(","))
    args.resolution = args.resolution or (32 if args.smoke else 768)
    args.gpus_per_pool = args.gpus_per_pool if args.gpus_per_pool is not None else (0 if args.smoke else 0.5)
    args.arms = args.arms.split(",")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.smoke:
        import torch

        torch.set_num_threads(1)
    from pipelines.toy_data import make_toy_dataset

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = make_toy_dataset(Path(tmp) / "src", n_train=args.rows, n_val=1, size=64, seed=0)
        for arm in args.arms:
            cfg = make_config(args, source, Path(tmp) / f"out-{arm}")
            if arm == "colocated":  # one process per GPU holds both diffusion models
                cfg = cfg.model_copy(update={"colocate": True})
                cfg.mask2img.resources.num_gpus = 0 if args.smoke else 1
            row = loop_arm(cfg) if arm == "loop" else graph_arm(cfg, args.smoke)
            row["arm"] = arm
            row.update(preset=args.preset, steps=list(args.steps), resolution=args.resolution)
            print(json.dumps(row), flush=True)
            rows.append(row)
    by = {r["arm"]: r for r in rows}
    for arm in ("graph", "colocated"):
        for key in ("samples_per_s", "steady_samples_per_s"):
            g, lp = by.get(arm, {}).get(key), by.get("loop", {}).get(key)
            if g and lp:
                print(f"{arm} / loop {key}: {g / lp:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
