"""mix.mode=variant (Diffusion Synthesis Eq. 3): a real row is replaced by one of its own
synthetic variants (same source_id) with probability alpha, redrawn per epoch from the row's
augmentation key; rows without variants stay real."""

from __future__ import annotations

import numpy as np
import pytest

from core import schema as S
from core.config import ConfigError
from training.epochs import aug_keys
from training.transforms import LABELS, PIXELS, SYNTHETIC, transform_batch
from training.variants import VARIANT_PATHS, attach_variants

SIZE = 64
AUG = {"crop_size": SIZE, "scale_min": 1.0, "scale_max": 1.0, "flip": False}  # pixels pass unchanged


@pytest.fixture()
def real_columns(toy_source):
    from pipelines.source_index import index_source

    rows = sorted(index_source(toy_source, "voc", split="train").rows, key=lambda r: r[S.SOURCE_ID])
    keys = (S.SOURCE_ID, S.SOURCE_PATH, S.SOURCE_MASK_PATH, "source_row")
    return {k: np.array([r[k] for r in rows], dtype=object) for k in keys}


def _batch(columns, epoch: int, seed: int = 0):
    ids = [str(s) for s in columns[S.SOURCE_ID]]
    return {**columns, "aug_key": aug_keys(ids, np.full(len(ids), epoch), seed)}


def test_each_real_row_is_replaced_by_its_own_variant_with_probability_alpha(real_columns, tmp_path, write_variants):
    ids = [str(s) for s in real_columns[S.SOURCE_ID]]
    with_variants = ids[:30]  # the last 10 real rows have none
    cols = attach_variants(real_columns, write_variants(tmp_path / "syn", with_variants))
    assert [len(v) for v in cols[VARIANT_PATHS][:30]] == [2] * 30 and list(map(len, cols[VARIANT_PATHS][30:])) == [0] * 10
    kw = {"source": "index", "train": True, "aug": AUG, "num_classes": 6, "fmt": "voc"}
    every = transform_batch(_batch(cols, 0), **kw, variant_alpha=1.0)
    assert every[SYNTHETIC].tolist() == [1] * 30 + [0] * 10
    # a replaced row holds one of its variants (pixels 200 or 201, mask all class 1)
    assert set(np.unique(every[PIXELS][:30]).tolist()) <= {200, 201} and (every[LABELS][:30] == 1).all()
    assert len(np.unique(every[PIXELS][:30].reshape(30, -1)[:, 0])) == 2  # both variants get drawn
    assert not np.isin(every[PIXELS][30:], [200, 201]).all()
    none = transform_batch(_batch(cols, 0), **kw, variant_alpha=0.0)
    assert none[SYNTHETIC].sum() == 0
    # alpha 0.4 over 10 epochs of the 30 rows that have variants: ~120 of 300 replaced
    drawn = [transform_batch(_batch(cols, e), **kw, variant_alpha=0.4)[SYNTHETIC][:30] for e in range(10)]
    share = float(np.mean(np.concatenate(drawn)))
    assert 0.3 < share < 0.5, share
    # reproducible per (seed, id, epoch), different across epochs
    again = transform_batch(_batch(cols, 3), **kw, variant_alpha=0.4)[SYNTHETIC][:30]
    assert np.array_equal(again, drawn[3]) and not all(np.array_equal(drawn[0], d) for d in drawn[1:])
    # eval never swaps
    val = transform_batch(_batch(cols, 0), **{**kw, "train": False}, variant_alpha=1.0)
    assert not any(np.isin(im, [200, 201]).all() for im in val["image"])


def test_variant_mode_needs_matching_source_ids(real_columns, tmp_path, write_variants):
    with pytest.raises(ConfigError, match="no synthetic sample's source_id matches a real training row"):
        attach_variants(real_columns, write_variants(tmp_path / "syn", ["not_a_real_id"]))


def test_variant_mode_draws_no_independent_synthetic_stream():
    from training.config import TrainConfig

    assert TrainConfig(strategy="mix", p_aug=0.4, mix={"mode": "variant"}).p_synthetic == 0.0
    assert TrainConfig(strategy="mix", p_aug=0.4).p_synthetic == 0.4
