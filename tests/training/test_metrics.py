"""Confusion matrix, IoU, pixel accuracy; 255 never counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import all_reduce_, confusion, format_table, summarize

pytestmark = pytest.mark.timeout(60)


def test_confusion_ignores_255_and_counts_pairs():
    target = torch.tensor([[0, 0, 1, 255], [2, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 1, 0, 0]])
    conf = confusion(pred, target, 3).numpy()
    expected = np.array([[1, 1, 0], [1, 2, 0], [0, 0, 1]])
    np.testing.assert_array_equal(conf, expected)
    assert conf.sum() == 6  # the two 255 pixels are not counted


def test_summarize_values():
    conf = np.array([[1, 1, 0], [1, 2, 0], [0, 0, 1]])
    s = summarize(conf, ["bg", "a", "b"])
    # IoU bg = 1/(2+2-1)=1/3, a = 2/(3+3-2)=1/2, b = 1
    assert s["per_class_iou"] == {"bg": pytest.approx(1 / 3, abs=1e-6), "a": 0.5, "b": 1.0}
    assert s["miou"] == pytest.approx((1 / 3 + 0.5 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    assert s["confusion"] == conf.tolist() and s["pixels"] == 6


def test_absent_class_is_none_and_left_out_of_miou():
    conf = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    s = summarize(conf, ["bg", "a", "never"])
    assert s["per_class_iou"]["never"] is None and s["miou"] == 1.0
    table = format_table(s)
    assert "never" in table and "mIoU" in table and "1.0000" in table


def test_all_reduce_without_process_group_is_identity():
    t = torch.ones(2, 2, dtype=torch.int64)
    assert all_reduce_(t).sum() == 4
