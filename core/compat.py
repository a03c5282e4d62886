"""Every Ray API outside Ray's public surface that segfactory uses, in one place.

Ray moves its internals between minor releases; when an upgrade breaks one of these, it breaks
here, with a message naming the API and the Ray version segfactory was tested with, instead of
as an ImportError deep inside a training run. Tested with the Ray versions in ``TESTED_RAY``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger(__name__)

TESTED_RAY = ("2.60",)  # major.minor releases these imports were checked against

# name -> (module, attribute): the private APIs we use, and why
PRIVATE_APIS: dict[str, tuple[str, str]] = {
    # Ray Train v2 controller callbacks: metrics.csv, events.jsonl, restarts (training/runlog.py)
    "UserCallback": ("ray.train.v2.api.callback", "UserCallback"),
    # Ray Data executor hook: an idle stream sleeps instead of spinning (training/ingest_idle.py)
    "ExecutionCallback": ("ray.data._internal.execution.execution_callback", "ExecutionCallback"),
    # GCS actor table with NumRestarts, no dashboard needed (core/runtime.py actor_restarts)
    "actor_table": ("ray._private.state", "actors"),
}
_warned = False


def ray_api(name: str) -> Any:
    """The private Ray object ``name`` (a key of :data:`PRIVATE_APIS`), or an ImportError that
    says which Ray release segfactory needs."""
    global _warned
    import ray

    version = ".".join(ray.__version__.split(".")[:2])
    if version not in TESTED_RAY and not _warned:
        _warned = True
        log.warning("Ray %s: segfactory's private-API imports were tested with Ray %s (core/compat.py)",
                    ray.__version__, ", ".join(TESTED_RAY))
    module, attr = PRIVATE_APIS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"Ray {ray.__version__} has no {module}.{attr} (segfactory uses it and was tested "
                          f"with Ray {', '.join(TESTED_RAY)}); pin ray to a tested release") from exc
