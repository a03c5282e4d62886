"""The fine-tuning recipe base class (torchtune style) and the driver pieces every recipe shares.

A recipe is one ``kind`` of ``segfactory finetune``. Its driver (:meth:`Recipe.run`, in the
command's process) prepares the data and starts a TorchTrainer whose workers run
:meth:`Recipe.worker_loop`: the recipe is built from the worker's setup (:meth:`Recipe.from_worker`)
and :meth:`Recipe.fit` runs the loop every recipe shares — restore, set up, then optimizer steps
with the step accounting, fault injection and checkpoint reports of :mod:`training.steps` (the
same as ``train``'s loop). A recipe implements the hooks:

    setup_model(resume)     the trained module, restored from the ``resume`` directory when given;
                            returns that checkpoint's train state (or None)
    setup_optimizer(state)  optimizer and lr schedule (and EMA), restored from ``state``
    setup_data(step)        this worker's batches from global ``step`` on, and the held-out data
    train_step()            one optimizer step -> (loss, seconds spent waiting for data); sets ``lr``
    evaluate(step)          held-out metrics, merged into the report
    save_checkpoint(step, metrics)  on every rank (FSDP gathers collectively); returns what rank 0
                            runs to write the checkpoint directory

The run directory (checkpoints, metrics.csv, events.jsonl, TensorBoard, final.json; a local path
or a URI) is :mod:`training.rundir` / :mod:`training.runlog`, as for ``train``.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from core import storage
from core.config import ConfigError
from core.storage import Location
from training import rundir
from training.finetune.config import FinetuneConfig
from training.finetune.worker import META_FILE, WorkerSetup, setup_worker
from training.steps import Window, due, fail_if_asked, release_restore, report, restore_dir

log = logging.getLogger("segfactory.finetune")

CSV_COLUMNS = ["step", "loss", "lr", "data_wait_fraction", "step_time_s", "steps_per_s", "val_loss",
               "val_fidelity", "elapsed_s"]
SCALARS = ("loss", "lr", "steps_per_s", "data_wait_fraction", "step_time_s", "val_loss", "val_fidelity")


class Recipe(ABC):
    """One kind of fine-tuning: its driver, its worker hooks and the loop they share."""

    kind: ClassVar[str]
    target_key: ClassVar[str] = "target"  # the picture the model denoises
    needs_cond: ClassVar[bool] = False  # whether the colour map is fed as conditioning
    w: WorkerSetup  # on a worker: config, rank, device, frozen base (from_worker sets it)
    lr: float = 0.0  # the lr of the last optimizer step

    # --- driver ------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def run(cls, cfg: FinetuneConfig) -> dict[str, Any]:
        """Fine-tune per ``cfg`` in one TorchTrainer run; returns (and writes) ``final.json``."""

    # --- worker ------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_worker(cls, w: WorkerSetup) -> Recipe:
        """The recipe on a Ray Train worker (its module built from ``w.comps``)."""

    @classmethod
    def worker_loop(cls, config: dict[str, Any]) -> None:
        """Ray Train's ``train_loop_per_worker``."""
        cls.from_worker(setup_worker(config)).fit()

    @abstractmethod
    def setup_model(self, resume: str | None) -> dict[str, Any] | None: ...

    @abstractmethod
    def setup_optimizer(self, state: dict[str, Any] | None) -> None: ...

    @abstractmethod
    def setup_data(self, step: int) -> None: ...

    @abstractmethod
    def train_step(self) -> tuple[float, float]: ...

    @abstractmethod
    def evaluate(self, step: int) -> dict[str, Any]: ...

    @abstractmethod
    def save_checkpoint(self, step: int, metrics: dict[str, Any]) -> Callable[[Path], None]: ...

    def fit(self) -> None:
        """Restore, set up, train to ``iterations``: report every ``log_interval`` steps,
        evaluate every ``validation.interval`` steps (and at step 0 and the end), checkpoint at
        each evaluation and every ``checkpoint_interval`` steps."""
        import ray.train

        w, cfg = self.w, self.w.cfg
        resume = restore_dir(w.meta.get("resume_from"))
        state = self.setup_model(resume)
        release_restore(resume)  # loaded
        step, elapsed = (int(state["step"]), float(state.get("elapsed_s", 0.0))) if state else (0, 0.0)
        self.setup_optimizer(state)
        self.setup_data(step)
        if state is not None and w.rank == 0:
            log.info("resumed at step %d", step)
        if step == 0:
            ray.train.report({"step": 0, "iterations": cfg.iterations, **self.evaluate(0)})
        started, window = time.perf_counter() - elapsed, Window()
        while step < cfg.iterations:
            t0 = time.perf_counter()
            loss, wait = self.train_step()
            step += 1
            window.add(loss, wait, time.perf_counter() - t0)
            fail_if_asked(w.meta["run_dir"], step, cfg.debug.fail_at_steps, w.rank)
            do_eval, do_ckpt, do_report = due(step, end=cfg.iterations, eval_every=cfg.validation.interval,
                                              ckpt_every=cfg.checkpoint_interval, log_every=cfg.log_interval)
            if not do_report:
                continue
            metrics = {"step": step, "iterations": cfg.iterations, **window.metrics(), "lr": self.lr}
            if do_eval:
                metrics |= self.evaluate(step)
            metrics["elapsed_s"] = time.perf_counter() - started
            report(metrics, step, w.rank, self.save_checkpoint(step, metrics) if do_ckpt else None)
            window.reset()


# --- driver pieces every recipe shares --------------------------------------------------------


def open_run(cfg: FinetuneConfig) -> tuple[Location, Location | None, int]:
    """(run directory, checkpoint to resume from or None, its step). Checkpoints already in the
    run directory without ``resume`` are refused; with it, the latest one is resumed."""
    run = rundir.locate(cfg.output.path, "output.path")
    existing = rundir.checkpoints(run)
    if existing and not cfg.resume:
        raise ConfigError(f"output.path: {run} already has checkpoints; pass resume=true (--resume) or a new output.path")
    if not (cfg.resume and existing):
        return run, None, 0
    resume_from = existing[-1]
    step = json.loads(storage.read_text(resume_from / META_FILE))["step"]
    return run, resume_from, step


def start_run(cfg: FinetuneConfig, run: Location, resume_from: Location | None, step: int) -> None:
    """config.yaml, metrics.csv cut back to the resumed step (or started anew), the resume event."""
    from training.runlog import append_event

    rundir.write_config(run, cfg.model_dump(mode="json"))
    rundir.truncate_metrics(run / "metrics.csv", step if resume_from else -1, CSV_COLUMNS)
    if resume_from is not None:
        log.info("resuming %s from %s (step %d)", run, resume_from.name, step)
        append_event(run, "resumed", step=step, checkpoint=resume_from.name)


def progress_line(m: dict[str, Any]) -> str:
    """The progress line of one report (the Train controller logs it)."""
    msg = f"[finetune] step {m['step']}/{m['iterations']}"
    if "loss" in m:
        msg += (f" loss {m['loss']:.4f} lr {m['lr']:.2e} {m['steps_per_s']:.2f} it/s "
                f"data-wait {m['data_wait_fraction']:.0%}")
    if "val_loss" in m:
        msg += f" | val loss {m['val_loss']:.4f}"
    if "val_fidelity" in m:
        msg += f" colour fidelity {m['val_fidelity']:.3f}"
    return msg


def make_trainer(cfg: FinetuneConfig, recipe: type[Recipe], meta: dict[str, Any], datasets: dict[str, Any], run: Location):
    """TorchTrainer running ``recipe.worker_loop`` with fractional worker CPUs, FailureConfig and
    checkpoints in the run directory; ``train`` is split across workers, ``val`` given whole."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.runlog import make_callback

    def append(path: Location, m: dict[str, Any]) -> None:
        rundir.append_metrics(path, m, CSV_COLUMNS)

    callback = make_callback(run, append, line=progress_line, scalars=SCALARS, on_report=None, logger=log)
    w = cfg.workers
    resources = {"CPU": w.cpus_per_worker, **({"GPU": 1} if w.use_gpu else {})}
    return TorchTrainer(
        recipe.worker_loop, train_loop_config={"cfg": cfg.model_dump(mode="json"), "meta": meta},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker=resources),
        run_config=rundir.run_config(run, max_failures=cfg.max_failures, keep=cfg.output.keep_checkpoints,
                                     callbacks=[callback]),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))


def metric_rows(run: Location) -> list[dict[str, str]]:
    return rundir.read_rows(run / "metrics.csv")
