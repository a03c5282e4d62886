"""A lease on an output: one ``generate`` writes a dataset at a time.

``OUT/_lease.json`` names the holder (host, pid, run id), when it started, and when the lease
expires; the holder's driver renews it every ``ttl/4`` seconds from a daemon thread. A second run
finds a live lease and stops (exit 2, naming the holder). A lease is taken over, with a warning,
when it has expired (the holder's driver is gone: a lost head node stops renewing) or when its
holder ran on this host and its process is gone (a killed driver rerun at once need not wait).

Object stores offer pyarrow no conditional write, so taking a lease is write-then-read-back:
two runs starting within the same fraction of a second could both read their own lease;
the later write wins and the earlier run stops at its first renewal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from core import storage
from core.storage import Location

log = logging.getLogger(__name__)

LEASE = "_lease.json"
SETTLE_S = 0.5  # between writing the lease and reading it back (lets a racing writer land)


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (exit 2: it names the holder)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(loc: Location) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(loc))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign file: nobody holds it
        log.warning("%s: unreadable lease, taking it", loc)
        return None


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"{holder.get('host')} pid {holder.get('pid')} (run {holder.get('run_id')}, started {started})"


def _stale(holder: dict[str, Any], now: float) -> str | None:
    """Why a lease may be taken over, or None while it is live."""
    if holder.get("expires", 0) <= now:
        return f"it expired {now - holder.get('expires', 0):.0f} s ago"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return "its process is gone from this host"
    return None


class Lease:
    """The lease of one run: :meth:`acquire`, renewed in the background, :meth:`release`."""

    def __init__(self, out: Location, ttl_s: float):
        self.loc = out / LEASE
        self.ttl_s = ttl_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex[:12],
                   "started": time.time()}
        self.lost = threading.Event()
        # a run refused by a check before it wrote anything leaves no directory behind
        self._made_dir = out.is_local and not os.path.exists(out.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="segfactory-lease", daemon=True)

    def _write(self) -> None:
        storage.write_text(self.loc, json.dumps({**self.me, "heartbeat": time.time(),
                                                 "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}))

    def acquire(self) -> Lease:
        holder = _read(self.loc)
        if holder is not None:
            why = _stale(holder, time.time())
            if why is None:
                raise LeaseHeld(f"{self.loc.parent}: another generate is writing there: {describe(holder)}, lease "
                                f"until {holder.get('expires', 0) - time.time():.0f} s from now ({self.loc.uri})")
            log.warning("%s: taking over the lease of %s: %s", self.loc.parent, describe(holder), why)
        self._write()
        time.sleep(SETTLE_S)
        holder = _read(self.loc)
        if not holder or holder.get("run_id") != self.me["run_id"]:
            raise LeaseHeld(f"{self.loc.parent}: another generate took the lease as this one started: "
                            f"{describe(holder or {})}")
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                holder = _read(self.loc)
                if holder and holder.get("run_id") != self.me["run_id"]:
                    log.error("%s: the lease was taken by %s", self.loc.parent, describe(holder))
                    self.lost.set()
                    return
                self._write()
            except Exception:  # noqa: BLE001 - a failed renewal is retried; expiry covers a lasting one
                log.warning("lease renewal failed", exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        holder = _read(self.loc)
        if holder and holder.get("run_id") == self.me["run_id"]:
            storage.remove(self.loc)
            if self._made_dir and not os.listdir(self.loc.parent.path):
                os.rmdir(self.loc.parent.path)
