"""Generate on a two-node Ray cluster with source and output in S3; print who wrote the shards.

Run by ``test_cluster_writers.py`` in its own process (it owns a ``ray.cluster_utils.Cluster``;
the S3 server and its address come from the test). Two nodes of 1 CPU each; two writer actors
spread over them. The driver runs in an empty directory: any local file it made would show.
Output: one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from ray.cluster_utils import Cluster

from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate

ROOT = Path(__file__).resolve().parents[2]


def main(source: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cwd = tempfile.mkdtemp(prefix="writers-cwd-")
    os.chdir(cwd)
    try:
        cfg = load_config(GenerateConfig, ROOT / "pipelines" / "configs" / "seggen-toy.yaml", [
            f"source.path={source}", f"output.path={out}", f"ray.address={cluster.address}",
            "source.limit=16", "output.rows_per_shard=2", "output.writers=2", "imgsyn.samples_per_source=1",
            "masksyn.samples_per_caption=1", "ray.show_progress=false", "cpu.num_cpus=0.25",
            "text2mask.resources.num_cpus=0.25", "mask2img.resources.num_cpus=0.25"])
        result = run_generate(cfg)
        import ray

        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        local = sorted(str(p) for p in Path(cwd).rglob("*"))
        print(json.dumps({"nodes": nodes, "local_files": local, "rows": result.manifest["rows"],
                          "shards": len(result.manifest["shards"]),
                          "per_node": result.manifest["timings"]["shards_per_writer_node"]}))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
