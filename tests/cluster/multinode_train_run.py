"""Train on a local two-node Ray cluster: two DDP workers packed on one node, then one per node.

Run by ``test_cluster_train.py`` in a process of its own (it owns a ``ray.cluster_utils.Cluster``
and must not meet the session-wide ``ray_local`` of the other tests). Nodes: a zero-CPU head
(the driver) and two 1-CPU worker nodes. Each worker takes half a CPU, so STRICT_PACK puts both
on one node (Ray Data's tasks use the other) and STRICT_SPREAD one on each. Same seed, same
data: the two runs must agree. Output: one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _worker_nodes(before: set[str]) -> tuple[set[str], list[str]]:
    """(every Train worker actor id so far, the nodes of those not in ``before``)."""
    from core.compat import ray_api

    table = ray_api("actor_table")()
    ids = {a for a, v in table.items() if "RayTrainWorker" in v.get("ActorClassName", "")}
    return ids, sorted(table[a]["Address"]["NodeID"] for a in ids - before)


def main() -> None:
    import ray

    from core.config import load_config
    from pipelines.toy_data import make_toy_dataset
    from tests.training.conftest import write_synthetic
    from training.config import TrainConfig
    from training.recipe import run_train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    out: dict = {"nodes": sorted(n.node_id for n in nodes)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = make_toy_dataset(tmp / "real", n_train=24, n_val=12, size=64, seed=1)
        syn = write_synthetic(tmp / "syn", n=48)
        seen: set[str] = set()
        for placement in ("STRICT_PACK", "STRICT_SPREAD"):
            cfg = load_config(TrainConfig, ROOT / "training" / "configs" / "toy.yaml", [
                f"real.path={real}", "real.format=voc", f"output.path={tmp / placement}", "strategy=mix", "p_aug=0.5",
                f"synthetic.paths=[{syn}]", "iterations=8", "batch_size=4", "eval_interval=8", "log_interval=4",
                "eval_batch_size=12", "aug.crop_size=48", "eval.short_side=64", "data.transform_batch_size=8",
                "workers.num_workers=2", f"workers.placement_strategy={placement}", "ray.show_progress=false",
                "ray.no_progress_timeout_s=240"])
            final = run_train(cfg)
            seen, where = _worker_nodes(seen)
            out[placement] = {"miou": final["miou"], "final_step": final["final_step"], "worker_nodes": where}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
