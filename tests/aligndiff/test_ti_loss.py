"""Eq. 3 of AlignDiff (normalized masked textual inversion) against a hand computation."""

from __future__ import annotations

import pytest
import torch

from training.finetune.textual_inversion_loss import latent_weights, normalized_masked_loss


def _errors() -> tuple[torch.Tensor, torch.Tensor]:
    # per-pixel squared error summed over 2 channels: [[1+1, 4+0], [9+0, 16+4]] = [[2, 4], [9, 20]]
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 2.0]]]).unsqueeze(0).repeat(2, 1, 1, 1)
    return pred, torch.zeros_like(pred)


def _masks() -> torch.Tensor:
    m = torch.zeros(2, 4, 4, dtype=torch.long)
    m[0, :2, :2] = 1          # image 0: the top-left latent cell is all foreground
    m[1, 0, 0] = 1            # image 1: a quarter of the top-left cell is foreground ...
    m[1, 2:, 2:] = 255        # ... and the bottom-right cell is ignored
    return m


def test_loss_equals_hand_computation():
    pred, noise = _errors()
    # image 0: fg = 2; bg = (4 + 9 + 20) / 3 = 11                  -> 2 + 0.6 * 11 = 8.6
    # image 1: fg = 0.25*2 / 0.25 = 2; bg = (0.75*2 + 4 + 9) / 2.75 -> 2 + 0.6 * 14.5 / 2.75
    expected = (8.6 + (2 + 0.6 * 14.5 / 2.75)) / 2
    got = normalized_masked_loss(pred, noise, _masks(), bg_weight=0.6)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # lambda weighs only the background term
    assert normalized_masked_loss(pred, noise, _masks(), bg_weight=0.0).item() == pytest.approx(2.0)
    # unlike a plain mean over pixels (which the loss is not)
    assert got.item() != pytest.approx(pred.pow(2).sum(1).mean().item(), rel=1e-3)


def test_area_weights_and_empty_side():
    w_fg, w_bg = latent_weights(_masks(), (2, 2))
    assert w_fg[1].tolist() == [[0.25, 0.0], [0.0, 0.0]]
    assert w_bg[1].tolist() == [[0.75, 1.0], [1.0, 0.0]]   # ignored pixels count for neither
    pred, noise = _errors()
    no_fg = torch.zeros(2, 4, 4, dtype=torch.long)
    # no foreground pixel: the fg term is 0, the bg term the plain mean (35 / 4)
    assert normalized_masked_loss(pred, noise, no_fg, 0.6).item() == pytest.approx(0.6 * 35 / 4)


def test_gradient_flows_only_through_prediction():
    pred, noise = _errors()
    pred.requires_grad_(True)
    normalized_masked_loss(pred, noise, _masks()).backward()
    g = pred.grad[1].abs().sum(0)
    assert g[1, 1] == 0           # the ignored cell gets no gradient
    assert (g[0] > 0).all()
