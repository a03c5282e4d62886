"""The standard evaluation protocol (training.inference) against independent references, and
the accelerator pieces of a training step (training.accel) that a CPU can check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.schema import IGNORE_INDEX
from training.accel import (
    autocast,
    grad_scaler,
    has_batchnorm,
    maybe_sync_batchnorm,
    param_groups,
    to_model_input,
)
from training.config import ModelConfig
from training.inference import _windows, resized_shape, segment
from training.metrics import confusion, summarize
from training.models import build_model

pytestmark = pytest.mark.timeout(120)

CLASSES = ["background", "circle", "square", "triangle"]


@pytest.mark.subprocess
def test_miou_matches_torchmetrics_on_known_predictions():
    """Per-class IoU and mIoU from our confusion matrix = torchmetrics' Jaccard index (255
    ignored), on predictions with every kind of error, a class absent from truth and
    prediction (excluded from the mean), and one present only in the prediction."""
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    truth = rng.choice([0, 1, 2, IGNORE_INDEX], size=(3, 20, 30), p=[0.5, 0.2, 0.2, 0.1])
    pred = np.where(rng.random(truth.shape) < 0.7, np.where(truth == IGNORE_INDEX, 0, truth), rng.integers(0, 3, truth.shape))
    pred[1, 5, 5:9] = 2
    t, p = torch.from_numpy(truth), torch.from_numpy(pred)
    ours = summarize(confusion(p, t, 4).numpy(), CLASSES)
    ref = MulticlassJaccardIndex(num_classes=4, ignore_index=IGNORE_INDEX, average=None, zero_division=float("nan"))
    per_class = ref(p, t).numpy()
    assert ours["per_class_iou"]["triangle"] is None and np.isnan(per_class[3])
    np.testing.assert_allclose([ours["per_class_iou"][c] for c in CLASSES[:3]], per_class[:3], atol=1e-6)
    assert ours["miou"] == pytest.approx(float(np.nanmean(per_class)), abs=1e-6)
    # by hand for class 1: |pred=1 & truth=1| / |pred=1 | truth=1| over non-ignored pixels
    keep = truth != IGNORE_INDEX
    inter = ((pred == 1) & (truth == 1) & keep).sum()
    union = (((pred == 1) | (truth == 1)) & keep).sum()
    assert ours["per_class_iou"]["circle"] == pytest.approx(inter / union, abs=1e-6)


def test_resize_follows_mmseg_keep_ratio_rule():
    assert resized_shape(375, 500, 512, 2048) == (512, 683)  # short side to 512
    assert resized_shape(200, 1200, 512, 2048) == (341, 2048)  # the long side caps it
    assert resized_shape(37, 53, None, 2048) == (37, 53)  # native
    assert _windows(683, 512, 341) == [0, 171] and _windows(512, 512, 341) == [0] and _windows(1100, 512, 341) == [0, 341, 588]


class PointwiseNet(torch.nn.Module):
    """A per-pixel classifier (1x1 conv) as a SegFormer stand-in: its scores do not depend on
    the window around a pixel, so whole-image, sliding-window and flipped inference agree."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, pixel_values):
        class Out:
            logits = self.conv(pixel_values)

        return Out()


def test_slide_whole_and_flip_agree_and_scores_land_at_the_label_size():
    net = PointwiseNet().eval()
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    with torch.no_grad():
        whole = segment(net, "segformer", image, {"short_side": None, "mode": "whole"}, mean, std)
        slide = segment(net, "segformer", image, {"short_side": None, "mode": "slide", "crop_size": 32, "stride": 20}, mean, std)
        flip = segment(net, "segformer", image, {"short_side": None, "mode": "whole", "flip": True}, mean, std)
        big = segment(net, "segformer", image, {"short_side": 90, "max_long_side": 2048, "mode": "slide",
                                                "crop_size": 64, "stride": 40, "scales": [0.5, 1.0]}, mean, std)
    assert whole.shape == slide.shape == big.shape == (4, 45, 70)  # the ORIGINAL size, whatever the resize
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(flip, 2 * whole)  # two passes' probabilities summed
    # by hand: normalise, 1x1 conv, softmax
    x = (image.permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(whole, net.conv(x).softmax(1)[0])
    assert (big.argmax(0) == whole.argmax(0)).float().mean() > 0.9  # resized twice, nearly the same classes


def test_bf16_autocast_on_cpu_and_auto_is_fp32_there():
    model = build_model(ModelConfig(), CLASSES).eval()
    x = torch.randn(1, 3, 32, 32)
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        assert model(pixel_values=x).logits.dtype == torch.bfloat16
    with torch.no_grad(), autocast(cpu, "auto"):
        assert model(pixel_values=x).logits.dtype == torch.float32
    assert grad_scaler(cpu, "fp16").is_enabled() and not grad_scaler(cpu, "bf16").is_enabled()


def test_backbone_param_group_and_sync_batchnorm():
    model = build_model(ModelConfig(), CLASSES)
    groups = param_groups(model, "segformer", 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"] and groups[1]["lr"] == pytest.approx(1e-4)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert all(any(p is q for q in groups[1]["params"]) for p in model.segformer.parameters())
    assert has_batchnorm(model)  # SegFormer's decode head
    synced = maybe_sync_batchnorm(model, 2, torch.device("cuda"))  # converting needs no GPU; DDP then does
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    for world, device in ((1, "cuda"), (2, "cpu")):  # one worker: nothing to sync; CPU: DDP refuses it
        plain = maybe_sync_batchnorm(build_model(ModelConfig(), CLASSES), world, torch.device(device))
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())


def test_uint8_pixels_are_normalised_on_the_device_like_the_cpu_formula():
    x = torch.tensor([[[[255]], [[0]], [[128]]]], dtype=torch.uint8)
    out = to_model_input(x, [0.5, 0.5, 0.5], [0.5, 0.25, 0.5])
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, -2.0, (128 / 255 - 0.5) / 0.5]))
