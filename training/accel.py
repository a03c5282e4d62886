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
BACKBONE_PREFIXES = {"segformer": ("segformer.",), "mask2former": ("model.pixel_level_module.encoder.",),
                     "deeplabv3": ("backbone.",), "deeplabv3plus": ("backbone.",)}


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


# parameter names that are embeddings (mmseg's custom_keys with decay_mult=0: Mask2Former's query_embed,
# query_feat, level_embed; Swin's absolute_pos_embed, relative_position_bias_table), in transformers' names
NO_DECAY_NAMES = ("position_bias_table", "position_embeddings", "pos_embed", "level_embed", "queries_embedder",
                  "queries_features", "query_embed", "query_feat")


def _no_decay_names(net) -> set[str]:
    """Parameters of normalisation layers and embeddings (no weight decay in mmseg's recipes)."""
    import torch

    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)
    out = set()
    for mname, module in net.named_modules():
        # transformers' own LayerNorm subclasses (Segformer/Swin) are nn.LayerNorm too
        if isinstance(module, norms) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            out |= {f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)}
    return out | {n for n, _ in net.named_parameters() if any(k in n for k in NO_DECAY_NAMES)}


def param_groups(model, arch: str, lr: float, backbone_lr_mult: float, weight_decay: float | None = None,
                 no_decay_norm_embed: bool = False) -> list[dict[str, Any]]:
    """Backbone parameters at ``lr * backbone_lr_mult``, the rest (head) at ``lr``; with
    ``no_decay_norm_embed`` norms and embeddings of each part get weight decay 0 (their own group)."""
    prefixes = BACKBONE_PREFIXES[arch]
    net = getattr(model, "module", model)
    skip = _no_decay_names(net) if no_decay_norm_embed else set()
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            part = "backbone" if name.startswith(prefixes) else "head"
            buckets.setdefault((part, name in skip), []).append(p)
    groups = []
    for (part, no_decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != "head", kv[0][1])):
        group = {"params": params, "lr": lr * (backbone_lr_mult if part == "backbone" else 1.0),
                 "name": part + ("_no_decay" if no_decay else "")}
        if no_decay:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
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
