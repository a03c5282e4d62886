"""Starting or joining Ray with the settings every run shares."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Ray keeps only ~num_cpus idle worker processes and kills the rest after a second. A training
# run holds ~10 actors (controller, workers, coordinators), so on a small node every Ray Data
# task then starts a fresh Python process: measured on 2 CPUs, a 10-step run spent 15 s instead
# of 6 s in its loop. Keep more idle workers (they only exist once something needed them).
WORKER_SOFT_LIMIT = ("RAY_num_workers_soft_limit", "32")
# Level for Ray's own Python loggers in every process of the job (``ray.LoggingConfig``); the
# ``segfactory`` command sets it (segfactory/logs.py), unset keeps Ray's defaults.
RAY_LOG_LEVEL_ENV = "SEGFACTORY_RAY_LOG_LEVEL"


OUR_LOGGERS = ("segfactory", "pipelines", "training", "cluster", "actors", "core")


class ShortFormatter(logging.Formatter):
    """``12:01:02 message``; warnings and errors say so."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            head, _, rest = line.partition(" ")
            line = f"{head} {record.levelname.lower()}: {rest}"
        return line


def own_loggers(stream=None, level: int = logging.INFO) -> None:
    """Give our loggers a handler of their own (idempotent).

    In a Ray worker the root logger's level is whatever the job's ``ray.LoggingConfig`` says
    (ERROR when the command runs quiet), which would swallow our INFO/WARNING lines there too;
    with a handler of our own they reach the driver's console through Ray's log forwarding.
    """
    handler = None
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, "_segfactory", False) for h in logger.handlers):
            continue
        if handler is None:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(ShortFormatter())
            handler._segfactory = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def own_loggers_in_ray_worker() -> None:
    """:func:`own_loggers` in a process Ray started (an actor of a pool, the Train controller);
    nothing in the driver or a test process, whose logging belongs to its caller."""
    if os.environ.get("RAY_RAYLET_PID"):  # set by the raylet for the processes it spawns
        own_loggers()


def ray_log_level() -> str | None:
    """The level asked for Ray's loggers, or None for Ray's defaults."""
    return os.environ.get(RAY_LOG_LEVEL_ENV) or None


def ray_node_env(env: dict[str, str]) -> dict[str, str]:
    """Settings for the Ray processes we start (a local instance, or ``cluster up``'s head)."""
    env.setdefault(*WORKER_SOFT_LIMIT)
    return env


def pin_ray_address() -> None:
    """Ray's ``worker_process_setup_hook`` for the local instances we start: ``RAY_ADDRESS`` is
    this instance's GCS in each of its worker processes. Ray's state API, which Ray Train's
    PlacementGroupCleaner polls without an address, would otherwise search the machine and,
    when another Ray instance runs there, fail every second with "Found multiple active Ray
    instances" (a 30-line traceback in every train/evaluate/finetune/scaling)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(ray_cfg=None, **kwargs) -> None:
    """Join ``ray_cfg.address`` (or ``RAY_ADDRESS``), else start a local instance; set Data options.

    A stall longer than ``no_progress_timeout_s`` becomes an error instead of a silent hang.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        # "local" starts a private instance instead of silently joining whatever cluster this
        # machine last started; jobs submitted to a cluster get RAY_ADDRESS from Ray.
        address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            ray_node_env(os.environ)  # the raylet we start inherits this process's environment
        level = ray_log_level()
        if level and "logging_config" not in kwargs:
            kwargs["logging_config"] = ray.LoggingConfig(log_level=level)
        if address == "local" and "runtime_env" not in kwargs:
            kwargs["runtime_env"] = {"worker_process_setup_hook": "core.runtime.pin_ray_address"}
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 ignore_reinit_error=True, **kwargs)
    ctx = DataContext.get_current()
    if ray_cfg is not None:
        ctx.execution_no_progress_timeout_s = ray_cfg.no_progress_timeout_s or -1  # 0 / None: guard off
        # bars only on a terminal: in a log file or a job's output they are ANSI noise
        ctx.enable_progress_bars = ray_cfg.show_progress and sys.stderr.isatty()
    ctx.execution_options.preserve_order = False


def actor_restarts(since: float = 0.0) -> dict[str, int]:
    """Restarts Ray made of this job's actors created after ``since`` (epoch seconds), by actor
    class (model pools, writers): how a run counts the processes it lost. Ray's actor table has the count (``ray.util.state`` would
    need the dashboard, which runs are often started without): a private API (core/compat.py)."""
    import ray

    from core.compat import ray_api

    job = ray.get_runtime_context().get_job_id()
    out: dict[str, int] = {}
    try:
        table = ray_api("actor_table")()
    except Exception:  # noqa: BLE001 - informative only
        log.debug("no actor table", exc_info=True)
        return out
    for info in table.values():
        if info.get("JobID") == job and info.get("NumRestarts") and info.get("StartTime", 0) >= since * 1000:
            name = info.get("ActorClassName") or "?"
            out[name] = out.get(name, 0) + int(info["NumRestarts"])
    return dict(sorted(out.items()))
