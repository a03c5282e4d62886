"""Segmentation models from transformers: SegFormer (default) and Mask2Former (semantic).

One code path per architecture: ``preset=tiny`` builds the real transformers class from a
small config made here (random weights, offline); ``preset=pretrained`` calls
``from_pretrained(id, revision=..., use_safetensors=True)`` (or a local path); a checkpoint
is reloaded the same way from the directory :func:`save_model` wrote. Never
``trust_remote_code``. :func:`loss` and :func:`predict` hide the difference between the
per-pixel (SegFormer) and mask-classification (Mask2Former) heads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.schema import IGNORE_INDEX
from training.config import ModelConfig

log = logging.getLogger(__name__)


_MODULES = {"segformer": ("transformers.models.segformer.modeling_segformer", "SegformerForSemanticSegmentation"),
            "mask2former": ("transformers.models.mask2former.modeling_mask2former", "Mask2FormerForUniversalSegmentation")}


def _classes(arch: str):
    """The transformers class of ``arch`` (imports only that model's module: ~10 s here)."""
    import importlib

    module, name = _MODULES[arch]
    return getattr(importlib.import_module(module), name)


def preload(arch: str):
    """Start importing the model's module in a background thread, so the import overlaps
    other start-up work; join the returned thread before using transformers."""
    import threading

    thread = threading.Thread(target=_classes, args=(arch,), name="preload-model", daemon=True)
    thread.start()
    return thread


def _labels(classes: list[str]) -> dict[str, Any]:
    return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
            "label2id": {c: i for i, c in enumerate(classes)}}


def tiny_config(cfg: ModelConfig, classes: list[str]):
    """A small config of the real architecture (random init; for tests and the toy domain)."""
    t = cfg.tiny
    if cfg.arch == "segformer":
        from transformers import SegformerConfig

        heads = [max(1, h // 32) for h in t.hidden_sizes]
        return SegformerConfig(
            num_encoder_blocks=len(t.hidden_sizes), depths=t.depths, hidden_sizes=t.hidden_sizes,
            num_attention_heads=heads, sr_ratios=[8, 4, 2, 1][-len(t.hidden_sizes):],
            decoder_hidden_size=t.decoder_hidden_size, semantic_loss_ignore_index=IGNORE_INDEX,
            **_labels(classes))
    from transformers import Mask2FormerConfig, SwinConfig

    stages = [f"stage{i + 1}" for i in range(len(t.depths))]
    swin = SwinConfig(embed_dim=t.hidden_sizes[0], depths=t.depths, num_heads=[max(1, 2 ** i // 2) for i in range(len(t.depths))],
                      window_size=4, out_features=stages)
    d = t.decoder_hidden_size
    return Mask2FormerConfig(
        backbone_config=swin, feature_size=d, mask_feature_size=d, hidden_dim=d,
        encoder_feedforward_dim=2 * d, dim_feedforward=2 * d, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=t.num_queries, train_num_points=1024,
        use_auxiliary_loss=True, ignore_value=IGNORE_INDEX, **_labels(classes))


def build_model(cfg: ModelConfig, classes: list[str]):
    """The configured model with a head for ``classes`` (weights per ``cfg.preset``)."""
    cls = _classes(cfg.arch)
    if cfg.preset == "tiny":
        return cls(tiny_config(cfg, classes))
    source = cfg.local_path or cfg.id
    log.info("loading %s from %s (revision %s)", cfg.arch, source, None if cfg.local_path else cfg.revision)
    kwargs = {} if cfg.local_path else {"revision": cfg.revision}
    return cls.from_pretrained(source, use_safetensors=True, ignore_mismatched_sizes=True,
                               **kwargs, **_labels(classes))


def save_model(model, path: Path) -> None:
    """Weights (safetensors) + config, loadable by :func:`load_model`."""
    getattr(model, "module", model).save_pretrained(str(path), safe_serialization=True)


def save_image_processor(arch: str, path: Path, eval_spec: dict[str, Any], mean: list[float], std: list[float]) -> None:
    """``preprocessor_config.json`` beside the weights, so ``AutoImageProcessor`` and
    ``pipeline("image-segmentation", model=path)`` use the run's normalisation and eval size
    (the processor resizes to a fixed size: the protocol's short side, square; our own
    evaluate/predict keep the aspect ratio, training.inference)."""
    side = eval_spec.get("short_side") or eval_spec.get("crop_size") or 512
    if arch == "segformer":
        from transformers import SegformerImageProcessor

        proc = SegformerImageProcessor(size={"height": side, "width": side}, image_mean=mean, image_std=std,
                                       do_reduce_labels=False)
    else:
        from transformers import Mask2FormerImageProcessor

        proc = Mask2FormerImageProcessor(size={"shortest_edge": side}, image_mean=mean, image_std=std,
                                         ignore_index=IGNORE_INDEX, do_reduce_labels=False)
    proc.save_pretrained(str(path))


def load_model(arch: str, path: Path):
    """A model saved by :func:`save_model` (same code path as a pretrained preset)."""
    return _classes(arch).from_pretrained(str(path), use_safetensors=True)


def _semantic_targets(labels, num_classes: int):
    """Per image: binary masks and class ids of the classes present (ignore excluded)."""
    import torch

    masks, cls = [], []
    for y in labels:
        ids = torch.unique(y)
        ids = ids[(ids != IGNORE_INDEX) & (ids < num_classes)]
        masks.append((y[None] == ids[:, None, None]).float())
        cls.append(ids.long())
    return masks, cls


def loss(model, arch: str, pixels, labels, num_classes: int):
    """Training loss of a batch; ``labels`` (B, H, W) int64 with 255 = ignore."""
    import torch.nn.functional as F

    if arch == "segformer":
        logits = model(pixel_values=pixels).logits
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    masks, cls = _semantic_targets(labels, num_classes)
    return model(pixel_values=pixels, mask_labels=masks, class_labels=cls).loss


def predict(model, arch: str, pixels, size: tuple[int, int]):
    """Per-class scores (B, C, H, W) at ``size``."""
    import torch
    import torch.nn.functional as F

    out = model(pixel_values=pixels)
    if arch == "segformer":
        return F.interpolate(out.logits.float(), size=size, mode="bilinear", align_corners=False)
    cls = out.class_queries_logits.float().softmax(-1)[..., :-1]
    masks = F.interpolate(out.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", cls, masks)
