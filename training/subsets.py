"""Nested subsets of a synthetic dataset for scaling experiments.

Samples are ordered by a stable hash of their ``sample_id``; the subset of volume N is the
N first in that order, i.e. every sample whose key is at most the N-th smallest key. A larger
volume therefore contains every smaller one, the order does not follow the source order
(so a small volume is not all from a few sources), and a stream can filter by one integer
threshold without shipping a list of ids.
"""

from __future__ import annotations

import hashlib

import numpy as np


def subset_key(sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"subset:{sample_id}".encode()).digest()[:8], "little")


def read_sample_ids(files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for f in files:
        ids += pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def volume_threshold(sample_ids: list[str], volume: int) -> int:
    """The largest key inside the subset of ``volume`` samples (volume ≥ 1)."""
    if not 1 <= volume <= len(sample_ids):
        raise ValueError(f"volume {volume} outside 1..{len(sample_ids)}")
    keys = np.fromiter((subset_key(s) for s in sample_ids), dtype=np.uint64, count=len(sample_ids))
    return int(np.partition(keys, volume - 1)[volume - 1])


def keep_volume(batch: dict[str, np.ndarray], threshold: int) -> dict[str, np.ndarray]:
    """map_batches filter: rows whose key is within the subset."""
    keep = np.array([subset_key(str(s)) <= threshold for s in batch["sample_id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}
