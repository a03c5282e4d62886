"""Nested synthetic subsets for scaling sweeps: a larger volume contains every smaller one."""

import numpy as np
import pytest

from training.subsets import keep_rows, subset_key, volume_threshold

IDS = [f"src_{i:04d}/{m}/{k}" for i in range(300) for m in ("imgsyn", "masksyn") for k in range(2)]


def subset(volume: int) -> set[str]:
    batch = {"sample_id": np.array(IDS, dtype=object), "x": np.arange(len(IDS))}
    return set(keep_rows(batch, volume_threshold(IDS, volume))["sample_id"])


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


def test_growing_the_dataset_with_more_copies_keeps_every_existing_subset():
    grown = IDS + [f"src_{i:04d}/{m}/{k}" for i in range(300) for m in ("imgsyn", "masksyn") for k in (2, 3)]
    for volume in (1, 50, 600, len(IDS)):
        batch = {"sample_id": np.array(grown, dtype=object)}
        assert set(keep_rows(batch, volume_threshold(grown, volume))["sample_id"]) == subset(volume)


def test_ids_without_a_copy_index_are_ordered_by_hash():
    ids = [f"img_{i}" for i in range(50)]
    assert volume_threshold(ids, 50) < 2**48 and len({subset_key(s) for s in ids}) == 50


def test_a_budget_smaller_than_the_volume_draws_a_uniform_seeded_sample_of_it():
    batch = {"sample_id": np.array(IDS, dtype=object)}
    threshold = volume_threshold(IDS, 1000)
    drawn = [set(keep_rows(batch, threshold, draw_seed=s, draw_fraction=0.25)["sample_id"]) for s in (0, 1)]
    for d in drawn:
        assert d < subset(1000) and 200 <= len(d) <= 300
        assert len({i.split("/")[0] for i in d}) > 150  # spread over the sources of the whole volume
    assert drawn[0] != drawn[1]  # another seed, another sample
    assert set(keep_rows(batch, threshold, draw_seed=0, draw_fraction=0.25)["sample_id"]) == drawn[0]
