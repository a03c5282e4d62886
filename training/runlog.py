"""What the Train controller records while a run trains — for ``train``, ``finetune`` and
textual inversion alike: metrics.csv, TensorBoard event files, the failures Ray Train reports
(events.jsonl) and, for ``train``, the best checkpoint by val mIoU (``best/``).

TensorBoard, not MLflow: event files are plain files in the run directory (copied with it,
readable offline, no tracking server or database to run on a cluster), and ``tensorboard
--logdir RUN/tb`` or ``SWEEP/trials`` compares runs. One writer per controller process.

Restarts are counted from Ray Train itself: ``UserCallback.after_exception`` is called on the
controller each time the worker group fails; the controller then restarts it from the latest
checkpoint while ``max_failures`` allows. Each failure is appended to ``events.jsonl``; the
driver appends ``run_failed`` when ``fit()`` gives up and ``resumed`` for ``resume=true``, so
``restarts = failures - run_failed`` across every attempt of the run directory.

A run directory on a URI (:mod:`training.rundir`): the files go through ``core.storage``;
TensorBoard writes to a local temporary directory that is copied up after each flush; ``best/``
is copied up with ``segfactory.json`` last (it is what marks ``best/`` complete).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from core import storage
from core.storage import Location
from training.rundir import append_text, locate, read_json, read_text, upload_dir, write_json

log = logging.getLogger("segfactory.train")

EVENTS, BEST_DIR, TB_DIR = "events.jsonl", "best", "tb"
MODEL_DIR = "model"


RunDir = str | os.PathLike | Location


def append_event(run_dir: RunDir, event: str, **fields: Any) -> None:
    """One line of ``events.jsonl`` (failures, resumes, run failures)."""
    append_text(locate(run_dir) / EVENTS, json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def read_events(run_dir: RunDir) -> list[dict[str, Any]]:
    text = read_text(locate(run_dir) / EVENTS) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_record(run_dir: RunDir) -> dict[str, int]:
    """Failures Ray Train reported, restarts it made from a checkpoint, and resumes."""
    events = [e["event"] for e in read_events(run_dir)]
    failures = events.count("failure")
    return {"failures": failures, "restarts": failures - events.count("run_failed"), "resumes": events.count("resumed")}


def record_fit(trainer: Any, run_dir: RunDir) -> Any:
    """``trainer.fit()``; when it raises, ``run_failed`` (Ray Train gave up after a worker failure
    it reported, not restarted) or ``fit_error`` goes to events.jsonl before the error goes on."""
    try:
        return trainer.fit()
    except Exception as exc:
        last = (read_events(run_dir) or [{}])[-1].get("event")
        append_event(run_dir, "run_failed" if last == "failure" else "fit_error",
                     error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        raise


def best_miou(run_dir: RunDir) -> float | None:
    meta = read_json(locate(run_dir) / BEST_DIR / "segfactory.json")
    return meta.get("miou") if meta is not None else None


def keep_best(run_dir: RunDir, checkpoint_dir: Path, step: int, miou: float) -> bool:
    """Copy a checkpoint's model to ``RUN/best`` when its val mIoU beats the kept one (ties:
    the earlier one stays). ``RUN/best`` is a transformers model directory with its image
    processor: ``from_pretrained`` and ``pipeline("image-segmentation")`` load it as it is."""
    run = locate(run_dir)
    old = best_miou(run)
    if old is not None and miou <= old:
        return False
    if not run.is_local:
        _upload_best(run, Path(checkpoint_dir), step, miou)
        return True
    run_dir = Path(run.path)
    tmp = run_dir / f".{BEST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(checkpoint_dir) / MODEL_DIR, tmp)
    meta = json.loads((Path(checkpoint_dir) / "segfactory.json").read_text())
    (tmp / "segfactory.json").write_text(json.dumps({**meta, "step": step, "miou": miou}, indent=1))
    final = run_dir / BEST_DIR
    if final.exists():
        gone = run_dir / f".{BEST_DIR}.old"
        shutil.rmtree(gone, ignore_errors=True)
        final.rename(gone)
        tmp.rename(final)
        shutil.rmtree(gone, ignore_errors=True)
    else:
        tmp.rename(final)
    return True


def _upload_best(run: Location, checkpoint_dir: Path, step: int, miou: float) -> None:
    """``best/`` on an object store: the old one removed, the model copied up, ``segfactory.json``
    last (objects cannot be renamed as a whole directory; a reader sees no best in between)."""
    best = run / BEST_DIR
    storage.remove(best / "segfactory.json")
    storage.remove_tree(best)
    upload_dir(checkpoint_dir / MODEL_DIR, best)
    meta = json.loads((checkpoint_dir / "segfactory.json").read_text())
    write_json(best / "segfactory.json", {**meta, "step": step, "miou": miou})


SCALARS = ("loss", "lr", "steps_per_s", "data_wait_fraction", "step_time_s", "synthetic_fraction",
           "eval_miou", "eval_pixel_acc")


def tb_scalars(metrics: dict[str, Any], names: tuple[str, ...] = SCALARS) -> dict[str, float]:
    """TensorBoard tags of one report: train/*, eval/* (``eval_*``), val/* (``val_*``), eval_iou/<class>."""
    def tag(k: str) -> str:
        for prefix in ("eval", "val"):
            if k.startswith(prefix + "_"):
                return f"{prefix}/{k.removeprefix(prefix + '_')}"
        return f"train/{k}"

    out = {tag(k): float(metrics[k]) for k in names if metrics.get(k) is not None}
    for name, iou in (metrics.get("eval_per_class_iou") or {}).items():
        if iou is not None:
            out[f"eval_iou/{name}"] = float(iou)
    return out


QUIET_EVERY_S = 60.0  # a training line at least this often when the command runs quiet


def train_line(m: dict[str, Any]) -> str:
    """``segfactory train``'s progress line of one report."""
    msg = (f"[{m['phase']}] step {m['step']}/{m['iterations']} loss {m['loss']:.4f} lr {m['lr']:.2e} "
           f"{m['steps_per_s']:.2f} it/s data-wait {m['data_wait_fraction']:.0%} syn {m['synthetic_fraction']:.2f}")
    if "eval_miou" in m:
        msg += f" | val mIoU {m['eval_miou']:.4f} pixAcc {m['eval_pixel_acc']:.4f}"
    return msg


def best_hook(run: Location, m: dict[str, Any], checkpoint: Any) -> str:
    """``train``: an evaluated checkpoint that beats ``best/`` replaces it; the line says so."""
    if "eval_miou" not in m or checkpoint is None:
        return ""
    with checkpoint.as_directory() as d:
        return " (best so far: kept in best/)" if keep_best(run, Path(d), m["step"], m["eval_miou"]) else ""


class TensorBoard:
    """One SummaryWriter per controller; on a URI it writes to a local temporary directory that
    is copied up after each flush."""

    def __init__(self, run: Location) -> None:
        self.run, self.writer, self.local = run, None, None

    def write(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            import tempfile

            from torch.utils.tensorboard import SummaryWriter

            self.local = None if self.run.is_local else tempfile.mkdtemp(prefix="segfactory-tb-")
            self.writer = SummaryWriter(self.local or str(Path(self.run.path) / TB_DIR))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.local:
            upload_dir(self.local, self.run / TB_DIR)


def make_callback(run_dir: RunDir, append_metrics, *, line=train_line, scalars: tuple[str, ...] = SCALARS,
                  on_report=best_hook, logger: logging.Logger = log):
    """The controller-side callback (Ray Train ``UserCallback``) of every training command:
    metrics.csv (``append_metrics``), TensorBoard (``scalars``), failures in events.jsonl and a
    progress line (``line``; ``on_report`` may act on the checkpoint and add to it: best/)."""
    from core.compat import ray_api
    from core.runtime import own_loggers_in_ray_worker, ray_log_level

    UserCallback = ray_api("UserCallback")
    quiet = ray_log_level() is not None  # the `segfactory` command without --verbose
    run = locate(run_dir)

    class RunLog(UserCallback):
        """Writes metrics.csv, TensorBoard files (and best/); logs progress. Quiet: the evaluation
        steps, the last step, and otherwise at most one line every QUIET_EVERY_S."""

        def __init__(self):
            self.tb, self.last_line = TensorBoard(run), 0.0

        def after_report(self, run_context, metrics, checkpoint):
            own_loggers_in_ray_worker()  # the controller's process: lines of ours whatever Ray's root level is
            m = metrics[0]
            if "step" not in m:
                return
            append_metrics(run / "metrics.csv", m)
            self.tb.write(tb_scalars(m, scalars), m["step"])
            evaluated = any(k.startswith(("eval_", "val_")) for k in m)
            now = time.monotonic()
            if quiet and not evaluated and m["step"] < m["iterations"] and now - self.last_line < QUIET_EVERY_S:
                return
            self.last_line = now
            logger.info(line(m) + (on_report(run, m, checkpoint) if on_report else ""))

        def after_exception(self, run_context, worker_exceptions):
            own_loggers_in_ray_worker()
            errors = {int(r): f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                      for r, e in worker_exceptions.items()}
            append_event(run, "failure", ranks=sorted(errors), errors=errors)
            logger.warning("worker group failed (%s); Ray Train restarts it from the latest checkpoint if "
                           "max_failures allows", "; ".join(errors.values()))

    return RunLog()
