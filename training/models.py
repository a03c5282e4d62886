"""Segmentation models: SegFormer (default) and Mask2Former (semantic) from transformers,
DeepLabv3 / DeepLabv3+ on a torchvision ResNet (:mod:`training.deeplab`).

One code path per architecture: ``preset=tiny`` builds the real class from a small config
made here (random weights, offline); ``preset=pretrained`` calls
``from_pretrained(id, revision=..., use_safetensors=True)`` (or a local path);
``preset=backbone`` builds the full-size architecture around the backbone repo's config,
a fresh head for the dataset's classes, and loads only the backbone's weights
(:mod:`training.backbones`). A checkpoint is reloaded from the directory :func:`save_model`
wrote. Never ``trust_remote_code``. :func:`loss` and :func:`predict` hide the difference
between the per-pixel (SegFormer, DeepLab) and mask-classification (Mask2Former) heads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.schema import IGNORE_INDEX
from training.config import ModelConfig

log = logging.getLogger(__name__)


_MODULES = {"deeplabv3": ("training.deeplab", "DeepLab"), "deeplabv3plus": ("training.deeplab", "DeepLab"),
            "segformer": ("transformers.models.segformer.modeling_segformer", "SegformerForSemanticSegmentation"),
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


def _per_pixel(arch: str) -> bool:
    return arch != "mask2former"


def _with_backbone_config(cfg: ModelConfig, classes: list[str]):
    """The segmentation config around a pretrained backbone's own config (fresh head sizes:
    transformers' defaults, which are the published models' — Mask2Former 100 queries,
    hidden 256, 6 encoder / 10 decoder layers; SegFormer's decode width from the MiT config)."""
    from training.backbones import hf_backbone_config

    bb = hf_backbone_config(cfg.backbone)
    if cfg.arch == "segformer":
        from transformers import SegformerConfig

        if bb.model_type != "segformer":
            raise ConfigError(f"model.backbone: {bb.model_type} is not a MiT (segformer) backbone")
        return SegformerConfig(**{**bb.to_dict(), "semantic_loss_ignore_index": IGNORE_INDEX, **_labels(classes)})
    from transformers import Mask2FormerConfig

    if bb.model_type not in ("resnet", "swin"):
        raise ConfigError(f"model.backbone: {bb.model_type} backbones are not supported by Mask2Former here (resnet, swin)")
    bb.out_features = [f"stage{i + 1}" for i in range(len(bb.depths))]
    h = cfg.mask2former
    return Mask2FormerConfig(backbone_config=bb, ignore_value=IGNORE_INDEX, num_queries=h.num_queries, hidden_dim=h.hidden_dim,
                             feature_size=h.hidden_dim, mask_feature_size=h.hidden_dim, encoder_layers=h.encoder_layers,
                             decoder_layers=h.decoder_layers, train_num_points=h.train_num_points, **_labels(classes))


def build_architecture(cfg: ModelConfig, classes: list[str]):
    """The configured architecture with random weights (tiny sizes, or the backbone repo's)."""
    if cfg.arch.startswith("deeplab"):
        from training import deeplab

        name = "resnet-tiny" if cfg.preset == "tiny" else cfg.backbone.resnet
        channels = cfg.tiny.decoder_hidden_size if cfg.preset == "tiny" else cfg.deeplab.aspp_channels
        return deeplab.build(len(classes), cfg.arch, name, cfg.backbone.output_stride, channels)
    config = tiny_config(cfg, classes) if cfg.preset == "tiny" else _with_backbone_config(cfg, classes)
    return _classes(cfg.arch)(config)


def build_model(cfg: ModelConfig, classes: list[str]):
    """The configured model with a head for ``classes`` (weights per ``cfg.preset``)."""
    if cfg.preset == "pretrained":
        cls = _classes(cfg.arch)
        source = cfg.local_path or cfg.id
        log.info("loading %s from %s (revision %s)", cfg.arch, source, None if cfg.local_path else cfg.revision)
        kwargs = {} if cfg.local_path else {"revision": cfg.revision}
        return cls.from_pretrained(source, use_safetensors=True, ignore_mismatched_sizes=True,
                                   **kwargs, **_labels(classes))
    model = build_architecture(cfg, classes)
    if cfg.preset == "backbone":
        from training.backbones import load_into

        load_into(model, cfg)
    return model


def check_weights(cfg: ModelConfig, classes: list[str]) -> None:
    """On the driver, before Ray: transformers backbones are loaded alone (not the whole model);
    DeepLab's checkpoint keys and shapes (safetensors header) are checked against the
    architecture built on the meta device. Raises ConfigError naming the key."""
    if cfg.preset != "backbone":
        return
    import torch

    from training import backbones

    if not cfg.arch.startswith("deeplab"):  # transformers loads the backbone alone (its own key renaming)
        bb = backbones.hf_backbone_config(cfg.backbone)
        stages = {} if bb.model_type == "segformer" else {"out_features": [f"stage{i + 1}" for i in range(len(bb.depths))]}
        backbones.load_hf_backbone(cfg.backbone, bb.model_type, **stages)
        return
    with torch.device("meta"):  # DeepLab: keys and shapes from the safetensors header, no tensor read
        model = build_architecture(cfg, classes)
    ours = {k: tuple(v.shape) for k, v in backbones.backbone_module(model, cfg.arch).state_dict().items()}
    _, problem = backbones.problems(backbones.checkpoint_shapes(cfg.backbone), ours, backbones.where(cfg.backbone))
    if problem:
        raise ConfigError(problem)


def save_model(model, path: Path) -> None:
    """Weights (safetensors) + config, loadable by :func:`load_model`."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper
    if hasattr(net, "save_pretrained"):
        net.save_pretrained(str(path), safe_serialization=True)
    else:
        from training import deeplab

        deeplab.save(net, Path(path))


def save_image_processor(arch: str, path: Path, eval_spec: dict[str, Any], mean: list[float], std: list[float]) -> None:
    """``preprocessor_config.json`` beside the weights, so ``AutoImageProcessor`` and
    ``pipeline("image-segmentation", model=path)`` use the run's normalisation and eval size
    (the processor resizes to a fixed size: the protocol's short side, square; our own
    evaluate/predict keep the aspect ratio, training.inference)."""
    side = eval_spec.get("short_side") or eval_spec.get("crop_size") or 512
    if arch.startswith("deeplab"):
        return  # no transformers class reads a DeepLab directory; evaluate/predict use training.deeplab
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
    if arch.startswith("deeplab"):
        from training import deeplab

        return deeplab.load(Path(path))
    return _classes(arch).from_pretrained(str(path), use_safetensors=True)


def _logits(out):
    """Per-pixel logits of a transformers output (``.logits``) or of DeepLab (a tensor)."""
    return getattr(out, "logits", out)


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

    if _per_pixel(arch):
        logits = _logits(model(pixel_values=pixels))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    masks, cls = _semantic_targets(labels, num_classes)
    return model(pixel_values=pixels, mask_labels=masks, class_labels=cls).loss


def predict(model, arch: str, pixels, size: tuple[int, int]):
    """Per-class scores (B, C, H, W) at ``size``."""
    import torch
    import torch.nn.functional as F

    out = model(pixel_values=pixels)
    if _per_pixel(arch):
        return F.interpolate(_logits(out).float(), size=size, mode="bilinear", align_corners=False)
    cls = out.class_queries_logits.float().softmax(-1)[..., :-1]
    masks = F.interpolate(out.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", cls, masks)
