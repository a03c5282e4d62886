"""A worker node lost mid-run (not gracefully) and a fresh one added: the run goes on, exit 0,
and the output equals a clean run's, every sample once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core import schema as S

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.subprocess
def test_losing_a_worker_node_mid_run_changes_nothing_in_the_output(toy_source, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run([sys.executable, str(HERE / "nodeloss_run.py"), str(toy_source), str(tmp_path)],
                          cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference_exit"] == 0 and report["exit"] == 0, report
    assert 1 <= report["committed_at_kill"] and report["committed_when_removed"] < 16, report  # mid-run
    assert report["processes_killed"] >= 1, report  # at least the victim's writer
    assert sum(report["restarts"].values()) >= 1, report  # the lost node's actors were restarted
    assert len(list((tmp_path / "lost" / "_commits").glob("*.json"))) == 16
    ref, lost = pd.read_parquet(tmp_path / "reference" / "shards"), pd.read_parquet(tmp_path / "lost" / "shards")
    assert lost[S.SAMPLE_ID].is_unique and len(lost) == len(ref) == 32
    cols = [S.SAMPLE_ID, S.IMAGE, S.MASK, S.SEED]
    pd.testing.assert_frame_equal(lost[cols].sort_values(S.SAMPLE_ID).reset_index(drop=True),
                                  ref[cols].sort_values(S.SAMPLE_ID).reset_index(drop=True))
    for f in sorted((tmp_path / "reference" / "shards").glob("*.parquet")):  # byte-identical shards
        assert (tmp_path / "lost" / "shards" / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list((tmp_path / "lost").rglob("*.arrow"))
