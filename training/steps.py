"""Step accounting shared by the training loops on a Ray Train worker: ``train``'s
(:mod:`training.loop`) and every ``finetune`` recipe's (:mod:`training.finetune.recipe_base`).

- :func:`due`: at a step, whether to evaluate, checkpoint and report;
- :class:`Window`: loss, data wait and step time over one reporting window;
- :func:`fail_if_asked`: ``debug.fail_at_steps`` fault injection (rank 0 raises once per step,
  a marker file in the run directory — local or a URI — remembers it across restarts);
- :func:`restore_dir` / :func:`release_restore`: the checkpoint a worker starts from (Ray Train's after a failure, else
  the driver's ``resume_from``, copied down from a URI once), and the removal of its copy once loaded;
- :func:`report`: ``ray.train.report`` with a checkpoint rank 0 writes into a temporary
  directory named like every checkpoint of the run directory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def due(step: int, *, end: int, eval_every: int, ckpt_every: int | None, log_every: int) -> tuple[bool, bool, bool]:
    """(evaluate, checkpoint, report) after optimizer step ``step``: evaluation every
    ``eval_every`` steps and at ``end``, a checkpoint at each evaluation and every
    ``ckpt_every`` steps, a report at each of those and every ``log_every`` steps."""
    do_eval = step % eval_every == 0 or step == end
    do_ckpt = do_eval or bool(ckpt_every and step % ckpt_every == 0)
    return do_eval, do_ckpt, do_ckpt or step % log_every == 0


class Window:
    """Sums over the steps of one reporting window (reset after each report)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.wait, self.busy, self.t0 = 0.0, 0, 0.0, 0.0, time.perf_counter()

    def add(self, loss: float, wait: float, busy: float) -> None:
        """One optimizer step: its loss, the seconds it waited for data and the seconds it took."""
        self.loss, self.n, self.wait, self.busy = self.loss + loss, self.n + 1, self.wait + wait, self.busy + busy

    def metrics(self) -> dict[str, float]:
        """Mean loss, data-wait share of the busy time, mean step time, steps per wall second."""
        span = time.perf_counter() - self.t0
        return {"loss": self.loss / max(1, self.n), "data_wait_fraction": self.wait / max(1e-9, self.busy),
                "step_time_s": self.busy / max(1, self.n), "steps_per_s": self.n / max(1e-9, span)}


def fail_if_asked(run_dir: str, step: int, fail_at_steps: list[int], rank: int) -> None:
    """``debug.fail_at_steps``: rank 0 raises once at each listed step (the marker
    ``RUN/.failed_at_<step>`` makes the restarted worker group go past it)."""
    if step not in fail_at_steps or rank != 0:
        return
    from core import storage

    marker = storage.resolve(run_dir) / f".failed_at_{step}"
    if not storage.exists(marker):
        storage.write_bytes(marker, b"")
        raise RuntimeError(f"debug.fail_at_steps: simulated worker failure at step {step}")


RESTORE_PREFIX = "segfactory-restore-"


def release_restore(path: str | None) -> None:
    """Delete a copy :func:`restore_dir` made of Ray's checkpoint once the worker has loaded it
    (every failure restart makes one per rank); a fetched ``resume_from`` is the node's model
    cache and stays."""
    if path and Path(path).name.startswith(RESTORE_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def restore_dir(resume_from: str | None) -> str | None:
    """The local checkpoint directory a worker resumes from, or None: Ray Train's latest (a
    restart after a failure in this fit), else the driver's ``resume_from`` (``resume=true``;
    a URI is copied down to this node's model cache)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a directory of this process's own: ranks on one node share Ray's default one
        return ckpt.to_directory(tempfile.mkdtemp(prefix=RESTORE_PREFIX))
    if not resume_from:
        return None
    from training.rundir import fetch_dir

    return str(fetch_dir(resume_from))


def report(metrics: dict[str, Any], step: int, rank: int, write: Callable[[Path], None] | None = None) -> None:
    """``ray.train.report``; with ``write``, rank 0 writes a checkpoint into a temporary directory
    (every rank reports, only rank 0 with a checkpoint) that Ray Train copies into the run
    directory as ``checkpoint_<step>``."""
    import ray.train

    from training.rundir import checkpoint_name

    if write is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            write(Path(tmp))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(step))
