"""Job submission pieces without a cluster: runtime env, entrypoint, address and token rules,
exit codes and failure reports, the command line of `submit` / `cluster` / `jobs`."""

from __future__ import annotations

import argparse
import logging
import shlex
from types import SimpleNamespace

import pytest
from cluster_testing import cluster_commands_wired, segfactory

from cluster import cli, jobs, local


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """No recorded local head and no address in the environment."""
    monkeypatch.setenv(local.STATE_ENV, str(tmp_path / "state"))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _record(url: str, auth: str = "token") -> None:
    local._write_state(local.ClusterState(gcs_address="127.0.0.1:1", dashboard_url=url,
                                          temp_dir="/nonexistent", session_dir="", sid=-1,
                                          auth_mode=auth))


def test_cli_registers_cluster_commands():
    assert cluster_commands_wired(), ("segfactory/cli.py does not call cluster.cli.add_cluster_commands(sub) "
                                      "in build_parser()")


def test_runtime_env_ships_the_repo_without_venv_outputs_or_weights(monkeypatch):
    monkeypatch.setenv("HF_HOME", "/shared/hf")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    env = jobs.runtime_env(env={"EXTRA": "1"}, pip=["einops==0.8.0"])
    assert env["working_dir"] == str(jobs.REPO_ROOT) and (jobs.REPO_ROOT / "segfactory" / "cli.py").is_file()
    for pattern in (".venv/", ".git/", "demo-output/", "runs/", "models/", "*.parquet", "*.safetensors"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"HF_HOME": "/shared/hf", "EXTRA": "1"}
    assert env["pip"] == ["einops==0.8.0"]
    assert "pip" not in jobs.runtime_env() and "env_vars" not in jobs.runtime_env(passthrough=False)


def test_entrypoint_quotes_arguments():
    args = ["generate", "--config", "pipelines/configs/seggen-toy.yaml", "source.path=/a b/c", "x=[1, 2]"]
    cmd = jobs.entrypoint(args)
    assert cmd.startswith("python -m segfactory.cli generate ")
    assert shlex.split(cmd)[3:] == args


def test_parse_env(monkeypatch):
    monkeypatch.setenv("FROM_SHELL", "v")
    monkeypatch.delenv("MISSING", raising=False)
    assert jobs.parse_env(["A=1", "FROM_SHELL", "B="]) == {"A": "1", "FROM_SHELL": "v", "B": ""}
    with pytest.raises(ValueError, match="MISSING"):
        jobs.parse_env(["MISSING"])


def test_address_precedence(no_cluster, monkeypatch):
    with pytest.raises(local.ClusterError, match="cluster up"):
        jobs.resolve_address(None)
    _record("http://127.0.0.1:9999")
    assert jobs.resolve_address(None) == "http://127.0.0.1:9999"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a job server
    assert jobs.resolve_address(None) == "http://127.0.0.1:9999"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.2:8265"
    assert jobs.resolve_address("head:8265") == "http://head:8265"


def test_token_is_sent_only_to_our_own_head(no_cluster, monkeypatch):
    token = no_cluster / "token"
    token.write_text("s3cret\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert jobs._auth_headers("http://127.0.0.1:9999") == {}
    _record("http://127.0.0.1:9999")
    assert jobs._auth_headers("http://127.0.0.1:9999") == {"Authorization": "Bearer s3cret"}
    assert jobs._auth_headers("http://elsewhere:8265") == {}
    _record("http://127.0.0.1:9999", auth="disabled")
    assert jobs._auth_headers("http://127.0.0.1:9999") == {}


def test_relative_output_paths_warn(caplog):
    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        jobs.warn_relative_paths(["source.path=/abs", "output.path=out", "seed=1", "--config", "x.yaml"])
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["output.path=out"]


class FakeJobs:
    """The few JobSubmissionClient calls exit_code/failure_report make."""

    def __init__(self, status: str, code: int | None, logs: str, message: str = ""):
        self.info = SimpleNamespace(status=SimpleNamespace(value=status), driver_exit_code=code, message=message)
        self.logs = logs

    def get_job_info(self, job_id):
        return self.info

    def get_job_logs(self, job_id):
        return self.logs


def test_exit_codes_follow_the_job():
    assert jobs.exit_code(FakeJobs("SUCCEEDED", 0, ""), "j") == 0
    assert jobs.exit_code(FakeJobs("FAILED", 3, ""), "j") == 3
    assert jobs.exit_code(FakeJobs("FAILED", None, ""), "j") == 1  # e.g. runtime env setup failed
    assert jobs.exit_code(FakeJobs("STOPPED", -15, ""), "j") == 1


def test_failure_report_has_the_last_log_lines():
    logs = "\n".join(f"line {i}" for i in range(100)) + "\n"
    report = jobs.failure_report(FakeJobs("FAILED", 1, logs, "Job entrypoint command failed\nmore"), "j", lines=5)
    lines = report.splitlines()
    assert lines[0] == "job j FAILED (exit code 1): Job entrypoint command failed"
    assert lines[2:] == [f"line {i}" for i in range(95, 100)]


def test_command_lines(no_cluster):
    parser = argparse.ArgumentParser()
    cli.add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", "--wait", "--env", "A=1", "--", "generate", "--config", "c.yaml", "k=v"])
    assert args.wait and args.env == ["A=1"] and args.command == ["--", "generate", "--config", "c.yaml", "k=v"]
    args = parser.parse_args(["cluster", "up", "--num-cpus", "2", "--object-store-memory", "300M"])
    assert (args.num_cpus, args.object_store_memory) == (2, 300 * 1024**2)
    assert parser.parse_args(["jobs", "logs", "ID", "-f"]).follow
    assert cli.parse_size("2GiB") == 2 * 1024**3 and cli.parse_size("1000") == 1000


def test_usage_errors_exit_2(no_cluster):
    assert segfactory("submit")[0] == 2  # nothing to run
    assert segfactory("submit", "--env", "SURELY_NOT_SET_ANYWHERE", "--", "generate")[0] == 2
    assert segfactory("cluster")[0] == 2
    assert segfactory("cluster", "up", "--object-store-memory", "lots")[0] == 2
    code, _, err = segfactory("jobs", "list")  # no cluster anywhere: one line, exit 1
    assert code == 1 and err.strip().count("\n") == 0 and "cluster up" in err
    code, out, _ = segfactory("cluster", "down")
    assert code == 0 and "no local cluster" in out
    assert segfactory("cluster", "status")[0] == 1


class FlakyStream:
    """A job whose websocket log stream breaks after the first chunk."""

    def __init__(self):
        self.polls = 0

    async def tail_job_logs(self, job_id):
        yield "line 1\n"
        raise RuntimeError("connection closed unexpectedly")

    def get_job_status(self, job_id):
        self.polls += 1
        done = self.polls > 1
        return SimpleNamespace(value="SUCCEEDED" if done else "RUNNING", is_terminal=lambda: done)

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n" + ("line 3\n" if self.polls > 1 else "")


def test_follow_resumes_by_polling_without_repeating_lines():
    import io

    out = io.StringIO()
    assert jobs.follow(FlakyStream(), "j", out=out, poll_s=0.01) == "SUCCEEDED"
    assert out.getvalue() == "line 1\nline 2\nline 3\n"


# --- submit: a superset of `ray job submit` ------------------------------------------------


def test_entrypoint_runs_any_command_and_our_cli_from_the_working_dir():
    assert jobs.entrypoint(["python", "-c", "print(1)"]) == "python -c 'print(1)'"
    assert jobs.entrypoint(["segfactory", "generate", "--config", "seggen-toy"]) == \
        "python -m segfactory.cli generate --config seggen-toy"
    assert jobs.entrypoint(["generate", "k=a b"]) == "python -m segfactory.cli generate 'k=a b'"
    assert jobs.entrypoint(["bash", "-lc", "nvidia-smi && segfactory demo"]) == \
        "bash -lc 'nvidia-smi && segfactory demo'"


def test_short_form_knows_every_cli_command():
    from cluster_testing import full_parser, subparsers

    assert set(subparsers(full_parser()).choices) <= jobs.SEGFACTORY_COMMANDS


def test_runtime_env_merges_the_users_with_ours(monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    base = {"env_vars": {"A": "1", "B": "x"}, "pip": ["rich"], "excludes": ["data/"], "conda": "env"}
    env = jobs.runtime_env("/w", {"B": "2"}, ["tqdm"], base=base)
    assert env["env_vars"] == {"A": "1", "B": "2"} and env["pip"] == ["rich", "tqdm"]
    assert env["working_dir"] == "/w" and env["conda"] == "env"
    assert env["excludes"][0] == "data/" and ".venv/" in env["excludes"]
    assert "working_dir" not in jobs.runtime_env(None, passthrough=False)  # --no-working-dir
    kept = jobs.runtime_env(None, base={"working_dir": "s3://b/code.zip"}, passthrough=False)
    assert kept["working_dir"] == "s3://b/code.zip"


def test_runtime_env_files_and_headers(tmp_path, monkeypatch):
    f = tmp_path / "env.yaml"
    f.write_text("env_vars: {A: '1'}\npip: [rich]\n")
    assert jobs.load_runtime_env(str(f)) == {"env_vars": {"A": "1"}, "pip": ["rich"]}
    assert jobs.load_runtime_env(text='{"pip": ["x"]}') == {"pip": ["x"]}
    for bad in ({"path": str(tmp_path / "none.yaml")}, {"text": "{"}, {"text": "[1]"}):
        with pytest.raises(ValueError):
            jobs.load_runtime_env(**bad)
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"Authorization": "Bearer t", "X-N": 3}')
    assert jobs.env_headers() == {"Authorization": "Bearer t", "X-N": "3"}
    monkeypatch.setenv("RAY_JOB_HEADERS", "not json")
    with pytest.raises(ValueError, match="RAY_JOB_HEADERS"):
        jobs.env_headers()


def test_wheel_install_refuses_to_upload_the_cwd(monkeypatch, no_cluster):
    monkeypatch.setattr(jobs, "REPO_ROOT", None)
    with pytest.raises(ValueError, match="--working-dir"):
        jobs.default_working_dir()
    code, _, err = segfactory("submit", "--", "python", "-c", "print(1)")
    assert code == 2 and "--no-working-dir" in err and err.count("\n") == 1


def test_relative_paths_in_the_yaml_and_in_lists_warn(tmp_path, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("real: {path: /abs/voc}\nsynthetic: {paths: [/abs/a, rel/b]}\n"
                   "mask2img: {model: {local_path: models/cn}}\n")
    with caplog.at_level(logging.WARNING, logger=jobs.__name__):
        jobs.warn_relative_paths(["train", "--config", str(cfg), "synthetic.paths=[/x, out2]",
                                  "output.path=s3://b/run"])
    warned = sorted(r.getMessage().split(" ")[0] for r in caplog.records)
    assert warned == ["mask2img.model.local_path=models/cn", "synthetic.paths=out2", "synthetic.paths=rel/b"]


class RecordingClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return "raysubmit_1"


def test_submit_passes_what_ray_job_submit_would(monkeypatch, no_cluster):
    fake = RecordingClient()
    monkeypatch.setattr(jobs, "client", lambda address=None: fake)
    code, out, err = segfactory("submit", "--entrypoint-num-gpus", "1", "--entrypoint-num-cpus", "2",
                                "--entrypoint-memory", "1G", "--entrypoint-resources", '{"head": 1}',
                                "--runtime-env-json", '{"env_vars": {"A": "1"}}', "--no-working-dir",
                                "--", "python", "train.py", "--lr", "0.1")
    assert code == 0 and "raysubmit_1" in out, err
    call = fake.calls[0]
    assert call["entrypoint"] == "python train.py --lr 0.1"
    assert (call["entrypoint_num_gpus"], call["entrypoint_num_cpus"], call["entrypoint_memory"]) == (1, 2, 1024**3)
    assert call["entrypoint_resources"] == {"head": 1}
    assert call["runtime_env"]["env_vars"]["A"] == "1" and "working_dir" not in call["runtime_env"]
    assert segfactory("submit", "--working-dir", str(no_cluster / "nope"), "--", "ls")[0] == 2
