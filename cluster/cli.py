"""The ``cluster``, ``submit`` and ``jobs`` commands, registered on the main ``segfactory`` parser.

``segfactory/cli.py`` calls :func:`add_cluster_commands` with its subparsers object. Nothing
heavy is imported here (Ray's SDK loads inside the commands), so ``--help`` stays fast and
torch-free. Errors of these commands are one line on stderr: exit 2 for a bad command line,
1 when the cluster or a job cannot be reached; ``submit --wait`` exits with the job's code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from cluster import jobs, local

log = logging.getLogger(__name__)
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``300M``, ``2G``, ``2GiB`` or plain bytes → bytes (argparse type)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1] if raw and raw[-1] in _UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 300M, 2G)") from None
    return int(value * _UNITS[unit])


def _fail(exc: BaseException) -> int:
    """One line on stderr (the full traceback at debug level), exit 1."""
    log.debug("cluster command failed", exc_info=exc)
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    return EXIT_ERROR


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        resources = json.loads(args.resources) if args.resources else None
    except ValueError as exc:
        print(f"error: --resources: not JSON ({exc})", file=sys.stderr)
        return EXIT_USAGE
    try:
        state = local.up(num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         object_store_memory=args.object_store_memory, resources=resources,
                         timeout_s=args.timeout)
    except local.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print_state(state)
    _print_auth(state)
    print(f"\nsubmit jobs:  segfactory submit --wait -- segfactory generate --config seggen-toy ...\n"
          f"or with Ray:  RAY_AUTH_MODE=token ray job submit --address {state.dashboard_url} "
          f"--working-dir . -- python -m segfactory.cli generate --config ...\n"
          f"join it:      export RAY_ADDRESS={state.gcs_address} {local.JOIN_ENV} RAY_AUTH_MODE=token\n"
          f"stop it:      segfactory cluster down")
    return EXIT_OK


def _print_auth(state: local.ClusterState) -> bool:
    """What the job server does with a request without the token (asked, not assumed), and how
    to use the token; False when it answers without one."""
    probed = local.probe_auth(state.dashboard_url)
    token = "RAY_AUTH_TOKEN (environment)" if os.environ.get("RAY_AUTH_TOKEN") else str(local.token_path())
    if probed == "token":
        print(f"auth:       token: the job server refuses requests without it (checked); token in {token}")
        print("            Ray's tools send it with RAY_AUTH_MODE=token set; the dashboard asks for it once "
              "(paste `RAY_AUTH_MODE=token ray get-auth-token`)")
        return True
    if probed == "none":
        print(f"auth:       NONE: the job server answered a request without a token (recorded: {state.auth_mode}); "
              "restart it: segfactory cluster down && segfactory cluster up")
        return False
    print("auth:       unknown (the job server did not answer)")
    return True


def _print_state(state: local.ClusterState, n_procs: int | None = None) -> None:
    print(f"address:    {state.gcs_address}")
    print(f"dashboard:  {state.dashboard_url}  (job server)")
    print(f"temp dir:   {state.temp_dir}")
    print(f"state file: {local.state_file()}")
    cpus = "auto" if state.num_cpus is None else state.num_cpus
    gpus = "auto" if state.num_gpus is None else state.num_gpus
    print(f"resources:  CPU={cpus} GPU={gpus} object_store_memory={state.object_store_memory or 'auto'}")
    print(f"processes:  {len(state.pids) if n_procs is None else n_procs} (session {state.sid})")


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        state, stopped = local.down(grace_s=args.grace)
    except local.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if state is None:
        print(f"no local cluster recorded in {local.state_file()}")
        return EXIT_OK
    print(f"stopped the local Ray head at {state.gcs_address} ({len(stopped)} processes)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        state, procs, answers = local.status()
    except local.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if state is None:
        print(f"no local cluster (nothing recorded in {local.state_file()})")
        return EXIT_ERROR
    if not procs:
        print(f"local cluster at {state.gcs_address} is not running (stale state; "
              "`segfactory cluster down` clears it)")
        return EXIT_ERROR
    print("running" + ("" if answers else " (the job server does not answer yet)"))
    _print_state(state, len(procs))
    secured = _print_auth(state)
    return EXIT_OK if answers and secured else EXIT_ERROR


def _cmd_submit(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: submit: no command to run (e.g. submit -- segfactory generate --config seggen-toy ..., "
              "or -- python train.py)", file=sys.stderr)
        return EXIT_USAGE
    try:
        env = jobs.parse_env(args.env)
        base = jobs.load_runtime_env(args.runtime_env, args.runtime_env_json)
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
        if args.no_working_dir:
            working_dir = None
        elif args.working_dir:
            working_dir = args.working_dir
        elif "working_dir" in base:
            working_dir = None  # the runtime env's own
        else:
            working_dir = jobs.default_working_dir()
        jobs.env_headers()  # a malformed RAY_JOB_HEADERS is the user's to fix: exit 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if working_dir is not None and not Path(working_dir).is_dir():
        print(f"error: --working-dir {working_dir}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        client, job_id = jobs.submit(command, address=args.address, env=env, pip=args.pip or None,
                                     working_dir=working_dir, submission_id=args.submission_id,
                                     entrypoint_num_cpus=args.entrypoint_num_cpus,
                                     entrypoint_num_gpus=args.entrypoint_num_gpus,
                                     entrypoint_memory=args.entrypoint_memory,
                                     entrypoint_resources=resources, base_runtime_env=base)
    except Exception as exc:  # noqa: BLE001 - unreachable cluster, auth, bad runtime env
        return _fail(exc)
    print(f"submitted job {job_id}", flush=True)
    if not args.wait:
        print(f"follow it:  segfactory jobs logs {job_id} --follow")
        return EXIT_OK
    return _wait_and_report(client, job_id)


def _wait_and_report(client, job_id: str) -> int:
    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (segfactory jobs stop {job_id})", file=sys.stderr)
        return 130
    code = jobs.exit_code(client, job_id)
    if code == EXIT_OK:
        print(f"job {job_id} {status}")
    else:
        print(jobs.failure_report(client, job_id), file=sys.stderr)
    return code


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    try:
        rows = jobs.list_jobs(jobs.client(args.address))
    except Exception as exc:  # noqa: BLE001
        return _fail(exc)
    print(f"{'ID':<30} {'STATUS':<10} {'STARTED':<19} {'EXIT':>4}  ENTRYPOINT")
    for r in rows:
        started = datetime.fromtimestamp(r["start_time"] / 1000).strftime("%Y-%m-%d %H:%M:%S") if r["start_time"] else "-"
        code = "" if r["exit_code"] is None else r["exit_code"]
        print(f"{r['id']:<30} {r['status']:<10} {started:<19} {code!s:>4}  {r['entrypoint'][:80]}")
    return EXIT_OK


def _cmd_jobs_status(args: argparse.Namespace) -> int:
    try:
        info = jobs.client(args.address).get_job_info(args.job_id)
    except Exception as exc:  # noqa: BLE001
        return _fail(exc)
    print(f"{args.job_id}: {info.status.value}")
    if info.message:
        print(f"message:    {info.message.strip().splitlines()[0]}")
    if getattr(info, "driver_exit_code", None) is not None:
        print(f"exit code:  {info.driver_exit_code}")
    print(f"entrypoint: {info.entrypoint}")
    return EXIT_OK


def _cmd_jobs_logs(args: argparse.Namespace) -> int:
    try:
        client = jobs.client(args.address)
        if args.follow:
            jobs.follow(client, args.job_id)
        else:
            sys.stdout.write(client.get_job_logs(args.job_id))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001
        return _fail(exc)
    return EXIT_OK


def _cmd_jobs_stop(args: argparse.Namespace) -> int:
    try:
        client = jobs.client(args.address)
        if not client.stop_job(args.job_id):
            print(f"job {args.job_id} had already ended ({client.get_job_status(args.job_id).value})")
            return EXIT_OK
        deadline = time.monotonic() + args.timeout
        status = client.get_job_status(args.job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
            status = client.get_job_status(args.job_id)
    except Exception as exc:  # noqa: BLE001
        return _fail(exc)
    print(f"job {args.job_id}: {status.value}")
    return EXIT_OK


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``cluster up|down|status``, ``submit`` and ``jobs ...`` on ``sub``."""
    p = sub.add_parser("cluster", help="a local Ray head for development: up | down | status")
    csub = p.add_subparsers(dest="cluster_command", required=True, parser_class=type(p))
    q = csub.add_parser("up", help="start a Ray head on 127.0.0.1 (free ports) and record it")
    q.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: all)")
    q.add_argument("--num-gpus", type=int, default=None, help="logical GPUs (default: detected)")
    q.add_argument("--object-store-memory", type=parse_size, default=None,
                   help="object store size, e.g. 500M or 4G (default: Ray's, 30%% of RAM)")
    q.add_argument("--resources", default=None, help='custom resources as JSON, e.g. \'{"big_disk": 1}\'')
    q.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for `ray start`")
    q.set_defaults(func=_cmd_up)
    q = csub.add_parser("down", help="stop exactly the processes `cluster up` started")
    q.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    q.set_defaults(func=_cmd_down)
    q = csub.add_parser("status", help="is the recorded local head running? (exit 1 if not)")
    q.set_defaults(func=_cmd_status)

    p = sub.add_parser("submit", help="run any command as a Ray job (a superset of `ray job submit`): "
                                      "submit [--wait] -- segfactory generate ... | -- python x.py",
                       description="What `ray job submit` takes (runtime env, working dir, entrypoint resources, headers), and: `-- segfactory CMD` / `-- CMD` run "
                                   "this project's CLI from the uploaded working_dir. Token: Ray's "
                                   "RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or ~/.ray/auth_token (sent automatically "
                                   "to `cluster up`'s head); extra headers: RAY_JOB_HEADERS='{\"K\": \"V\"}'. "
                                   "Exit code with --wait: the job's (2 bad input, 3 over-rejected: do not retry).")
    p.add_argument("--address", default=None,
                   help="job server URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, an http "
                        "RAY_ADDRESS, else the head of `segfactory cluster up`)")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's outcome")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job (bare KEY passes this shell's value)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement installed in the job's environment (repeatable)")
    p.add_argument("--runtime-env", default=None, metavar="YAML", help="runtime env file, as for ray job submit")
    p.add_argument("--runtime-env-json", default=None, metavar="JSON", help="runtime env as JSON")
    wd = p.add_mutually_exclusive_group()
    wd.add_argument("--working-dir", default=None,
                    help="directory uploaded as the job's working_dir (default: this project's root when "
                         "installed editable; a wheel install must name one or pass --no-working-dir)")
    wd.add_argument("--no-working-dir", action="store_true",
                    help="upload nothing: run the segfactory installed on the cluster (e.g. in its image)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the driver")
    p.add_argument("--entrypoint-memory", type=parse_size, default=0, help="memory reserved for the driver, e.g. 4G")
    p.add_argument("--entrypoint-resources", default=None, metavar="JSON",
                   help='custom resources for the driver, e.g. \'{"head": 1}\'')
    p.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the command: segfactory generate ..., generate ..., python train.py ...")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("jobs", help="jobs on a cluster: list | status ID | logs ID [--follow] | stop ID")
    jsub = p.add_subparsers(dest="jobs_command", required=True, parser_class=type(p))
    for name, func, helptext in (("list", _cmd_jobs_list, "jobs, newest first"),
                                 ("status", _cmd_jobs_status, "status, message and exit code of a job"),
                                 ("logs", _cmd_jobs_logs, "a job's logs"),
                                 ("stop", _cmd_jobs_stop, "stop a running job")):
        q = jsub.add_parser(name, help=helptext)
        q.add_argument("--address", default=None, help="job server URL (default: as for submit)")
        if name != "list":
            q.add_argument("job_id", metavar="ID")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        if name == "stop":
            q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to stop")
        q.set_defaults(func=func)
