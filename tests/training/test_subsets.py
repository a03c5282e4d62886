"""Nested synthetic subsets for scaling sweeps: a larger volume contains every smaller one."""

import numpy as np
import pytest

from training.subsets import keep_volume, subset_key, volume_threshold

IDS = [f"src_{i:04d}/{m}/{k}" for i in range(300) for m in ("imgsyn", "masksyn") for k in range(2)]


def subset(volume: int) -> set[str]:
    batch = {"sample_id": np.array(IDS, dtype=object), "x": np.arange(len(IDS))}
    return set(keep_volume(batch, volume_threshold(IDS, volume))["sample_id"])


def test_subsets_are_nested_exact_in_size_and_stable():
    sizes = [1, 10, 100, 500, 1000, len(IDS)]
    subsets = [subset(v) for v in sizes]
    assert [len(s) for s in subsets] == sizes
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert small < large
    assert subset(100) == subset(100)  # a rerun draws the same samples
    assert subset(100) == set(sorted(IDS, key=subset_key)[:100])


def test_subsets_do_not_follow_source_order():
    first = subset(120)
    sources = {s.split("/")[0] for s in first}
    assert len(sources) > 80  # spread over the sources, not the first 30 of them


def test_volume_outside_the_dataset_is_an_error():
    with pytest.raises(ValueError, match="outside 1..1200"):
        volume_threshold(IDS, 1201)
