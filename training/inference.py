"""The standard semantic-segmentation test protocol (mmsegmentation's), on the device.

One image at a time (uint8, its own size; sizes differ across ADE20K): resize so the short
side is ``short_side`` with the long side at most ``max_long_side`` (mmseg's
``Resize(scale=(2048, 512), keep_ratio=True)``, bilinear, no antialias like cv2), normalise
on the device, run the model on the whole image or on sliding ``crop_size`` windows every
``stride`` pixels (overlaps averaged; mmseg ``slide_inference``), resize the logits back to
the ORIGINAL label size, and score there with 255 ignored. Optional test-time augmentation:
horizontal flip and extra scales (ratios of the resized size), softmax probabilities
averaged (mmseg's aug_test). ``evaluate``, the periodic eval and ``predict`` all call
:func:`segment`, so their masks are the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from training.models import predict


def resized_shape(h: int, w: int, short_side: int | None, max_long_side: int | None) -> tuple[int, int]:
    """(h, w) after mmseg's keep-ratio resize: short side → ``short_side`` unless the long side
    would pass ``max_long_side`` (None: no limit / native size)."""
    if not short_side:
        return h, w
    scale = short_side / min(h, w)
    if max_long_side:
        scale = min(scale, max_long_side / max(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _windows(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, the last one flush with the end."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _logits(model, arch: str, x, spec: dict[str, Any]):
    """(1, C, h, w) class scores of a normalised image, whole or by sliding windows."""
    import torch

    h, w = x.shape[-2:]
    if spec.get("mode", "whole") == "whole":
        return predict(model, arch, x, (h, w))
    crop, stride = spec["crop_size"], spec["stride"]
    out, count = None, torch.zeros((1, 1, h, w), device=x.device)
    for y0 in _windows(h, crop, stride):
        for x0 in _windows(w, crop, stride):
            tile = x[..., y0:y0 + crop, x0:x0 + crop]
            scores = predict(model, arch, tile, tuple(tile.shape[-2:]))
            if out is None:
                out = torch.zeros((1, scores.shape[1], h, w), device=x.device)
            out[..., y0:y0 + tile.shape[-2], x0:x0 + tile.shape[-1]] += scores
            count[..., y0:y0 + tile.shape[-2], x0:x0 + tile.shape[-1]] += 1
    return out / count


def segment(model, arch: str, image, spec: dict[str, Any], mean: list[float], std: list[float]):
    """Class probabilities (C, H, W) at the image's own size for one uint8 (H, W, 3) tensor.

    ``spec``: short_side, max_long_side, mode (whole | slide), crop_size, stride, flip, scales."""
    import torch
    import torch.nn.functional as F

    h0, w0 = image.shape[:2]
    x = image.permute(2, 0, 1)[None].float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    h, w = resized_shape(h0, w0, spec.get("short_side"), spec.get("max_long_side"))
    total = None
    for ratio in spec.get("scales") or [1.0]:
        size = (max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5)))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if size != (h0, w0) else x
        for flip in ((False, True) if spec.get("flip") else (False,)):
            inp = xs.flip(-1) if flip else xs
            logits = _logits(model, arch, inp, spec)
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits.float(), size=(h0, w0), mode="bilinear", align_corners=False)
            probs = logits if arch == "mask2former" else logits.softmax(1)  # mask2former: already scores
            total = probs if total is None else total + probs
    return total[0]


def eval_protocol(meta: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's eval protocol with ``overrides``, validated (bad keys: ConfigError)."""
    from pydantic import ValidationError

    from core.config import ConfigError
    from training.config import EvalConfig

    try:
        return EvalConfig.model_validate({**meta.get("eval", {}), **(overrides or {})}).model_dump()
    except ValidationError as exc:
        from core.config import first_error_line

        raise ConfigError(f"eval {first_error_line(exc, EvalConfig)}") from None


def evaluate_shard(model, arch: str, shard, num_classes: int, device, batch_size: int, precision: str,
                   spec: dict[str, Any], mean: list[float], std: list[float]):
    """Confusion matrix (numpy) of this worker's val shard by :func:`segment`, summed over all
    workers. Rows come as decoded uint8 images and labels at their own sizes."""
    import torch

    from training.accel import autocast
    from training.metrics import all_reduce_, confusion
    from training.transforms import IMAGE, LABELS

    net = getattr(model, "module", model)
    _sync_buffers(net)
    was_training = net.training
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    with torch.no_grad(), autocast(device, precision):
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for image, label in zip(batch[IMAGE], batch[LABELS], strict=True):
                probs = segment(net, arch, torch.from_numpy(np.ascontiguousarray(image)).to(device), spec, mean, std)
                y = torch.from_numpy(np.asarray(label).astype(np.int64)).to(device)
                conf += confusion(probs.argmax(0), y, num_classes)
    all_reduce_(conf)
    net.train(was_training)
    return conf.cpu().numpy()


def _sync_buffers(net) -> None:
    """Give every worker rank 0's buffers (BatchNorm running stats): DDP broadcasts them at
    the start of each forward, so other ranks lag one step; eval must use the saved model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in net.buffers():
            dist.broadcast(buf, src=0)
