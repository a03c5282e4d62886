"""DDP training across the nodes of a local cluster gives what it gives on one node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_on_two_nodes_match_two_workers_on_one():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run([sys.executable, str(HERE / "multinode_train_run.py")], cwd=HERE.parents[1], env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    packed, spread = report["STRICT_PACK"], report["STRICT_SPREAD"]
    assert packed["final_step"] == spread["final_step"] == 8
    assert len(packed["worker_nodes"]) == 2 and len(set(packed["worker_nodes"])) == 1  # both on one node
    assert sorted(spread["worker_nodes"]) == report["nodes"]  # one on each worker node
    assert spread["miou"] == pytest.approx(packed["miou"], abs=0.01)
