"""What a training step needs to run well on accelerators, kept apart from the loop.

- mixed precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU; ``bf16`` everywhere
  (CPU too); ``fp16`` with a GradScaler (dynamic loss scaling; CUDA); ``fp32`` none;
- SyncBatchNorm when the model has BatchNorm layers and several GPU workers (SegFormer's decode
  head has one; per-worker statistics of a small per-GPU batch are noisy);
- a lower learning rate for a pretrained backbone (mmseg's SegFormer/Mask2Former recipes:
  backbone ``lr_mult`` 0.1) via parameter groups;
- images travel as uint8 and are normalised here, on the device (4x less host→device traffic);
- ``torch.compile`` behind a flag.
"""

from __future__ import annotations

import contextlib
from typing import Any

# parameter-name prefixes of the pretrained encoder per architecture (transformers' module names)
BACKBONE_PREFIXES = {"segformer": ("segformer.",), "mask2former": ("model.pixel_level_module.encoder.",)}


def autocast_dtype(device_type: str, precision: str):
    import torch

    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device, precision: str):
    """The autocast context of a forward pass (a no-op for fp32)."""
    import torch

    dtype = autocast_dtype(device.type, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device, precision: str):
    """A GradScaler for fp16 (its range needs loss scaling); disabled otherwise."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def has_batchnorm(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def maybe_sync_batchnorm(model, world_size: int, device):
    """BatchNorm → SyncBatchNorm for DDP over several GPU workers (statistics over the global
    batch). Not on CPU: DDP refuses SyncBatchNorm without CUDA; eval then syncs rank 0's
    running statistics instead (training.inference._sync_buffers)."""
    import torch

    if world_size > 1 and device.type == "cuda" and has_batchnorm(model):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def param_groups(model, arch: str, lr: float, backbone_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone parameters at ``lr * backbone_lr_mult``, the rest (decode head) at ``lr``."""
    prefixes = BACKBONE_PREFIXES[arch]
    net = getattr(model, "module", model)
    backbone, head = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith(prefixes) else head).append(p)
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return groups


def to_model_input(pixels, mean: list[float], std: list[float]):
    """uint8 (N, 3, H, W) on the device → float32 normalised ``(x / 255 - mean) / std``."""
    import torch

    m = torch.tensor(mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float().div_(255) - m) / s


def maybe_compile(model, enabled: bool):
    import torch

    return torch.compile(model) if enabled else model
