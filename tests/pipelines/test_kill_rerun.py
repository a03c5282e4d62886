"""SIGKILL a running `segfactory generate`, rerun it: every sample exactly once, same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from core import schema as S

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pipelines" / "configs" / "seggen-toy.yaml"


def generate_cmd(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "segfactory.cli", "generate", "--config", str(CONFIG),
            f"source.path={source}", f"output.path={out}", "source.limit=40", "output.rows_per_shard=2",
            "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1", "ray.show_progress=false",
            "mask2img.resources.batch_size=2", "text2mask.resources.batch_size=2"]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))}


def committed(out: Path) -> list[Path]:
    return sorted((out / "_commits").glob("*.json"))


@pytest.mark.subprocess
def test_kill_then_rerun_gives_every_sample_once_with_identical_bytes(toy_source, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(generate_cmd(toy_source, reference), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    expected = shard_bytes(reference)
    assert len(expected) == 20

    out = tmp_path / "killed"
    # The driver freezes after 3 shards (the rest in flight in the pools); racing a fast run with
    # a poll let CI's kill land after the last shard.
    proc = subprocess.Popen([*generate_cmd(toy_source, out), "faults.hang_after_shards=3"], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(committed(out)) < 3:
        time.sleep(0.05)
    time.sleep(1.0)  # a writer that did not stop would add shards now
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait(timeout=60)
    done_before = len(committed(out))
    assert done_before == 3, "the kill must land after exactly 3 shards, the others in flight"

    subprocess.run(generate_cmd(toy_source, out), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert shard_bytes(out) == expected
    df = pd.read_parquet(out / "shards")
    assert df[S.SAMPLE_ID].is_unique and len(df) == 80
    assert set(df[S.SAMPLE_ID]) == set(pd.read_parquet(reference / "shards")[S.SAMPLE_ID])
    assert not [p for p in out.rglob("*.tmp")] and not list(out.rglob("*.arrow"))  # no staged rows left
    regenerated = (20 - done_before) / 20
    print(f"kill/rerun: {done_before}/20 shards survived; rerun regenerated {regenerated:.0%} of samples")
