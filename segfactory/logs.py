"""What the ``segfactory`` command prints: one line per event by default, everything with ``--verbose``.

Quiet (the default) uses only the switches Ray offers, set before Ray starts so the processes
it spawns inherit them:

- our own loggers (``segfactory``, ``pipelines``, ``training``, ``cluster``, ``actors``) print
  ``HH:MM:SS message`` at INFO through a handler of their own, so the levels Ray sets on the root
  logger do not touch them;
- ``SEGFACTORY_RAY_LOG_LEVEL=ERROR`` makes :func:`core.runtime.init_ray` pass
  ``ray.LoggingConfig(log_level=...)`` to ``ray.init`` (the root and ``ray`` loggers of every
  worker: Ray Train's PlacementGroupCleaner warning every second without a dashboard, the
  "Reporting training result" echo of every ``ray.train.report``), and the training recipe passes
  ``ray.train.LoggingConfig(log_level="WARNING")`` for the ``ray.train`` logger;
- ``RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING=0``: Ray Train would otherwise reset every training
  worker's root logger to INFO;
- ``RAY_DATA_LOGGING_CONFIG`` points Ray Data at ``ray_data_logging.yaml``: warnings on the
  console, the full log in the session's ``logs/ray-data/ray-data.log``;
- ``HF_HUB_DISABLE_PROGRESS_BARS=1``: no "Writing model shards" bar at each checkpoint;
- ``PYTHONWARNINGS=ignore::DeprecationWarning`` for the processes Ray starts (Ray's own
  deprecated calls inside Ray Train).

- a local instance we start pins ``RAY_ADDRESS`` in its workers (``core.runtime.pin_ray_address``,
  Ray's ``worker_process_setup_hook``): Ray Train's PlacementGroupCleaner would otherwise fail
  with "Found multiple active Ray instances" every second when another Ray runs on the machine;
- Ray Data's progress bars are drawn only when stderr is a terminal.

What stays: our lines, warnings of Ray Data and Ray Train (e.g. "Failed to send resource
request" with its traceback when the CPUs are overloaded), the raylet's warnings and Ray's C++
errors: the driver's ``core_worker.cc`` "constructor arguments in the object store" line of
every Ray Data actor pool (Ray's issue 53727) comes from Ray's C++ logger, which only
``RAY_BACKEND_LOG_LEVEL=fatal`` silences — for every Ray process and its log files as well, at
the price of one "Set ray log level" line; not done.

Every variable is set with ``setdefault``: one exported in the shell wins. Ray's own log files
(``/tmp/ray/session_latest/logs``) keep everything either way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from core.runtime import RAY_LOG_LEVEL_ENV, own_loggers

RAY_DATA_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
QUIET_ENV = {
    RAY_LOG_LEVEL_ENV: "ERROR",  # read by core.runtime.init_ray and training.recipe
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_CONFIG),
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_DEDUP_LOGS": "1",  # Ray's default, stated: a line repeated by many workers is printed once
    # Ray's workers warn when Ray's own code calls its deprecated APIs (Ray Train's DatasetManager:
    # ExecutionOptions.exclude_resources): nothing an operator can act on
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def setup_logging(verbose: bool = False) -> None:
    """Configure logging for one command line run (call once, before anything starts Ray)."""
    if verbose:
        for key, value in QUIET_ENV.items():  # a parent `segfactory` may have set them
            if os.environ.get(key) == value:
                del os.environ[key]
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    own_loggers(sys.stderr)  # ray.init(logging_config=...) adds a root handler: ours stay apart
    logging.getLogger("ray").setLevel(logging.WARNING)  # the driver's Ray lines before ray.init
