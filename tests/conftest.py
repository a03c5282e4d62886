"""Shared fixtures: one Ray instance for the whole session (ray.init costs ~5 s here)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 test server's address and dummy credentials are set before any Ray instance starts, so
# Ray workers (which inherit the environment of the first ray.init) and CLI subprocesses see them.
# They only matter to s3:// paths; the server itself starts with the first test that asks for it.
S3_ENDPOINT = os.environ.setdefault("SEGFACTORY_TEST_S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
for _key, _value in {"AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value


RAY_FIXTURES = {"ray_local", "train_ray"}  # a test that asks for one of these starts Ray
FAST = os.environ.get("SEGFACTORY_FAST_TESTS") == "1"  # `make test-fast`: no Ray, no subprocess
# quick system look-ups libraries make on their own: not a process a test starts
SYSTEM_PROBES = {"ldconfig", "uname", "fc-list", "fc-match", "lscpu", "nvidia-smi", "which", "gcc", "cc", "g++"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _fast_suite_guard(request, monkeypatch):
    """Under ``make test-fast`` a test that starts Ray or a process without its marker fails,
    naming the marker, so the fast suite stays fast and the markers stay true."""
    if FAST:
        def refuse(marker: str):
            def _raise(*args, **kwargs):
                raise RuntimeError(f"{request.node.nodeid} starts {marker} but is not marked "
                                   f"@pytest.mark.{marker}: mark it (make test-fast leaves such tests out)")
            return _raise

        monkeypatch.setattr("ray.init", refuse("ray"))
        popen = subprocess.Popen.__init__

        def guarded(self, args, *rest, **kwargs):
            exe = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]))
            if exe in SYSTEM_PROBES:  # libraries asking the system (trio runs ldconfig on import)
                return popen(self, args, *rest, **kwargs)
            return refuse("subprocess")()

        monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray shared by every test that needs one; stalls become errors."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = 300
    ctx.enable_progress_bars = False
    yield ray
    # left running for other tests; pytest's process exit shuts it down


@pytest.fixture(scope="session")
def toy_source(tmp_path_factory):
    """A small toy VOC-layout source dataset (40 train, 20 val)."""
    from pipelines.toy_data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "src", n_train=40, n_val=20, size=64, seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible HTTP server on 127.0.0.1 (a real S3 API: pyarrow's S3 client talks to it)."""
    from moto.server import ThreadedMotoServer

    port = int(S3_ENDPOINT.rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket for one test: ``s3://<name>``."""
    import re

    from pyarrow import fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{_free_port()}"
    # from_uri reads AWS_ENDPOINT_URL (S3FileSystem() does not); bucket creation is opt-in
    s3, _ = fs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    s3.create_dir(name)
    return f"s3://{name}"
