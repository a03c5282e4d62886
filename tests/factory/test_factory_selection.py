"""Selection math of the factory graph with known inputs (Diffusion Synthesis' HIS module)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core import schema as S
from pipelines.graphs.factory import selection as sel


def test_identical_embeddings_are_similar_and_kept():
    v = np.array([0.3, -1.2, 2.0, 0.5], dtype=np.float32)
    assert sel.cosine_similarity(v, v)[0] == pytest.approx(1.0)
    assert sel.cosine_similarity(v, 3.0 * v)[0] == pytest.approx(1.0)  # scale-free
    assert sel.keep_similar(1.0, 0.8)


def test_orthogonal_embeddings_score_zero_and_are_dropped():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
    assert sel.cosine_similarity(a, b)[0] == pytest.approx(0.0)
    assert not sel.keep_similar(0.0, 0.8)
    assert not sel.keep_similar(0.0, 1e-6)
    assert not sel.keep_similar(0.8, 0.8)  # Eq. 2 is strict: > ε
    assert sel.keep_similar(0.0, None)  # filter off
    assert sel.cosine_similarity(np.zeros(3), a)[0] == 0.0  # no NaN from a zero vector
    assert sel.cosine_similarity(-a, a)[0] == pytest.approx(-1.0)


def test_iou_per_class_against_hand_computed_masks_ignore_excluded():
    target = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 255],
                     [2, 0, 1, 1]], dtype=np.uint8)
    # valid pixels: both != 255 -> 9 pixels (target's two 255 and pred's (1,3) left out)
    # class 0: target {00,01,10,11}, pred {00,10,11,21} over valid -> inter 3, union 5
    # class 1: target {02,03,12}, pred {01,02,03,12} -> inter 3, union 4
    # class 2: target {20,21}, pred {20} -> inter 1, union 2
    ious = sel.iou_per_class(pred, target)
    assert ious == pytest.approx({0: 3 / 5, 1: 3 / 4, 2: 1 / 2})
    assert sel.mean_iou(pred, target) == pytest.approx((3 / 5 + 3 / 4 + 1 / 2) / 3)
    assert sel.mean_iou(pred, target, background=0) == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_classes_absent_in_both_do_not_count_and_extra_classes_do():
    target = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    assert sel.mean_iou(target.copy(), target) == 1.0  # classes 2..N absent in both: not in the mean
    pred = np.array([[1, 3], [0, 0]], dtype=np.uint8)  # a hallucinated class 3 scores IoU 0
    assert sel.iou_per_class(pred, target) == pytest.approx({0: 1.0, 1: 0.5, 3: 0.0})
    everything_ignored = np.full((2, 2), S.IGNORE_INDEX, dtype=np.uint8)
    assert math.isnan(sel.mean_iou(everything_ignored, target))
    assert not sel.keep_matching(float("nan"), 0.5)
    assert sel.keep_matching(0.5, 0.5) and not sel.keep_matching(0.49, 0.5)


def _rows(embeddings, sources, masks, resegs, drops):
    n = len(drops)
    h, w = masks[0].shape
    return {
        S.SAMPLE_ID: np.array([f"s/factory/{i}" for i in range(n)], dtype=object),
        S.DROP_REASON: np.array(drops, dtype=object),
        S.CLIP_EMBEDDING: np.array([np.asarray(e, "<f4").tobytes() for e in embeddings], dtype=object),
        S.CLIP_SOURCE_EMBEDDING: np.array([np.asarray(e, "<f4").tobytes() for e in sources], dtype=object),
        S.MASK_RAW: np.array([m.tobytes() for m in masks], dtype=object),
        S.RESEG_MASK_RAW: np.array([m.tobytes() for m in resegs], dtype=object),
        S.HEIGHT: np.full(n, h, dtype=np.int64), S.WIDTH: np.full(n, w, dtype=np.int64),
    }


def test_filter_stages_add_scores_and_drop_reasons():
    e = [1.0, 0.0]
    mask = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    batch = _rows(embeddings=[e, [0.0, 1.0], e, e], sources=[e, e, e, e],
                  masks=[mask] * 4, resegs=[mask, mask, np.zeros_like(mask), mask],
                  drops=["", "", "", "bad_source: x"])
    out = sel.similarity_stage(batch, threshold=0.8)
    assert out[S.SCORE_CLIP_SIMILARITY][:3] == pytest.approx([1.0, 0.0, 1.0])
    assert math.isnan(out[S.SCORE_CLIP_SIMILARITY][3])  # already dropped: not scored
    assert list(out[S.DROP_REASON]) == ["", sel.LOW_SIMILARITY, "", "bad_source: x"]
    out = sel.reseg_stage(out, threshold=0.5, mask_dtype="|u1", background=0)
    scores = out[S.SCORE_RESEG_MIOU]
    assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[3])
    assert scores[2] == pytest.approx((1 / 4 + 0.0) / 2)  # background IoU 1/4, class 1 IoU 0
    assert list(out[S.DROP_REASON]) == ["", sel.LOW_SIMILARITY, sel.LOW_RESEG_MIOU, "bad_source: x"]
    no_bg = sel.reseg_stage(_rows([e], [e], [mask], [np.zeros_like(mask)], [""]), threshold=0.0,
                            mask_dtype="|u1", background=0, include_background=False)
    assert no_bg[S.SCORE_RESEG_MIOU][0] == 0.0 and no_bg[S.DROP_REASON][0] == ""
