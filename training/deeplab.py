"""DeepLabv3 and DeepLabv3+ on a dilated torchvision ResNet (Chen et al. 2017 / 2018).

The backbone is torchvision's ``ResNet`` with its last strides replaced by dilation
(output stride 8: mmseg's ``*-d8`` configs; 16: the DeepLabv3+ paper), so its parameter names
are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``fc``) — the same names timm's ResNet
checkpoints on the hub use (``timm/resnet50.a1_in1k``: ``model.safetensors``), which
:mod:`training.backbones` loads. The head is ASPP (torchvision's own module) and, for v3+, the
decoder that fuses ASPP's output with ``layer1``'s low-level features (48 channels, two 3x3
convs of 256, as in the paper and mmseg's ``DepthwiseSeparableASPPHead`` minus the depthwise
split). Saved as ``config.json`` + ``model.safetensors`` (no pickle), reloaded by :func:`load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# name -> (Bottleneck blocks per stage, width_per_group); resnet-tiny is for tests and the toy domain
RESNETS = {"resnet50": ([3, 4, 6, 3], 64), "resnet101": ([3, 4, 23, 3], 64), "resnet-tiny": ([1, 1, 1, 1], 16)}
# ASPP rates per output stride (the DeepLabv3 paper: 6/12/18 at OS 16, doubled at OS 8)
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def resnet(name: str, output_stride: int) -> nn.Module:
    """A torchvision ResNet (Bottleneck) with dilation instead of stride past ``output_stride``."""
    from torchvision.models.resnet import Bottleneck, ResNet

    if name not in RESNETS:
        raise ValueError(f"unknown DeepLab backbone {name!r}; expected one of {sorted(RESNETS)}")
    layers, width = RESNETS[name]
    dilate = {8: [False, True, True], 16: [False, False, True]}[output_stride]
    return ResNet(Bottleneck, layers, width_per_group=width, replace_stride_with_dilation=dilate)


class DeepLab(nn.Module):
    """DeepLabv3 (``plus=False``) or DeepLabv3+ (``plus=True``); ``forward`` returns logits
    at 1/``output_stride`` (v3) or 1/4 (v3+) of the input; :func:`training.models.loss`
    resizes them to the labels."""

    def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 8, plus: bool = True,
                 aspp_channels: int = 256, low_level_channels: int = 48, dropout: float = 0.1):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.config = {"num_classes": num_classes, "backbone": backbone, "output_stride": output_stride, "plus": plus,
                       "aspp_channels": aspp_channels, "low_level_channels": low_level_channels, "dropout": dropout}
        self.backbone = resnet(backbone, output_stride)
        self.backbone.fc = nn.Identity()  # classification head unused (its checkpoint weights are skipped)
        c4 = self.backbone.layer4[-1].conv3.out_channels
        c1 = self.backbone.layer1[-1].conv3.out_channels
        self.aspp = ASPP(c4, list(ASPP_RATES[output_stride]), aspp_channels)
        if plus:
            self.low_level = nn.Sequential(nn.Conv2d(c1, low_level_channels, 1, bias=False),
                                           nn.BatchNorm2d(low_level_channels), nn.ReLU(inplace=True))
            fused = aspp_channels + low_level_channels
            self.decoder = nn.Sequential(
                nn.Conv2d(fused, aspp_channels, 3, padding=1, bias=False), nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True),
                nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False), nn.BatchNorm2d(aspp_channels), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(aspp_channels, num_classes, 1))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer1 output, layer4 output) of the backbone."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(x)
        return low, b.layer4(b.layer3(b.layer2(low)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        low, high = self.features(pixel_values)
        x = self.aspp(high)
        if self.config["plus"]:
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = self.decoder(torch.cat([x, self.low_level(low)], dim=1))
        return self.classifier(x)


def build(num_classes: int, arch: str, backbone: str, output_stride: int, aspp_channels: int) -> DeepLab:
    """``arch`` = ``deeplabv3`` or ``deeplabv3plus``."""
    return DeepLab(num_classes, backbone, output_stride, plus=arch == "deeplabv3plus", aspp_channels=aspp_channels)


def save(model: DeepLab, path: Path) -> None:
    """``config.json`` + ``model.safetensors`` (shared tensors none: plain save_file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"architecture": "deeplab", **model.config}, indent=1))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))


def is_saved(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    return cfg.is_file() and json.loads(cfg.read_text()).get("architecture") == "deeplab"


def load(path: Path) -> DeepLab:
    """A model :func:`save` wrote (strict: every key present, same shapes)."""
    from safetensors.torch import load_file

    cfg: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
    cfg.pop("architecture", None)
    model = DeepLab(**cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model
