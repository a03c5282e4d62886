"""Generate on a local multi-node cluster, lose a worker node mid-run, add a fresh one.

Run by ``test_cluster_nodeloss.py`` in its own process (it owns a ``ray.cluster_utils.Cluster``):
a zero-CPU head and two 2-CPU worker nodes. A clean run first (the reference), then the same
config into another output, its writers holding after their first shard
(``faults.hold_after_shards``: without it a loaded machine's run could end before the loss
landed); once a shard is committed, one worker node (hosting a writer and pool actors) is lost —
its raylet and every worker process under it SIGKILLed at once, as a preempted machine loses
them — a fresh node added, and the writers released. Each generate is
a `segfactory generate` process joining the cluster (the Cluster needs this main thread).
Output: a JSON report in ``TMP/report.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[2]


def _generate(source: str, out: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([
        sys.executable, "-m", "segfactory.cli", "generate", "--config", str(ROOT / "pipelines/configs/seggen-toy.yaml"),
        f"source.path={source}", f"output.path={out}", f"ray.address={address}", "source.limit=16",
        "output.rows_per_shard=1", "output.writers=2", "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1",
        "ray.show_progress=false", "cpu.num_cpus=0.5", "text2mask.resources.num_cpus=0.5",
        "mask2img.resources.num_cpus=0.5", "mask2img.resources.batch_size=2", "faults.batch_delay_s=1.0",
        "ray.no_progress_timeout_s=240", *extra], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _commits(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json")))


def _writer_nodes() -> list[str]:
    """Nodes of the live writer actors (the driver of this script is connected to the cluster)."""
    from core.compat import ray_api

    return sorted(a["Address"]["NodeID"] for a in ray_api("actor_table")().values()
                  if a["ActorClassName"] == "ShardWriterActor" and a["State"] == "ALIVE")


def _lose_node(cluster: Cluster, node) -> int:
    """Kill the node as a preemption does, raylet and workers at once: ``Cluster.remove_node``
    alone SIGKILLs the raylet but leaves its worker processes orphaned, and under load they went
    on serving actor calls (direct worker-to-worker gRPC) long enough to finish the run with no
    restart; CI saw exactly that. Returns how many worker processes were killed."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    for proc in [raylet, *workers]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)  # the node's other processes, and the bookkeeping
    return len(workers)


def main(source: str, tmp: str) -> None:
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    report: dict = {}
    try:
        ref = _generate(source, Path(tmp) / "reference", cluster.address)
        report["reference_exit"] = ref.wait(timeout=400)
        out = Path(tmp) / "lost"
        proc = _generate(source, out, cluster.address, "faults.hold_after_shards=1")
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not _commits(out):
            time.sleep(0.05)
        report["committed_at_kill"] = _commits(out)
        report["writer_nodes"] = _writer_nodes()
        victim = next(w for w in workers if w.node_id in report["writer_nodes"])  # a node with a writer
        report["processes_killed"] = _lose_node(cluster, victim)
        report["committed_when_removed"] = _commits(out)
        cluster.add_node(num_cpus=2)
        report["committed_when_added"] = _commits(out)
        (out / ".faults").mkdir(exist_ok=True)
        (out / ".faults" / "release").touch()
        _, err = proc.communicate(timeout=400)
        report["exit"] = proc.returncode
        report["stderr_tail"] = err[-3000:]
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        report["restarts"] = manifest.get("restarts")
        report["writer_nodes_after"] = _writer_nodes()
        report["victim"] = victim.node_id
    finally:
        ray.shutdown()
        (Path(tmp) / "report.json").write_text(json.dumps(report))
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
