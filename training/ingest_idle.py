"""Keep an idle Ray Data executor from spinning while the trainer computes.

Ray Data's scheduling loop (Ray 2.60) blocks in ``ray.wait`` only while some task runs. A
training stream spends most of its life backpressured by the trainer with nothing to run, and
then the loop spins: measured on 2 CPUs in a toy mixed trial, each stream's SplitCoordinator
took 80-93 % of a core and the training worker ~40 %; with this callback 12-19 % and 75-94 %,
and steady-state 8 -> 16 steps/s (benchmarks/bench_ingest_idle.py: 7.3 -> 9.8 median steps/s
over a whole run). After a loop step that found no running task the callback sleeps
``sleep_s``; a busy executor is left alone.
"""

from __future__ import annotations

import functools
import time

from core.compat import ray_api


class SleepWhenIdle(ray_api("ExecutionCallback")):
    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None)  # internal: without it, do nothing
        if topology and not any(op.num_active_tasks() for op in topology):
            time.sleep(self.sleep_s)


def sleep_when_idle(ds, sleep_s: float):
    """Register the callback in ``ds``'s own DataContext: it travels with the dataset into
    Ray Train's split coordinators and leaves other datasets alone. ``sleep_s`` 0: off."""
    if sleep_s > 0:
        ctx = ds.context  # Ray builds callbacks with cls(): a partial carries the argument
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes,
                                                 functools.partial(SleepWhenIdle, sleep_s)]
    return ds
