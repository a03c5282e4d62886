"""The mix sampler: each real slot is replaced by a synthetic sample with probability p_aug."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import Mixer, StreamExhausted
from training.transforms import LABELS, SYNTHETIC

pytestmark = pytest.mark.timeout(60)


def stream(flag: int, batch: int = 7, limit: int | None = None):
    """Batches of rows whose ``labels`` hold a running row number, like a Ray Data shard."""
    i = 0
    while limit is None or i < limit:
        n = batch if limit is None else min(batch, limit - i)
        yield {SYNTHETIC: np.full(n, flag, np.int8), LABELS: np.arange(i, i + n)}
        i += n


@pytest.mark.parametrize("p_aug", [0.6, 0.4])
def test_realized_ratio_within_two_points_over_10k_draws(p_aug):
    mixer = Mixer({"real": stream(0), "synthetic": stream(1, 5)}, p_aug, batch_size=8, seed=123)
    flags = np.concatenate([next(mixer)[SYNTHETIC] for _ in range(1500)])  # 12,000 draws
    assert flags.size == 12_000
    assert abs(flags.mean() - p_aug) <= 0.02
    # each stream is consumed exactly as far as its share, in order, without skipping rows
    assert mixer.taken == {"real": int((flags == 0).sum()), "synthetic": int((flags == 1).sum())}


def test_rows_are_taken_in_order_without_loss():
    mixer = Mixer({"real": stream(0, 3), "synthetic": stream(1, 4)}, 0.5, batch_size=6, seed=0)
    real, syn = [], []
    for _ in range(200):
        b = next(mixer)
        real += b[LABELS][b[SYNTHETIC] == 0].tolist()
        syn += b[LABELS][b[SYNTHETIC] == 1].tolist()
    assert real == list(range(len(real))) and syn == list(range(len(syn)))


def test_draws_are_independent_per_slot():
    mixer = Mixer({"real": stream(0), "synthetic": stream(1)}, 0.6, batch_size=8, seed=1)
    counts = np.array([next(mixer)[SYNTHETIC].sum() for _ in range(4000)])
    # binomial(8, 0.6): mean 4.8, variance 1.92 (a fixed per-batch split would have variance 0)
    assert abs(counts.mean() - 4.8) < 0.1 and abs(counts.var() - 1.92) < 0.25


def test_single_stream_and_exhaustion():
    only_real = Mixer({"real": stream(0, 4, limit=10)}, 0.0, batch_size=4)
    assert next(only_real)[SYNTHETIC].sum() == 0
    next(only_real)
    with pytest.raises(StreamExhausted, match="real stream ended after 8 rows"):
        next(only_real)
    only_syn = Mixer({"synthetic": stream(1)}, 1.0, batch_size=4)
    assert next(only_syn)[SYNTHETIC].tolist() == [1, 1, 1, 1]


def test_works_on_torch_batches():
    import torch

    def tstream(flag):
        while True:
            yield {SYNTHETIC: torch.full((5,), flag, dtype=torch.int8), LABELS: torch.zeros(5, 2, 2)}

    b = next(Mixer({"real": tstream(0), "synthetic": tstream(1)}, 0.5, batch_size=8, seed=3))
    assert isinstance(b[LABELS], torch.Tensor) and b[LABELS].shape == (8, 2, 2)


def test_a_mixer_restored_at_a_batch_draws_what_an_uninterrupted_one_does():
    """Batch i's draws depend on (seed, i) only: a run restored at step k mixes like one that never stopped."""
    whole = Mixer({"real": stream(0), "synthetic": stream(1)}, 0.5, batch_size=8, seed=(3, 1))
    flags = [next(whole)[SYNTHETIC].tolist() for _ in range(10)]
    later = Mixer({"real": stream(0), "synthetic": stream(1)}, 0.5, batch_size=8, seed=(3, 1), start=6)
    assert [next(later)[SYNTHETIC].tolist() for _ in range(4)] == flags[6:]
    other_rank = Mixer({"real": stream(0), "synthetic": stream(1)}, 0.5, batch_size=8, seed=(3, 2))
    assert [next(other_rank)[SYNTHETIC].tolist() for _ in range(10)] != flags


def test_the_last_row_taken_from_each_stream_is_kept():
    def positioned(flag):
        i = 0
        while True:
            yield {SYNTHETIC: np.full(5, flag, np.int8), "position": np.arange(i, i + 5)}
            i += 5

    mixer = Mixer({"real": positioned(0), "synthetic": positioned(1)}, 0.5, batch_size=8, seed=0)
    for _ in range(3):
        next(mixer)
    assert {k: int(v) for k, v in mixer.last.items()} == {k: n - 1 for k, n in mixer.taken.items()}
