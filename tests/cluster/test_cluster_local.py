"""A real local head: `cluster up`, `submit --wait` a tiny-preset job and a failing one, `jobs`,
then `cluster down` — and nothing of ours is left running while other Ray instances survive.

The tests in this module run in order against one head (starting one costs ~17 s here).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from cluster_testing import segfactory

from cluster import local

pytestmark = pytest.mark.slow
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`segfactory cluster up` with its state in a temp dir; `cluster down` at the end anyway."""
    state_dir = tmp_path_factory.mktemp("state")
    previous = os.environ.get(local.STATE_ENV)
    previous_token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ[local.STATE_ENV] = str(state_dir)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(state_dir / "auth_token")  # absent: `up` must create it
    try:
        code, out, err = segfactory("cluster", "up", "--num-cpus", "2", "--object-store-memory", "300M")
        assert code == 0, err
        yield {"state": local.read_state(), "up_output": out, "jobs": {}}
    finally:
        if local.read_state() is not None:
            local.down()
        if previous is None:
            os.environ.pop(local.STATE_ENV, None)
        else:
            os.environ[local.STATE_ENV] = previous
        if previous_token is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = previous_token


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_up_records_a_loopback_head(head):
    state = head["state"]
    assert state is not None and state.gcs_address in head["up_output"]
    assert state.gcs_address.startswith("127.0.0.1:") and state.dashboard_url.startswith("http://127.0.0.1:")
    procs = local.cluster_processes(state)
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names, names
    listening = {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening and {ip for ip, _ in listening} <= LOOPBACK, listening
    assert int(state.gcs_address.rsplit(":", 1)[1]) in {port for _, port in listening}
    code, out, _ = segfactory("cluster", "status")
    assert code == 0 and "running" in out and state.dashboard_url in out


def test_up_creates_a_token_and_the_head_refuses_requests_without_it(head, monkeypatch):
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.is_file() and len(token.read_text().strip()) >= 32 and token.stat().st_mode & 0o077 == 0
    assert "auth:       token: the job server refuses requests without it" in head["up_output"]
    assert local.probe_auth(head["state"].dashboard_url) == "token"  # asked, not assumed
    code, out, _ = segfactory("cluster", "status")
    assert code == 0 and "refuses requests without it" in out
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"Authorization": "Bearer wrong"}')  # headers win over ours
    code, _, err = segfactory("jobs", "list")
    assert code == 1 and err.count("\n") == 1, err


def test_submit_runs_any_entrypoint(head, tmp_path):
    code, out, err = segfactory("submit", "--wait", "--no-working-dir", "--entrypoint-num-cpus", "0.1",
                                "--runtime-env-json", '{"env_vars": {"GREETING": "hello from the job"}}',
                                "--", "python", "-c", "import os, sys; print(os.environ['GREETING']); sys.exit(3)")
    assert code == 3, err[-2000:]  # the entrypoint's own exit code comes back
    assert "hello from the job" in out + err


def test_submit_tiny_generate_succeeds(head, toy_source, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny") / "synthetic"
    code, out, err = segfactory(
        "submit", "--wait", "--", "generate", "--config", "pipelines/configs/seggen-tiny.yaml",
        f"source.path={toy_source}", f"output.path={out_dir}", "source.limit=8",
        "ray.show_progress=false")
    assert code == 0, err[-3000:]
    job_id = re.search(r"submitted job (\S+)", out).group(1)
    head["jobs"]["ok"] = job_id
    assert f"job {job_id} SUCCEEDED" in out
    assert "rows kept:" in out  # the job's own summary, streamed from its logs
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["config"]["preset"] == "tiny"
    assert manifest["rows"] + manifest["rejected_rows"] == 8 * 2  # K=1 ImgSyn + M=1 MaskSyn
    assert manifest["rows"] > 0
    shards = sorted((out_dir / "shards").glob("part-*.parquet"))
    assert shards and sum(pq.read_metadata(s).num_rows for s in shards) == manifest["rows"]


def test_failing_job_exits_nonzero_with_its_logs(head, toy_source, tmp_path):
    # a bad key is refused here, before anything is submitted (the config is checked locally)
    code, out, err = segfactory(
        "submit", "--wait", "--", "generate", "--config", "pipelines/configs/seggen-toy.yaml",
        f"source.path={toy_source}", f"output.path={tmp_path / 'out'}", "bogus.key=1")
    assert code == 2 and "submitted job" not in out and "bogus: unknown key" in err
    # a source that does not exist where the job runs fails in the job: its exit code comes back
    code, out, err = segfactory(
        "submit", "--wait", "--", "generate", "--config", "pipelines/configs/seggen-toy.yaml",
        f"source.path={tmp_path / 'no-such-source'}", f"output.path={tmp_path / 'out'}")
    assert code == 2  # the driver's own exit code: bad input
    job_id = re.search(r"submitted job (\S+)", out).group(1)
    head["jobs"]["bad"] = job_id
    assert f"job {job_id} FAILED (exit code 2)" in err
    assert "last" in err and "error: " in err.split("log lines ---", 1)[1]
    assert "no-such-source" in err.split("log lines ---", 1)[1]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_jobs_list_status_logs(head):
    ok, bad = head["jobs"].get("ok"), head["jobs"].get("bad")
    if not (ok and bad):
        pytest.skip("the submit tests did not run")
    code, out, _ = segfactory("jobs", "list")
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[ok] == "SUCCEEDED" and rows[bad] == "FAILED"
    code, out, _ = segfactory("jobs", "status", bad)
    assert code == 0 and "FAILED" in out and "exit code:  2" in out
    code, out, _ = segfactory("jobs", "logs", bad)
    assert code == 0 and "error: " in out and "no-such-source" in out
    code, _, err = segfactory("jobs", "status", "raysubmit_doesnotexist")
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_down_stops_exactly_its_own_processes(head, ray_local):
    state = head["state"]
    ours = {p.pid for p in local.cluster_processes(state)} | set(state.pids)
    assert ours
    code, out, _ = segfactory("cluster", "down")
    assert code == 0 and "stopped" in out
    assert [pid for pid in ours if _alive(pid)] == []
    assert local.cluster_processes(state) == []
    assert not local.state_file().exists() and not Path(state.temp_dir).exists()
    # The other Ray on this machine (the test session's own) is untouched.
    assert ray_local.get(ray_local.remote(lambda: 41 + 1).remote(), timeout=60) == 42
    code, _, _ = segfactory("cluster", "status")
    assert code == 1
