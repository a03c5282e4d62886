"""Shards written by Ray workers: writer actors own shards, a last task stage routes rows to them.

Ray Data has no "group by key as it streams" (``groupby`` is an all-to-all barrier that would
hold the whole run), and a shard's rows leave the graph in many blocks. So the graph ends in a
routing task (:func:`route_to_writers`) that splits each block by shard and hands each part to
the writer actor owning that shard (``shard % writers``). The actor stages the rows on the
output's storage at once (:mod:`pipelines.staging`), writes and commits a shard once every
source row is accounted for (:class:`ShardWriter`) and returns a small completion record. The
blocks travel worker → actor through the object store; the driver's stream carries only
completion records (a few dozen bytes per shard).

Fault tolerance is Ray's own: writer actors are restartable (``max_restarts=-1``) and their
calls retried (``max_task_retries=-1``); a writer whose process or node is lost is restarted by
Ray wherever there is room, picks up its staged rows, and the routing task's call is retried
(rows it already has are deduplicated by sample id). Writers start spread over the nodes with
*soft* affinity, so a lost node's writers move, and nothing is pinned to the nodes alive at start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core import schema as S
from pipelines.writer import ShardRanges, ShardWriter

log = logging.getLogger(__name__)

COMPLETION_SCHEMA = pa.schema([
    pa.field("shard", pa.int64()), pa.field("kept", pa.int64()), pa.field("rejected", pa.int64()),
    pa.field("filtered", pa.int64()), pa.field("truncated", pa.int64()),
    pa.field("writer", pa.int64()), pa.field("node", pa.string()),
])
ROUTE_NUM_CPUS = 0.25  # routing waits on the writer actors; a full CPU would idle a core per task


class ShardWriterActor:
    """Owns the shards with ``shard % count == index``: buffers and writes them (Ray actor)."""

    def __init__(self, out: str, config_hash: str, n_rows: int, rows_per_shard: int, index: int, count: int,
                 row_groups: tuple[int, int], faults: dict[str, Any] | None = None):
        import ray

        self.index = index
        self.node = ray.get_runtime_context().get_node_id()
        self.writer = ShardWriter(out, config_hash, ShardRanges(n_rows, rows_per_shard),
                                  owns=lambda shard: shard % count == index, row_group_rows=row_groups[0],
                                  row_group_bytes=row_groups[1], after_write=_writer_fault(out, faults or {}))

    def add(self, table: pa.Table) -> list[dict[str, Any]]:
        records = self.writer.add(table)
        return [{**r, "writer": self.index, "node": self.node} for r in records]

    def buffered_rows(self) -> int:
        return self.writer.buffered_rows()


def make_writers(out, config_hash: str, n_rows: int, rows_per_shard: int, output, faults=None) -> list:
    """Start ``output.writers`` restartable writer actors, spread over the nodes that run work.

    ``faults`` (a FaultConfig) are the test-only writer faults: with ``hang_after_shards`` there is
    one writer, so "after N shards" is a global count and nothing else writes once it froze.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    faults = faults.model_dump(include={"hang_after_shards", "hold_after_shards"}) if faults is not None else {}
    count = 1 if faults.get("hang_after_shards") is not None else output.writers
    target = out.path if out.is_local else out.uri  # a worker's cwd is not the driver's
    # Round-robin over the nodes alive now that run work (CPU > 0; a KubeRay head often has none),
    # soft: Ray's "SPREAD" left zero-CPU actors on one node under load in tests, and a strict
    # affinity would leave a restarted writer waiting for ever for its lost node.
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = sorted(n["NodeID"] for n in alive if n.get("Resources", {}).get("CPU", 0) > 0) or \
        sorted(n["NodeID"] for n in alive)
    cls = ray.remote(ShardWriterActor)
    return [cls.options(num_cpus=output.writer_num_cpus, max_restarts=-1, max_task_retries=-1,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True)).remote(
        target, config_hash, n_rows, rows_per_shard, i, count, (output.row_group_rows, output.row_group_bytes),
        faults) for i in range(count)]


def route_to_writers(batch: pa.Table, writers: list) -> pa.Table:
    """Send each shard's rows of ``batch`` to its writer; return the records of shards completed."""
    import ray

    owners = batch.column(S.SHARD).to_numpy() % len(writers)
    refs = [writers[int(w)].add.remote(batch.filter(pa.array(owners == w))) for w in np.unique(owners)]
    records = [r for rs in ray.get(refs) for r in rs]
    return pa.Table.from_pylist(records, schema=COMPLETION_SCHEMA)


def write_stage_kwargs(writers: list) -> dict[str, Any]:
    """map_batches arguments of the routing stage (asserted on in tests)."""
    return {"batch_size": None, "batch_format": "pyarrow", "num_cpus": ROUTE_NUM_CPUS,
            "fn_kwargs": {"writers": writers}}


def _writer_fault(out: str, faults: dict[str, Any]):
    """Test-only: once ``hang_after_shards`` shards are written the writer freezes for good;
    once ``hold_after_shards`` are, it waits until ``<output>/.faults/release`` exists (local
    outputs). Later shards stay in flight in the pools, so a SIGKILL or a node loss lands at a
    known point (racing a fast run does not)."""
    hang, hold = faults.get("hang_after_shards"), faults.get("hold_after_shards")
    if hang is None and hold is None:
        return None
    release = Path(out) / ".faults" / "release"

    def fault(written: int) -> None:
        if hang is not None and written >= hang:
            log.error("injected fault: the writer stops after %d shards (pid %d)", written, os.getpid())
            while True:
                time.sleep(3600)
        if hold is not None and written >= hold and not release.exists():
            log.warning("injected fault: the writer holds after %d shards until %s exists", written, release)
            while not release.exists():
                time.sleep(0.2)

    return fault
