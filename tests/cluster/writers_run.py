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
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate

ROOT = Path(__file__).resolve().parents[2]


def _wait_until_schedulable(timeout_s: float = 120.0) -> None:
    """Wait until this driver's raylet can place work on every node. ``wait_for_nodes`` only asks
    the GCS; the raylet learns of a node's resources a moment later (seconds on a loaded CI
    machine), and until then a soft node affinity to it falls back to the local node: CI saw both
    writers start on the head. A zero-CPU probe pinned (softly) to each node reports where it ran."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())
    deadline = time.time() + timeout_s
    for node in [n["NodeID"] for n in ray.nodes() if n["Alive"]]:
        strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        while ray.get(where.options(scheduling_strategy=strategy).remote()) != node:
            if time.time() > deadline:
                raise TimeoutError(f"node {node} never became schedulable from the driver")
            time.sleep(0.5)


def main(source: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    import ray

    ray.init(address=cluster.address)  # generate joins this connection (init_ray keeps it)
    _wait_until_schedulable()
    cwd = tempfile.mkdtemp(prefix="writers-cwd-")
    os.chdir(cwd)
    try:
        cfg = load_config(GenerateConfig, ROOT / "pipelines" / "configs" / "seggen-toy.yaml", [
            f"source.path={source}", f"output.path={out}", f"ray.address={cluster.address}",
            "source.limit=16", "output.rows_per_shard=2", "output.writers=2", "imgsyn.samples_per_source=1",
            "masksyn.samples_per_caption=1", "ray.show_progress=false", "cpu.num_cpus=0.25",
            "text2mask.resources.num_cpus=0.25", "mask2img.resources.num_cpus=0.25"])
        result = run_generate(cfg)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        local = sorted(str(p) for p in Path(cwd).rglob("*"))
        print(json.dumps({"nodes": nodes, "local_files": local, "rows": result.manifest["rows"],
                          "shards": len(result.manifest["shards"]),
                          "per_node": result.manifest["timings"]["shards_per_writer_node"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
