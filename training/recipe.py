"""The driver side of training: build the TorchTrainer, run it, write the run directory.

Run directory (``output.path``: a local path or a URI such as ``s3://bucket/runs/x``,
see :mod:`training.rundir`)::

    config.yaml          resolved config
    metrics.csv          step, loss, lr, data-wait fraction, step time, eval mIoU, ... (live)
    checkpoint_NNNNNNN/  model/ (safetensors + config), train_state.pt, segfactory.json (latest ones)
    best/                the best checkpoint by val mIoU: a transformers model dir + image processor
    tb/                  TensorBoard event files (the same metrics as metrics.csv, per-class IoU)
    events.jsonl         failures Ray Train reported, resumes, failed fits (training.runlog)
    final.json           final eval (per-class IoU, confusion), throughput, checkpoint path,
                         failures / restarts / resumes
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from typing import Any

from core import storage
from core.config import ConfigError
from core.storage import Location
from training import rundir
from training.config import TrainConfig
from training.data import split_names
from training.rundir import checkpoints, locate, read_json, writable, write_json
from training.rundir import read_rows as _read_rows

log = logging.getLogger("segfactory.train")

CSV_COLUMNS = ["step", "phase", "loss", "lr", "data_wait_fraction", "step_time_s", "steps_per_s",
               "synthetic_fraction", "eval_miou", "eval_pixel_acc", "elapsed_s"]


def check_inputs(cfg: TrainConfig) -> None:
    """Config combinations a field validator cannot see; raises ConfigError naming the key."""
    if not cfg.output.path:
        raise ConfigError("output.path: required (the run directory)")
    writable(cfg.output.path, "output.path")
    if not cfg.real.path:
        raise ConfigError("real.path: required (evaluation always uses the real val split)")
    if cfg.strategy != "real_only" and not (cfg.synthetic.paths or cfg.synthetic.live):
        raise ConfigError(f"synthetic.paths: strategy={cfg.strategy} needs synthetic.paths or synthetic.live")
    if cfg.strategy == "mix" and cfg.mix.mode == "variant" and cfg.synthetic.live is not None:
        raise ConfigError("mix.mode: variant needs synthetic.paths (variants are found by source_id), not synthetic.live")
    if cfg.synthetic.live is not None and not cfg.synthetic.live.config:
        raise ConfigError("synthetic.live.config: required (a generation YAML)")


def resolve_checkpoint(path: str | os.PathLike | Location) -> Location:
    """A checkpoint directory from a checkpoint dir, or a run dir (final.json's, else latest)."""
    loc = locate(path, "--checkpoint")
    if storage.is_file(loc / "segfactory.json"):
        return loc
    final = read_json(loc / "final.json")
    if final is not None:
        return locate(final["checkpoint"], "--checkpoint")
    found = checkpoints(loc)
    if not found:
        what = "no such directory" if not storage.exists(loc) else "no checkpoint in it"
        raise ConfigError(f"--checkpoint {loc}: {what}; give a run directory of `segfactory train` "
                          "(its output.path) or one of its checkpoint_* folders")
    return found[-1]


def model_dir(ckpt: Location) -> Location:
    """The transformers model directory of a checkpoint (``model/``) or of ``RUN/best``."""
    return ckpt / "model" if storage.is_dir(ckpt / "model") else ckpt


# --- metrics.csv ------------------------------------------------------------------------------


def truncate_metrics(path: str | os.PathLike | Location, after_step: int) -> None:
    """Drop rows past ``after_step`` (a resumed run re-does those steps)."""
    rundir.truncate_metrics(path, after_step, CSV_COLUMNS)


def append_metrics(path: str | os.PathLike | Location, metrics: dict[str, Any]) -> None:
    """Append one row; a step at or before the last row (restart) first drops the later rows."""
    rundir.append_metrics(path, metrics, CSV_COLUMNS)


# --- trainer ----------------------------------------------------------------------------------


def _data_config(split: list[str]):
    """Split ``split`` datasets with ``equal=False`` (eval sees each val row exactly once); the
    others are given whole to every worker. The training streams read from files are not
    here: each rank builds its own (training.data.rank_stream)."""
    from ray.train import DataConfig

    class UnequalSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name not in split:
                    for i in range(world_size):
                        out[i][name] = ds.iterator()
                    continue
                for i, part in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][name] = part
            return out

    # datasets_to_split also tells Train's DatasetManager which shards are a barrier
    return UnequalSplit(datasets_to_split=list(split))


def make_trainer(loop, loop_config: dict[str, Any], datasets: dict[str, Any], run_dir: str | os.PathLike | Location, *, num_workers: int,
                 use_gpu: bool, cpus_per_worker: float, max_failures: int = 0, keep: int = 2, callbacks=(),
                 placement_strategy: str = "PACK"):
    """A TorchTrainer whose storage is ``run_dir`` (checkpoints land in it; on a URI Ray Train
    uploads them through the run directory's pyarrow file system)."""
    from ray.train import LoggingConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from core.runtime import ray_log_level

    # ray.train's own console lines (worker group started, checkpoint saved ...): warnings only
    # when the command runs quiet (segfactory/logs.py)
    train_logging = LoggingConfig(log_level="WARNING") if ray_log_level() else None

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=rundir.run_config(run_dir, max_failures=max_failures, keep=keep, callbacks=callbacks,
                                     logging_config=train_logging),
        datasets=datasets, dataset_config=_data_config(split_names(datasets)))


def _summary(run_dir: Location, phase: str | None = None) -> dict[str, Any]:
    """Throughput, data-wait, synthetic share and eval history from metrics.csv."""
    rows = [r for r in _read_rows(run_dir / "metrics.csv") if phase is None or r["phase"] == phase]
    val = lambda k: [float(r[k]) for r in rows if r.get(k) not in (None, "")]  # noqa: E731
    sps, wait, syn = val("steps_per_s"), val("data_wait_fraction"), val("synthetic_fraction")
    return {"steps_per_s": sorted(sps)[len(sps) // 2] if sps else None,
            "data_wait_fraction": sum(wait) / len(wait) if wait else None,
            "synthetic_fraction": sum(syn) / len(syn) if syn else None,
            "evals": [{"step": int(r["step"]), "miou": float(r["eval_miou"])} for r in rows if r.get("eval_miou")],
            "last_step": int(rows[-1]["step"]) if rows else None}


def phases(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The run's phases: one ``train`` phase, or synthetic-only ``pretrain`` then real-only
    ``finetune`` (SegGen's pre-training strategy), each with its own budget, lr and schedule."""
    if cfg.strategy != "pretrain_finetune":
        return [{"name": "train", "start": 0, "iterations": cfg.iterations, "p": cfg.p_synthetic, "lr": cfg.optim.lr}]
    pre = cfg.pretrain.iterations or cfg.iterations
    return [{"name": "pretrain", "start": 0, "iterations": pre, "p": 1.0, "lr": cfg.pretrain.lr or cfg.optim.lr},
            {"name": "finetune", "start": pre, "iterations": cfg.iterations, "p": 0.0, "lr": cfg.optim.lr}]


def _rows_needed(cfg: TrainConfig, plan: list[dict[str, Any]], step: int) -> dict[str, int]:
    """Rows each stream must still supply from global ``step`` on."""
    need = {"real": 0, "synthetic": 0}
    for ph in plan:
        left = ph["start"] + ph["iterations"] - max(step, ph["start"])
        if left > 0:
            budget = cfg.model_copy(update={"iterations": left})
            need["real"] += budget.samples_needed(1 - ph["p"])
            need["synthetic"] += budget.samples_needed(ph["p"])
    return need


def _resume_step(run_dir: Location, resume_from: Location) -> int:
    """The step of the checkpoint ``resume=true`` continues from (its train state, named when
    it cannot be read); recorded in events.jsonl."""
    import torch

    from training.runlog import append_event

    try:
        data = io.BytesIO(storage.read_bytes(resume_from / "train_state.pt"))
        state = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file; the caller decides what to do
        raise RuntimeError(f"{resume_from / 'train_state.pt'}: cannot load the checkpoint to resume from "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    step = state["step"]
    log.info("resuming %s from %s (step %d)", run_dir, resume_from.name, step)
    append_event(run_dir, "resumed", step=step, checkpoint=resume_from.name)
    return step


def _final_record(cfg: TrainConfig, run_dir: Location, plan: list[dict[str, Any]], classes: list[str],
                  m: dict[str, Any], started: float) -> dict[str, Any]:
    """final.json: the last step's checkpoint and evaluation (``m``: the last report's metrics),
    the run's failures/restarts and the metrics.csv summary (per phase too)."""
    from training.loop import META_FILE
    from training.runlog import run_record

    ckpt = checkpoints(run_dir)[-1]  # this run's last step (not an earlier run's final.json: a resume to a larger budget)
    final = {"strategy": cfg.strategy, "final_step": json.loads(storage.read_text(ckpt / META_FILE))["step"],
             "iterations": sum(ph["iterations"] for ph in plan), "miou": m.get("eval_miou"),
             "pixel_acc": m.get("eval_pixel_acc"), "per_class_iou": m.get("eval_per_class_iou"),
             "confusion": m.get("eval_confusion"), "best_miou": m.get("best_miou"), "classes": classes,
             "checkpoint": str(ckpt), "train_elapsed_s": m.get("elapsed_s"), "wall_s": round(time.time() - started, 3),
             "best_checkpoint": str(run_dir / "best") if storage.is_dir(run_dir / "best") else None,
             **run_record(run_dir), **_summary(run_dir)}
    if len(plan) > 1:
        for ph in plan:
            final[ph["name"]] = _summary(run_dir, ph["name"])
    return final


def _check_has_network_b(checkpoint) -> None:
    # imported here, as META_FILE is: the worker-side recipe modules stay out of the driver
    from training.cotrain import MODEL_B_DIR

    if not storage.is_dir(checkpoint / MODEL_B_DIR):
        raise ConfigError(f"strategy: {checkpoint} has no {MODEL_B_DIR}/ (network B), so it was not written by "
                          "strategy=co_training; resume it with its own strategy, or start co-training in a new output.path")


def run_train(cfg: TrainConfig, callbacks=()) -> dict[str, Any]:
    """Train per ``cfg`` in one TorchTrainer run; returns (and writes) ``final.json``'s content.
    ``callbacks``: more Ray Train callbacks (a scaling sweep's Tune reporting)."""
    from core.runtime import init_ray
    from training.data import build_datasets, index_inputs
    from training.loop import train_loop_per_worker
    from training.runlog import make_callback, record_fit

    check_inputs(cfg)
    run_dir = locate(cfg.output.path, "output.path")
    started = time.time()
    plan = phases(cfg)
    total = sum(ph["iterations"] for ph in plan)
    existing = checkpoints(run_dir)
    if existing and not cfg.resume:
        raise ConfigError(f"output.path: {run_dir} already has checkpoints; pass resume=true (--resume) or a new output.path")
    final = read_json(run_dir / "final.json") if cfg.resume else None
    if final is not None and final.get("final_step") == total:
        log.info("%s already finished (%d steps); nothing to resume", run_dir, total)
        return final
    resume_from = existing[-1] if cfg.resume and existing else None
    if resume_from and cfg.strategy == "co_training":
        _check_has_network_b(resume_from)
    src = index_inputs(cfg)  # a bad real.path / synthetic.paths is one line before Ray starts
    from training.models import check_weights

    check_weights(cfg.model, src.classes)  # a backbone checkpoint that does not fit: one line naming the key
    init_ray(cfg.ray)
    rundir.write_config(run_dir, cfg.model_dump(mode="json"))
    step = _resume_step(run_dir, resume_from) if resume_from else 0
    truncate_metrics(run_dir / "metrics.csv", step)
    # the streams cover the whole budget; each rank resumes inside its own (training.epochs)
    datasets, specs = build_datasets(cfg, src, _rows_needed(cfg, plan, 0), cfg.workers.num_workers)
    meta = {"classes": src.classes, "run_dir": str(run_dir), "phases": plan, "specs": specs,
            "streams": [k for k in ("real", "synthetic") if k in datasets or k in specs],
            "resume_from": str(resume_from) if resume_from else None,
            "checkpoint_meta": {"arch": cfg.model.arch, "classes": src.classes, "strategy": cfg.strategy,
                                "eval": cfg.eval.model_dump(), "mean": cfg.aug.mean, "std": cfg.aug.std}}
    w = cfg.workers
    if cfg.strategy == "co_training":  # two networks per worker (training.cotrain)
        from training.cotrain import co_train_loop_per_worker as train_loop_per_worker
    trainer = make_trainer(train_loop_per_worker, {"cfg": cfg.model_dump(mode="json"), "meta": meta}, datasets, run_dir,
                           num_workers=w.num_workers, use_gpu=w.use_gpu, cpus_per_worker=w.cpus_per_worker,
                           max_failures=cfg.max_failures, keep=cfg.output.keep_checkpoints,
                           callbacks=[make_callback(run_dir, append_metrics), *callbacks], placement_strategy=w.placement_strategy)
    log.info("training %s: %s, %d steps x %d samples x %d workers -> %s", cfg.strategy,
             " then ".join(f"{ph['name']} {ph['iterations']}" for ph in plan), total,
             cfg.batch_size * cfg.grad_accum, w.num_workers, run_dir)
    result = record_fit(trainer, run_dir)
    final = _final_record(cfg, run_dir, plan, src.classes, result.metrics or {}, started)
    write_json(run_dir / "final.json", final)  # atomic: a sweep treats final.json as "this trial is done"
    log.info("%s done: step %s, val mIoU %.4f (%s)", cfg.strategy, final["final_step"], final["miou"] or math.nan, run_dir)
    return final
