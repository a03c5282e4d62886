"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

Each worker accumulates its own confusion matrix (rows = truth, columns = prediction;
pixels labelled 255 are skipped); :func:`all_reduce_` sums them across workers, so every
worker then holds the metrics of the whole val set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.schema import IGNORE_INDEX


def confusion(pred, target, num_classes: int):
    """(C, C) int64 torch tensor for one batch; ``target`` pixels equal to 255 (or out of
    range) are ignored."""
    import torch

    keep = (target != IGNORE_INDEX) & (target >= 0) & (target < num_classes)
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_(conf):
    """Sum a confusion matrix over all workers in place (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
    return conf


def summarize(conf: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """mIoU over classes present in truth or prediction, per-class IoU (None when a class
    never occurs), pixel accuracy, and the matrix itself."""
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    valid = ~np.isnan(iou)
    return {
        "miou": float(iou[valid].mean()) if valid.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "per_class_iou": {c: (None if np.isnan(v) else round(float(v), 6)) for c, v in zip(classes, iou, strict=True)},
        "pixels": int(total),
        "confusion": conf.tolist(),
    }


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text per-class IoU table with mIoU and pixel accuracy."""
    rows = summary["per_class_iou"]
    width = max([5, *map(len, rows)])
    lines = [f"{'class':<{width}}  IoU"]
    lines += [f"{c:<{width}}  {'-' if v is None else f'{v:.4f}'}" for c, v in rows.items()]
    lines += [f"{'mIoU':<{width}}  {summary['miou']:.4f}", f"{'pixAcc':<{width}}  {summary['pixel_acc']:.4f}"]
    return "\n".join(lines)
