"""Nested subsets of a synthetic dataset for scaling experiments.

Samples are ordered by a stable key of their ``sample_id``: first the copy index ``k`` at the
end of a generated id (``<source>/<method>/<k>``), then a hash. The subset of volume N is the
N first in that order, i.e. every sample whose key is at most the N-th smallest key. So:

- a larger volume contains every smaller one;
- the order does not follow the source order: a small volume spreads over all sources (one
  copy of many sources, not every copy of a few);
- growing the dataset with more copies (``first_copy``) appends to the order, so the subsets
  a sweep already trained on stay the same;
- a stream filters by one integer threshold without shipping a list of ids.
"""

from __future__ import annotations

import hashlib

import numpy as np

_HASH_BITS = 48  # low bits: hash; high 16 bits: copy index (ids without one count as copy 0)


def copy_index(sample_id: str) -> int:
    tail = sample_id.rsplit("/", 1)[-1]
    return min(int(tail), 2**16 - 1) if "/" in sample_id and tail.isdigit() else 0


def subset_key(sample_id: str) -> int:
    digest = int.from_bytes(hashlib.sha256(f"subset:{sample_id}".encode()).digest()[:8], "little")
    return (copy_index(sample_id) << _HASH_BITS) | (digest >> (64 - _HASH_BITS))


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


def draw_key(seed: int, sample_id: str) -> float:
    """A uniform number in [0, 1) per (run seed, sample): which samples a short run draws."""
    return int.from_bytes(hashlib.sha256(f"draw:{seed}:{sample_id}".encode()).digest()[:8], "little") / 2.0**64


def keep_rows(batch: dict[str, np.ndarray], threshold: int | None = None, draw_seed: int = 0,
              draw_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """map_batches filter: rows within the volume subset (``threshold``, None = all), and of
    those a uniform ``draw_fraction`` of them (a budget that consumes less than one epoch
    then sees a random sample of the whole subset, not the first files' rows)."""
    ids = [str(s) for s in batch["sample_id"]]
    keep = np.array([(threshold is None or subset_key(s) <= threshold)
                     and (draw_fraction >= 1 or draw_key(draw_seed, s) < draw_fraction) for s in ids], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}
