"""Generation with every path on s3:// against a real S3 API (moto's server): source, output,
inspect, a resume after SIGKILL, and the one-line errors for bad URIs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from core import schema as S
from core import storage
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pipelines" / "configs" / "seggen-toy.yaml"
SMALL = ["source.limit=8", "output.rows_per_shard=2", "imgsyn.samples_per_source=1",
         "masksyn.samples_per_caption=1", "ray.show_progress=false", "output.progress_interval_s=1"]


def shard_bytes(uri: str) -> dict[str, bytes]:
    loc = storage.resolve(uri)
    return {f.name: storage.read_bytes(f) for f in storage.listdir(loc / "shards", ".parquet")}


@pytest.fixture(scope="module")
def s3_source(s3_server, toy_source):
    """The toy VOC source copied into a bucket: the graph's workers read pixels from S3."""
    s3, _ = pafs.FileSystem.from_uri("s3://toy-src?allow_bucket_creation=true")
    s3.create_dir("toy-src")
    pafs.copy_files(str(toy_source), "toy-src/voc", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    return "s3://toy-src/voc"


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_source, tmp_path_factory):
    bucket = "gen-out"
    s3, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
    s3.create_dir(bucket)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # any local file the run made would land here
    try:
        cfg = load_config(GenerateConfig, CONFIG, [f"source.path={s3_source}", f"output.path=s3://{bucket}/out", *SMALL])
        result = run_generate(cfg)
        leftovers = [str(p) for p in Path(".").rglob("*")]
    finally:
        os.chdir(cwd)
    return result, f"s3://{bucket}/out", leftovers


def test_generate_reads_and_writes_s3_with_the_bytes_of_a_local_run(s3_run, toy_source, tmp_path):
    result, out, leftovers = s3_run
    assert leftovers == []  # nothing written next to the driver: all of it went to the bucket
    m = result.manifest
    assert m["rows"] == 16 and m["rejected_rows"] == 0 and len(m["shards"]) == 4
    assert str(result.out) == out
    remote = shard_bytes(out)
    assert len(remote) == 4
    df = pd.concat(pd.read_parquet(f"{out}/shards/{name}") for name in sorted(remote))
    assert df[S.SAMPLE_ID].is_unique and len(df) == 16
    assert df[S.SOURCE_ID].str.startswith("toy_train_").all()
    # same config from a local copy of the source: the very same shard bytes
    local = run_generate(load_config(GenerateConfig, CONFIG, [f"source.path={toy_source}",
                                                              f"output.path={tmp_path / 'local'}", *SMALL]))
    assert local.manifest["config_hash"] == m["config_hash"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "local" / "shards").glob("*.parquet")} == remote


def test_inspect_reads_s3_and_writes_the_sheet_there(s3_run, capsys):
    from pipelines.report import inspect_dataset

    _, out, _ = s3_run
    info = inspect_dataset(out, n_samples=4)
    printed = capsys.readouterr().out
    assert f"dataset: {out}" in printed and "rows: 16  rejected: 0  shards: 4" in printed
    assert info["sheet"] == f"{out}/contact_sheet.png"
    assert storage.read_bytes(storage.resolve(info["sheet"]))[:8] == b"\x89PNG\r\n\x1a\n"
    assert abs(sum(info["class_frequencies"].values()) - 1) < 1e-9


@pytest.mark.slow
def test_kill_then_resume_with_output_on_s3(s3_run, s3_source, s3_bucket):
    """SIGKILL a CLI run writing to S3 after 2 of 4 shards; the rerun writes the other 2 and the
    shards equal an uninterrupted run's, byte for byte (objects are whole or absent: no temp)."""
    _, reference, _ = s3_run
    out = f"{s3_bucket}/out"
    cmd = [sys.executable, "-m", "segfactory.cli", "generate", "--config", str(CONFIG), f"source.path={s3_source}",
           f"output.path={out}", *SMALL, "faults.hang_after_shards=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": "local"})
    loc = storage.resolve(out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(storage.listdir(loc / "shards", ".parquet")) < 2:
        time.sleep(0.2)
    time.sleep(1.0)  # a writer that did not stop would add shards now
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(storage.listdir(loc / "shards", ".parquet")) == 2
    result = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": "local"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "progress: shards 4/4 (100%)" in result.stderr
    assert shard_bytes(out) == shard_bytes(reference)


@pytest.mark.parametrize("override, words", [
    ("output.path=", "output.path: required"),
    ("source.path=", "source.path: required"),
    ("output.path=ftp://host/out", "output.path=ftp://host/out: unknown URI scheme 'ftp'"),
    ("output.path=s3://no-such-bucket/out", "s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist"),
    ("source.path=s3://no-such-bucket/src", "s3://no-such-bucket/src: bucket 'no-such-bucket' does not exist"),
])
@pytest.mark.ray
def test_bad_paths_exit_2_with_one_line(s3_server, toy_source, tmp_path, capsys, override, words):
    from segfactory.cli import main

    base = [f"source.path={toy_source}", f"output.path={tmp_path / 'out'}"]
    code = main(["generate", "--config", str(CONFIG), *base, *SMALL, override])
    assert code == 2 and _one_error_line(capsys.readouterr().err, words)


def _one_error_line(err: str, words: str) -> bool:
    """One ``error:`` line naming the problem, no traceback (log lines may come with it)."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    return True


@pytest.mark.ray
def test_a_source_without_usable_rows_exits_2(tmp_path, capsys):
    from segfactory.cli import main

    (tmp_path / "src" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "src" / "SegmentationClass").mkdir()
    code = main(["generate", "--config", str(CONFIG), f"source.path={tmp_path / 'src'}",
                 f"output.path={tmp_path / 'out'}", *SMALL])
    assert code == 2 and _one_error_line(capsys.readouterr().err, "no usable rows")


@pytest.fixture(scope="module")
def locked_s3():
    """A second moto server that checks credentials (moto's ``INITIAL_NO_AUTH_ACTION_COUNT=0``):
    every request signed with an unknown key is refused with 403 AccessDenied, as a bucket the
    user has no rights on. Reached through pyarrow's ``endpoint_override`` URI option."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("key", ["output.path", "source.path"])
def test_an_unauthorized_bucket_exits_2_naming_the_uri(locked_s3, ray_local, toy_source, tmp_path, capsys, key):
    from segfactory.cli import main

    uri = f"s3://locked/data?{locked_s3}"
    paths = {"source.path": str(toy_source), "output.path": str(tmp_path / "out"), key: uri}
    code = main(["generate", "--config", str(CONFIG), *(f"{k}={v}" for k, v in paths.items()), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err, "s3://locked/data")
    assert "access_denied" in next(ln for ln in err.splitlines() if ln.startswith("error:")).lower().replace(" ", "_")
