"""One log line an operator can read every N seconds: shards done/total, samples/s, rejected, ETA.

Written by a daemon thread from counters the driver updates with each shard's completion
record, so the line comes on time whether Ray's progress bars are on or off and whether or not
a shard finished in the interval.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("segfactory.progress")


class Progress:
    """Counters of one run; ``start()`` begins logging every ``interval_s``, ``stop()`` ends it."""

    def __init__(self, total_shards: int, done_before: int, interval_s: float, rejected_before: int = 0):
        self.total, self.done_before, self.interval_s = total_shards, done_before, interval_s
        self.shards = self.kept = 0
        self.rejected = self._before = rejected_before  # rows rejected before the stream (the index's)
        self.shards_per_node: dict[str, int] = {}  # bounded by the cluster's nodes, not the job
        self.started = time.monotonic()
        self._stopped: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="segfactory-progress", daemon=True)

    def record(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self.shards += 1
            self.kept += int(rec["kept"])
            self.rejected += int(rec["rejected"])
            node = rec.get("node") or "?"
            self.shards_per_node[node] = self.shards_per_node.get(node, 0) + 1

    def elapsed(self) -> float:
        """Seconds since the stream started (until ``stop()``)."""
        return (self._stopped or time.monotonic()) - self.started

    def line(self) -> str:
        with self._lock:
            elapsed = max(self.elapsed(), 1e-9)
            done = self.done_before + self.shards
            rate = (self.kept + self.rejected - self._before) / elapsed
            left = self.total - done
            eta = "?" if not self.shards else _duration(left * elapsed / self.shards)
            return (f"progress: shards {done}/{self.total} ({done / max(self.total, 1):.0%}), "
                    f"{rate:.2f} samples/s, kept {self.kept}, rejected {self.rejected}, "
                    f"elapsed {_duration(elapsed)}, ETA {eta}")

    def start(self) -> Progress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = time.monotonic()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        log.info(self.line())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info(self.line())


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
