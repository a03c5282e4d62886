"""Shards are written by writer actors on more than one node, straight to S3 (moto's server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from core import storage

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_nodes_write_shards_to_s3_and_nothing_locally(s3_server, s3_bucket, toy_source):
    s3, _ = pafs.FileSystem.from_uri(s3_bucket)
    pafs.copy_files(str(toy_source), f"{s3_bucket[5:]}/src", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    proc = subprocess.run([sys.executable, str(HERE / "writers_run.py"), f"{s3_bucket}/src", f"{s3_bucket}/out"],
                          cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"] == 32 and report["shards"] == 8
    assert len(report["nodes"]) == 2
    per_node = report["per_node"]
    assert set(per_node) == set(report["nodes"]), "both nodes' writers wrote shards"
    assert sum(per_node.values()) == 8
    assert report["local_files"] == []
    shards = storage.listdir(storage.resolve(f"{s3_bucket}/out/shards"), ".parquet")
    assert len(shards) == 8
