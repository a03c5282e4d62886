"""Job submission through Ray's Jobs SDK: ``segfactory submit`` and ``segfactory jobs ...``.

A job runs ``python -m segfactory.cli <args>`` on the cluster with this repository as its
``working_dir`` (so the cluster runs the code you have, not what its image was built with),
minus the virtualenv, outputs, caches and weights. With ``--wait`` the logs are followed and
the command exits with the job's outcome: 0 on SUCCEEDED, the driver's own exit code when it
failed with one (2 = bad config, 3 = too many rejected rows), else 1.

Ray's SDK is imported inside the functions, so ``segfactory --help`` never pays for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cluster import local

log = logging.getLogger(__name__)

# The checkout this code runs from; an installed (non-editable) copy has none: use the cwd.
_HERE = Path(__file__).resolve().parents[1]
REPO_ROOT = _HERE if (_HERE / "pyproject.toml").is_file() else Path.cwd()
# gitignore-style patterns left out of the uploaded working_dir (Ray also honours .gitignore).
EXCLUDES = [
    ".venv/", "venv/", ".git/", "demo-output/", "runs/", "out/", "build/", "models/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", "*.egg-info/",
    "*.parquet", "*.safetensors", "*.ckpt", "*.bin", "*.pt",
]
# Passed to the job when set here: model caches and offline switches.
PASSTHROUGH_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                   "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "TORCH_HOME")
TAIL_LINES = 20


def resolve_address(address: str | None) -> str:
    """Job-server URL: ``--address``, ``RAY_API_SERVER_ADDRESS``, an http ``RAY_ADDRESS``,
    else the local head that ``segfactory cluster up`` recorded."""
    candidates = [address, os.environ.get("RAY_API_SERVER_ADDRESS")]
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):  # a GCS host:port is not a job server
        candidates.append(ray_address)
    for value in candidates:
        if value:
            return value if "://" in value else f"http://{value}"
    state = local.read_state()
    if state is not None:
        return state.dashboard_url
    raise local.ClusterError("no cluster: pass --address http://HEAD:8265, set "
                             "RAY_API_SERVER_ADDRESS, or start one with `segfactory cluster up`")


def _auth_headers(url: str) -> dict[str, str]:
    """The token of our own local head, which Ray's client only sends when RAY_AUTH_MODE=token.

    Only for the recorded local head: a token is never sent to an address we did not start
    (remote clusters use Ray's own RAY_AUTH_MODE / RAY_AUTH_TOKEN settings).
    """
    state = local.read_state()
    if state is None or state.dashboard_url != url or state.auth_mode != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None) -> Any:
    """A JobSubmissionClient for ``address`` (see :func:`resolve_address`)."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    return JobSubmissionClient(url, headers=_auth_headers(url) or None)


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` sets a variable, a bare ``KEY`` passes this shell's value."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"--env {key}: not set in this environment")
            value = os.environ[key]
        out[key] = value
    return out


def runtime_env(working_dir: str | Path = REPO_ROOT, env: dict[str, str] | None = None,
                pip: list[str] | None = None, passthrough: bool = True) -> dict[str, Any]:
    """working_dir (with :data:`EXCLUDES`), env_vars and optional pip requirements of a job."""
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if passthrough and os.environ.get(k)}
    env_vars.update(env or {})
    if env_vars:
        log.info("job environment: %s", ", ".join(f"{k}={v}" for k, v in sorted(env_vars.items())))
    out: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if env_vars:
        out["env_vars"] = env_vars
    if pip:
        out["pip"] = list(pip)
    return out


def entrypoint(args: list[str]) -> str:
    """The shell command a job runs: our CLI, from the working_dir, with the job's python."""
    return "python -m segfactory.cli " + shlex.join(args)


def warn_relative_paths(args: list[str]) -> None:
    """A relative ``*.path=`` lands in the job's temporary working_dir copy on the cluster."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.endswith("path") and value and not value.startswith(("/", "s3://", "gs://")):
            log.warning("%s is relative: on the cluster it resolves inside the job's temporary "
                        "working_dir; use an absolute path on shared storage", arg)


def submit(args: list[str], address: str | None = None, env: dict[str, str] | None = None,
           pip: list[str] | None = None, working_dir: str | Path = REPO_ROOT,
           submission_id: str | None = None, entrypoint_num_gpus: float = 0) -> tuple[Any, str]:
    """Submit ``segfactory <args>`` as a job; return (client, submission id)."""
    warn_relative_paths(args)
    jobs = client(address)
    job_id = jobs.submit_job(entrypoint=entrypoint(args), submission_id=submission_id,
                             runtime_env=runtime_env(working_dir, env, pip),
                             metadata={"segfactory_command": args[0] if args else ""},
                             entrypoint_num_gpus=entrypoint_num_gpus or None)
    return jobs, job_id


async def _tail(jobs: Any, job_id: str, out: TextIO, written: list[int]) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        written[0] += len(chunk)  # kept outside, so a broken stream resumes where it stopped


def follow(jobs: Any, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; return its final status name.

    The SDK's websocket tail is used; if it breaks, polling ``get_job_logs`` prints the rest.
    """
    out = out or sys.stdout
    count = [0]
    try:
        asyncio.run(_tail(jobs, job_id, out, count))
    except Exception as exc:  # noqa: BLE001 - any tail failure falls back to polling
        log.info("log stream interrupted (%s); polling instead", (str(exc) or type(exc).__name__).splitlines()[0])
    written = count[0]
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id)
        if len(logs) > written:
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def wait(jobs: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Block until the job ends (no log output); return its final status name."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = jobs.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def exit_code(jobs: Any, job_id: str) -> int:
    """0 on SUCCEEDED; the driver's exit code when it failed with one; else 1."""
    info = jobs.get_job_info(job_id)
    if str(info.status.value) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 256 else 1


def failure_report(jobs: Any, job_id: str, lines: int = TAIL_LINES) -> str:
    """One header line (status, exit code, Ray's message) and the job's last log lines."""
    info = jobs.get_job_info(job_id)
    message = (info.message or "").strip().splitlines()
    code = getattr(info, "driver_exit_code", None)
    head = f"job {job_id} {info.status.value}" + (f" (exit code {code})" if code is not None else "")
    if message:
        head += f": {message[0]}"
    tail = jobs.get_job_logs(job_id).rstrip().splitlines()[-lines:]
    return "\n".join([head, f"--- last {len(tail)} log lines ---", *tail])


def list_jobs(jobs: Any) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first, as plain dicts for printing."""
    rows = []
    for info in jobs.list_jobs():
        rows.append({"id": info.submission_id or info.job_id, "status": str(info.status.value),
                     "start_time": info.start_time or 0, "end_time": info.end_time,
                     "exit_code": getattr(info, "driver_exit_code", None),
                     "entrypoint": info.entrypoint})
    return sorted(rows, key=lambda r: r["start_time"], reverse=True)
