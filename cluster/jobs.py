"""Job submission through Ray's Jobs SDK: ``segfactory submit`` and ``segfactory jobs ...``.

``submit`` does what ``ray job submit`` does, plus what segfactory needs: any entrypoint after
``--`` (``-- python train.py``; ``-- segfactory generate ...`` and the short ``-- generate ...``
run ``python -m segfactory.cli`` from the job's working_dir, so the cluster runs the code you
have), ``--runtime-env``/``--runtime-env-json``, ``--entrypoint-num-cpus/-gpus/-memory/-resources``,
headers from ``RAY_JOB_HEADERS``. The working_dir defaults to the project root of an editable
install (minus the virtualenv, outputs, caches and weights); an installed wheel has none, and
then ``submit`` refuses rather than upload whatever directory you happen to be in. With
``--wait`` the logs are followed and the command exits with the job's outcome: 0 on SUCCEEDED,
the driver's own exit code when it failed with one (2 = bad config or input, 3 = too many
rejected rows), else 1.

Ray's SDK is imported inside the functions, so ``segfactory --help`` never pays for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cluster import local

log = logging.getLogger(__name__)

# The checkout this code runs from (an editable install); a wheel install has none.
_HERE = Path(__file__).resolve().parents[1]
REPO_ROOT: Path | None = _HERE if (_HERE / "pyproject.toml").is_file() else None
# First words of an entrypoint that mean "our CLI": run it from the working_dir's code.
OUR_CLI = "python -m segfactory.cli"
# `submit -- generate ...` (no program name) means `segfactory generate ...`; a test keeps this in
# step with the CLI's subcommands (cluster/ does not import the CLI).
SEGFACTORY_COMMANDS = frozenset({"demo", "toy-data", "generate", "inspect", "export", "configs", "train", "evaluate",
                                 "scaling", "finetune", "predict", "cluster", "submit", "jobs"})
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


def env_headers() -> dict[str, str]:
    """Headers from ``RAY_JOB_HEADERS`` (a JSON object), as ``ray job submit`` reads them: e.g.
    ``{"Authorization": "Bearer TOKEN"}`` for a cluster behind a proxy."""
    raw = os.environ.get("RAY_JOB_HEADERS")
    if not raw:
        return {}
    try:
        headers = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"RAY_JOB_HEADERS: not JSON ({exc})") from None
    if not isinstance(headers, dict):
        raise ValueError("RAY_JOB_HEADERS: must be a JSON object of header: value")
    return {str(k): str(v) for k, v in headers.items()}


def client(address: str | None = None) -> Any:
    """A JobSubmissionClient for ``address`` (see :func:`resolve_address`). Ray's SDK adds the
    token itself when ``RAY_AUTH_MODE=token`` (from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``); ``RAY_JOB_HEADERS`` headers are sent as they are."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers = {**_auth_headers(url), **env_headers()}
    return JobSubmissionClient(url, headers=headers or None)


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


def load_runtime_env(path: str | None = None, text: str | None = None) -> dict[str, Any]:
    """``--runtime-env FILE`` (YAML) or ``--runtime-env-json TEXT``, like ``ray job submit``."""
    if path and text:
        raise ValueError("--runtime-env and --runtime-env-json: give one of them")
    if path:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"--runtime-env {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"--runtime-env {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    elif text:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--runtime-env-json: not JSON ({exc})") from None
    else:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the runtime env must be a mapping (working_dir, env_vars, pip, ...)")
    return data


def default_working_dir() -> Path:
    """The project root of an editable install; a wheel install has nothing to upload."""
    if REPO_ROOT is None:
        raise ValueError("segfactory is installed without its project folder, so there is no code to upload: "
                         "pass --working-dir DIR (the folder to ship), or --no-working-dir to run the "
                         "cluster's installed segfactory")
    return REPO_ROOT


def runtime_env(working_dir: str | Path | None = REPO_ROOT, env: dict[str, str] | None = None,
                pip: list[str] | None = None, passthrough: bool = True,
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's runtime env: ``base`` (``--runtime-env``) with working_dir (and :data:`EXCLUDES`),
    env_vars and pip requirements added; ``working_dir=None`` leaves base's (or none)."""
    out: dict[str, Any] = dict(base or {})
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if passthrough and os.environ.get(k)}
    env_vars.update(out.get("env_vars") or {})
    env_vars.update(env or {})
    if env_vars:
        log.info("job environment: %s", ", ".join(f"{k}={v}" for k, v in sorted(env_vars.items())))
        out["env_vars"] = env_vars
    if working_dir is not None:
        out["working_dir"] = str(working_dir)
    if "working_dir" in out:
        out["excludes"] = list(dict.fromkeys([*(out.get("excludes") or []), *EXCLUDES]))
    if pip:
        out["pip"] = [*(out.get("pip") or []), *pip]
    return out


def entrypoint(args: list[str]) -> str:
    """The shell command a job runs. ``segfactory ...`` and the short ``generate ...`` become our
    CLI run with the job's python from the working_dir; anything else runs as given."""
    if args and args[0] == "segfactory":
        return f"{OUR_CLI} {shlex.join(args[1:])}".rstrip()
    if args and args[0] in SEGFACTORY_COMMANDS:
        return f"{OUR_CLI} {shlex.join(args)}"
    return shlex.join(args)


def warn_relative_paths(args: list[str]) -> None:
    """A relative path lands in the job's temporary working_dir copy on the cluster: warn about
    ``*path=`` / ``*paths=[...]`` overrides and the ``path``/``local_path``/``paths`` values of
    the ``--config`` YAML."""
    for where, value in _path_values(args):
        if value and not value.startswith(("/", "~")) and "://" not in value:
            log.warning("%s=%s is relative: on the cluster it resolves inside the job's temporary "
                        "working_dir; use an absolute path on shared storage", where, value)


def _path_values(args: list[str]) -> list[tuple[str, str]]:
    found = []
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if sep and key.endswith(("path", "paths")) and not key.startswith("-"):
            found += [(key, v) for v in _as_list(value)]
        if arg == "--config" and i + 1 < len(args):
            found += _config_paths(args[i + 1])
    return found


def _as_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
    return [value]


def _config_paths(config: str) -> list[tuple[str, str]]:
    """(dotted key, value) of every path-like key in a local YAML config (unreadable: none)."""
    import yaml

    path = Path(config)
    if not path.is_file():
        return []  # a shipped config's name: its paths are placeholders overridden on the line
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    found: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if str(k) in ("path", "local_path", "paths", "config") and v:
                    found.extend((key, str(x)) for x in (v if isinstance(v, list) else [v]))
                else:
                    walk(v, key)

    walk(data, "")
    return found


def submit(args: list[str], address: str | None = None, env: dict[str, str] | None = None,
           pip: list[str] | None = None, working_dir: str | Path | None = REPO_ROOT,
           submission_id: str | None = None, entrypoint_num_gpus: float = 0,
           entrypoint_num_cpus: float = 0, entrypoint_memory: int = 0,
           entrypoint_resources: dict[str, float] | None = None,
           base_runtime_env: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Submit ``args`` (see :func:`entrypoint`) as a job; return (client, submission id)."""
    warn_relative_paths(args)
    jobs = client(address)
    job_id = jobs.submit_job(entrypoint=entrypoint(args), submission_id=submission_id,
                             runtime_env=runtime_env(working_dir, env, pip, base=base_runtime_env),
                             metadata={"segfactory_command": " ".join(args[:2])[:100]},
                             entrypoint_num_gpus=entrypoint_num_gpus or None,
                             entrypoint_num_cpus=entrypoint_num_cpus or None,
                             entrypoint_memory=entrypoint_memory or None,
                             entrypoint_resources=entrypoint_resources or None)
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
