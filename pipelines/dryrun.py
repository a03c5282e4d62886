"""``segfactory generate --dry-run``: the resolved plan of a config, without running anything.

No Ray instance is started and no model is loaded. The plan is built with the classes the
config names (or a placeholder list), so the stages and their ``map_batches`` resources are
the ones a run would use. GPUs to check against: the connected cluster's
(``ray.cluster_resources()``) when ``ray.address`` or ``RAY_ADDRESS`` is given, else
``torch.cuda.device_count()`` when torch is installed, else 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError
from pipelines.config import GenerateConfig
from pipelines.graphs import ModelRef, RunContext, get_graph, stage_plan
from pipelines.resources import apply_profile, gpu_shortage, min_gpus, pool_needs

URI_SCHEMES = ("s3://", "gs://", "abfs://", "abfss://", "hdfs://", "file://", "http://", "https://")


def detect_gpus(cfg: GenerateConfig) -> tuple[int, str, str]:
    """(GPU count, where, counted by) for the dry run; connects to a given cluster, starts none."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        import ray

        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        try:
            return int(ray.cluster_resources().get("GPU", 0)), f"the Ray cluster at {address}", "ray.cluster_resources()"
        finally:
            ray.shutdown()
    try:
        import torch
    except ImportError:
        return 0, "this machine", "nothing (torch is not installed: 0 assumed)"
    return torch.cuda.device_count(), "this machine", "torch.cuda.device_count()"


def _local(path: str | None) -> bool:
    return bool(path) and not str(path).startswith(URI_SCHEMES)


def _model_problems(ref: ModelRef, remote: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) of one model's location."""
    problems, notes = [], []
    key = ref.key if ref.kind == "file" else f"{ref.key}.local_path"
    if ref.kind == "file" and not ref.local_path:
        problems.append(f"{ref.key}: empty; give the path of the checkpoint file")
    elif not ref.local_path and not ref.id:
        problems.append(f"{ref.key}: neither an id nor a local_path")
    if _local(ref.local_path):
        path = Path(str(ref.local_path).removeprefix("file://"))
        if not path.exists():
            problems.append(f"{key}: {ref.local_path} does not exist here")
        if not path.is_absolute():
            text = (f"{key}: {ref.local_path} is relative: it will not exist on a cluster when submitted "
                    "(segfactory submit uploads no weights); use a path every node mounts, or a hub id")
            (problems if remote else notes).append(text)
    return problems, notes


def submit_problems(cfg: GenerateConfig) -> list[str]:
    """Model paths of ``cfg`` that will not exist on a cluster it is submitted to (relative
    local paths: ``segfactory submit`` uploads no weights)."""
    out: list[str] = []
    for stage in get_graph(cfg.pipeline).model_stages(cfg):
        for ref in stage.models(cfg):
            if _local(ref.local_path) and not Path(str(ref.local_path).removeprefix("file://")).is_absolute():
                out += [p for p in _model_problems(ref, remote=True)[0] if "is relative" in p]
    return list(dict.fromkeys(out))


def dry_run(cfg: GenerateConfig, gpus: int, gpus_from: str, counted_by: str = "",
            input_problems: list[str] | tuple = (), input_notes: list[str] | tuple = ()) -> dict[str, Any]:
    """The resolved plan of ``cfg`` on ``gpus`` GPUs as one JSON-ready dict (keys ``stages``,
    ``models``, ``min_gpus``, ``problems`` and more). ``input_problems``/``input_notes`` come
    from :func:`pipelines.inputs.check_generate`; a config error of the graph's own checks is
    one more problem, and the plan is printed all the same."""
    graph = get_graph(cfg.pipeline)
    remote = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    configured = min_gpus(pool_needs(cfg))
    cfg = apply_profile(cfg, gpus)
    classes = list(cfg.source.classes or ["background", "object"])
    ctx = RunContext(classes=classes, palette=np.zeros((len(classes), 3), np.uint8), background=0)
    model_stages = {s.name: s for s in graph.model_stages(cfg)}
    stages, models, problems, notes = [], [], list(input_problems), list(input_notes)
    for stage in _planned(cfg, ctx, problems):
        kw = stage.kwargs
        entry: dict[str, Any] = {"name": stage.name, "kind": "pool" if "compute" in kw else "task",
                                 "batch_size": kw.get("batch_size"), "num_cpus": kw.get("num_cpus")}
        if "compute" in kw:
            ms = model_stages.get(stage.name)
            actor = kw.get("fn_constructor_kwargs", {}).get("actor_cls")  # the preset's class, e.g. a toy one
            entry.update({"actor": f"{actor.__module__}:{actor.__name__}" if actor else ms and ms.actor,
                          "section": ms.section if ms else None,
                          "min_actors": kw["compute"].min_size, "max_actors": kw["compute"].max_size,
                          "num_gpus": kw.get("num_gpus", 0.0), "accelerator_type": kw.get("accelerator_type")})
            refs = ms.models(cfg) if ms else []
            entry["models"] = [r.key for r in refs]
            for ref in refs:
                if any(m["key"] == ref.key for m in models):
                    continue  # the re-segmentation pools load the same weights
                source = "local" if ref.local_path else "hub" if ref.id else "missing"
                models.append({"key": ref.key, "stage": stage.name, "kind": ref.kind, "id": ref.id or None,
                               "revision": ref.revision if ref.id and not ref.local_path else None,
                               "local_path": ref.local_path, "variant": ref.variant, "dtype": ref.dtype,
                               "from": source})
                p, n = _model_problems(ref, remote)
                problems += p
                notes += n
        if stage.name == "captioner":
            notes.append("captioner: runs only when some source rows have no caption")
        stages.append(entry)
    if cfg.preset not in ("sdxl", "sd15"):
        notes.append(f"preset {cfg.preset}: models are built in code (no weights to load)")
    need = min_gpus(pool_needs(cfg))
    shortage = gpu_shortage(cfg, gpus, gpus_from)
    if shortage and not cfg.ray.wait_for_gpus:
        problems.append(shortage)
    return {"pipeline": cfg.pipeline, "preset": cfg.preset, "config_hash": cfg.config_hash(),
            "resources_profile": cfg.resources_profile, "min_gpus_configured": configured,
            "min_gpus": need, "gpus": gpus, "gpus_from": gpus_from, "gpus_counted_by": counted_by,
            "stages": stages, "models": models, "problems": problems, "notes": notes}


def _planned(cfg: GenerateConfig, ctx: RunContext, problems: list[str]) -> list:
    """The graph's stages; a config error of its own checks becomes a problem (once)."""
    try:
        return stage_plan(cfg, ctx, cfg.source.format)
    except ConfigError as e:
        if str(e) not in problems and not any(p.split(":")[0] == str(e).split(":")[0] for p in problems):
            problems.append(str(e))
        return []


def format_text(plan: dict[str, Any]) -> str:
    """The dry run for a terminal."""
    lines = [f"graph {plan['pipeline']} preset {plan['preset']} config_hash {plan['config_hash']} "
             f"resources_profile {plan['resources_profile']}"]
    lines.append("stages:")
    for s in plan["stages"]:
        if s["kind"] == "pool":
            acc = f" accelerator {s['accelerator_type']}" if s["accelerator_type"] else ""
            lines.append(f"  {s['name']:<16} pool {s['min_actors']}-{s['max_actors']} x (gpus {s['num_gpus']:g}, "
                         f"cpus {s['num_cpus']:g}){acc} batch {s['batch_size']}  {s['actor']}"
                         + (f"  models: {', '.join(s['models'])}" if s["models"] else ""))
        else:
            lines.append(f"  {s['name']:<16} task cpus {s['num_cpus']:g} batch {s['batch_size']}")
    if plan["models"]:
        lines.append("models:")
        for m in plan["models"]:
            where = m["local_path"] if m["from"] == "local" else f"{m['id']}@{m['revision']}" if m["id"] else "-"
            lines.append(f"  {m['key']:<20} {m['kind']:<18} {where}  variant {m['variant']}  dtype {m['dtype']}")
    lines.append(f"min_gpus: {plan['min_gpus']:g} (configured {plan['min_gpus_configured']:g}); "
                 f"GPUs: {plan['gpus']} on {plan['gpus_from']} (counted by {plan['gpus_counted_by']})")
    lines += [f"note: {n}" for n in plan["notes"]]
    lines += [f"problem: {p}" for p in plan["problems"]] or ["problems: none"]
    return "\n".join(lines)


def format_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, sort_keys=False)
