"""Starting or joining Ray with the settings every run shares."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Ray keeps only ~num_cpus idle worker processes and kills the rest after a second. A training
# run holds ~10 actors (controller, workers, coordinators), so on a small node every Ray Data
# task then starts a fresh Python process: measured on 2 CPUs, a 10-step run spent 15 s instead
# of 6 s in its loop. Keep more idle workers (they only exist once something needed them).
WORKER_SOFT_LIMIT = ("RAY_num_workers_soft_limit", "32")


def ray_node_env(env: dict[str, str]) -> dict[str, str]:
    """Settings for the Ray processes we start (a local instance, or ``cluster up``'s head)."""
    env.setdefault(*WORKER_SOFT_LIMIT)
    return env


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
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 ignore_reinit_error=True, **kwargs)
    ctx = DataContext.get_current()
    if ray_cfg is not None:
        ctx.execution_no_progress_timeout_s = ray_cfg.no_progress_timeout_s or -1  # 0 / None: guard off
        ctx.enable_progress_bars = ray_cfg.show_progress
    ctx.execution_options.preserve_order = False
