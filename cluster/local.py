"""A local Ray head for development and tests: ``segfactory cluster up | down | status``.

``up`` runs ``ray start --head`` from this interpreter's environment, bound to 127.0.0.1 on
free ports, in a session of its own (``start_new_session``) and a private temp dir, and
records what it started in a state file that later commands (``submit``, ``jobs``, ``down``)
read. ``down`` stops exactly those processes — found by their session id, the private temp
dir and their descendants (job drivers start sessions of their own) — never every Ray on the
machine the way ``ray stop`` does, because other people's Ray may be running beside ours.

Imports only the standard library and psutil (a Ray dependency): no torch, no Ray at import.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from core.runtime import ray_node_env

log = logging.getLogger(__name__)

STATE_ENV = "SEGFACTORY_STATE_DIR"
LOOPBACK = "127.0.0.1"
# On Linux Ray swaps 127.0.0.1 for the machine's routable address unless told the cluster is
# single-machine; the head and any driver joining it from a shell both need this.
JOIN_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"


class ClusterError(RuntimeError):
    """The local cluster cannot be started, found or stopped; the message is one line."""


@dataclass
class ClusterState:
    """What ``up`` started; written as JSON so ``submit``/``down`` in later processes find it."""

    gcs_address: str  # host:port, for ray.init(address=...) and `ray start --address`
    dashboard_url: str  # http://host:port, the job server (JobSubmissionClient)
    temp_dir: str  # private --temp-dir: every log, socket and spill file of this cluster
    session_dir: str
    sid: int  # session id shared by the processes `ray start` spawned
    pids: list[int] = field(default_factory=list)  # at start time (workers come and go)
    python: str = ""  # interpreter whose PATH the head's jobs inherit
    num_cpus: float | None = None
    num_gpus: float | None = None
    object_store_memory: int | None = None
    auth_mode: str = "token"  # `up` always starts with RAY_AUTH_MODE=token (token: ensure_token)
    started_at: float = 0.0


def state_file() -> Path:
    """``$SEGFACTORY_STATE_DIR/cluster.json`` (default ``~/.segfactory/cluster.json``)."""
    root = os.environ.get(STATE_ENV) or Path.home() / ".segfactory"
    return Path(root) / "cluster.json"


def read_state() -> ClusterState | None:
    """The recorded local cluster, or None when ``up`` was never run (or ``down`` ran)."""
    path = state_file()
    if not path.is_file():
        return None
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"{path}: unreadable cluster state ({exc}); delete it") from None


def _write_state(state: ClusterState) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


def token_path() -> Path:
    """Where Ray reads the token: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_token() -> Path | None:
    """Make sure the head will find a token; create one where Ray looks when there is none.

    ``RAY_AUTH_TOKEN`` in the environment wins (then no file is needed: returns None). Else the
    token file is ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; a missing or empty one gets a
    random 256-bit token (what ``ray get-auth-token --generate`` does, which only knows the
    default path), readable by its owner only.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        tmp.replace(path)
        log.info("created the auth token %s", path)
    path.chmod(0o600)
    return path


def free_port() -> int:
    """A port the kernel just handed out on loopback (free now; Ray binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _ray_binary() -> str:
    """The ``ray`` beside this interpreter, so the head's workers and jobs use this venv."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("no `ray` executable beside this Python or on PATH")
    return found


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (PID 1 here does not always reap orphans)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cluster_processes(state: ClusterState) -> list[psutil.Process]:
    """Live processes of this cluster: its session, plus descendants (job drivers call setsid).

    A session counts as ours only if one of its processes names our private temp dir, so a
    recycled session id of a dead cluster never matches someone else's processes.
    """
    members: dict[int, psutil.Process] = {}
    ours = False
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) != state.sid or not _alive(proc):
                continue
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        members[proc.pid] = proc
        ours = ours or any(state.temp_dir in arg for arg in (proc.info["cmdline"] or []))
    if not ours:
        return []
    for proc in list(members.values()):
        try:
            for child in proc.children(recursive=True):
                if _alive(child):
                    members.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return sorted(members.values(), key=lambda p: p.pid)


def _stop(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM, wait up to ``grace_s`` for exit (zombies count as gone), SIGKILL the rest."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    for proc in alive:
        log.info("pid %d (%s) ignored SIGTERM for %.0f s: killing", proc.pid, _name(proc), grace_s)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 5
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def up(num_cpus: float | None = None, num_gpus: float | None = None,
       object_store_memory: int | None = None, resources: dict[str, float] | None = None,
       timeout_s: float = 180.0) -> ClusterState:
    """Start a Ray head on loopback and record it; an already running one is returned as is."""
    current = read_state()
    if current is not None:
        if cluster_processes(current):
            log.info("a local cluster is already running at %s", current.gcs_address)
            return current
        log.info("removing the state of a local cluster that is no longer running")
        state_file().unlink(missing_ok=True)

    # Short path: Ray's unix sockets live under it and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    gcs_port, dash_port = free_port(), free_port()
    cmd = [_ray_binary(), "start", "--head", "--node-ip-address", LOOPBACK,
           "--port", str(gcs_port), "--dashboard-host", LOOPBACK, "--dashboard-port", str(dash_port),
           "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats",
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(int(num_cpus))]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(int(num_gpus))]
    if object_store_memory is not None:
        cmd += ["--object-store-memory", str(int(object_store_memory))]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    # Token auth, always: Ray 2.60's `ray start` turns it on only when a token already exists,
    # so without ~/.ray/auth_token the head would answer anyone who reaches its ports.
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: `cluster up` always starts with token auth",
                    os.environ["RAY_AUTH_MODE"])
    ensure_token()
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    key, value = JOIN_ENV.split("=")
    env[key] = value  # keeps every listener on loopback
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray_node_env(env)
    # Job entrypoints run `python ...`: make that this venv's interpreter on the head.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log.info("starting a Ray head: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        output = proc.communicate()[0]
    state = ClusterState(
        gcs_address=f"{LOOPBACK}:{gcs_port}", dashboard_url=f"http://{LOOPBACK}:{dash_port}",
        temp_dir=temp_dir, session_dir=os.path.realpath(os.path.join(temp_dir, "session_latest")),
        sid=proc.pid, python=sys.executable, num_cpus=num_cpus, num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        auth_mode="token", started_at=time.time())
    if proc.returncode != 0:
        _stop(cluster_processes(state), grace_s=5)
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ClusterError(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
    state.pids = [p.pid for p in cluster_processes(state)]
    _write_state(state)
    log.info("local Ray head up: %s (dashboard %s), %d processes", state.gcs_address,
             state.dashboard_url, len(state.pids))
    return state


def down(grace_s: float = 10.0) -> tuple[ClusterState | None, list[int]]:
    """Stop the recorded cluster's processes; return (state, pids stopped). No state: (None, [])."""
    state = read_state()
    if state is None:
        return None, []
    procs = cluster_processes(state)
    stopped = [p.pid for p in procs]
    # Ray's own order: the raylet first (it stops its workers), the GCS last.
    first = [p for p in procs if _name(p) == "raylet"]
    last = [p for p in procs if _name(p) == "gcs_server"]
    middle = [p for p in procs if p not in first and p not in last]
    left = []
    for group in (first, middle, last):
        left += _stop(group, grace_s)
    # Anything the raylet spawned while we were stopping it.
    left += _stop(cluster_processes(state), grace_s)
    if left:
        raise ClusterError(f"could not stop pids {[p.pid for p in left]}")
    state_file().unlink(missing_ok=True)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    log.info("local Ray head at %s stopped (%d processes)", state.gcs_address, len(stopped))
    return state, stopped


def status() -> tuple[ClusterState | None, list[psutil.Process], bool]:
    """(state, live processes, whether the job server answers) of the recorded cluster."""
    state = read_state()
    if state is None:
        return None, [], False
    procs = cluster_processes(state)
    return state, procs, bool(procs) and _dashboard_answers(state.dashboard_url)


def probe_auth(url: str, timeout_s: float = 3.0) -> str:
    """What the job server really does with a request that carries no token: ``"token"`` when it
    refuses it (401/403), ``"none"`` when it answers, ``"unknown"`` when it cannot be reached."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/jobs/", timeout=timeout_s):
            return "none"
    except urllib.error.HTTPError as exc:
        return "token" if exc.code in (401, 403) else "unknown"
    except OSError:
        return "unknown"


def _dashboard_answers(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the dashboard's HTTP server answers on its (unauthenticated) version route."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:  # 401/403: it answered, it just wants the token
        return True
    except OSError:
        return False
