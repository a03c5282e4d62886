"""benchmarks/soak_generate.py with 3 kills: nothing lost, nothing twice, shards as a clean run's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak_generate.py"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.subprocess
def test_soak_with_three_kills_loses_and_duplicates_nothing(s3_server):
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("soak_generate", BENCH)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.main(["--kills", "3", "--rows", "12", "--seed", "1", "--endpoint", s3_server])
    assert sum(result["kills"].values()) == 3
    assert result["final_exit"] == 0 and result["runs_failed_without_driver_kill"] == 0, result
    assert result["outputs"] >= 1 and result["rows"] == result["rows_expected"] == 24 * result["outputs"]
    assert result["lost_rows"] == result["duplicated_rows"] == result["unexpected_rows"] == 0
    assert result["shards_identical"] == result["shards"] == 6 * result["outputs"] and result["extra_shard_files"] == []
