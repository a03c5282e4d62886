"""Pretrained backbones under fresh heads (``model.preset=backbone``).

A backbone checkpoint is the ``model.safetensors`` of a classification model on the hub (or a
local directory in the same layout). transformers backbones — ``SegformerForImageClassification``
(MiT), ``ResNetForImageClassification``, ``SwinForImageClassification`` — are loaded by
transformers itself (``SegformerModel`` / ``ResNetBackbone`` / ``SwinBackbone``
``.from_pretrained``: its key renaming and prefix handling), then copied into the segmentation
model's encoder. ResNet checkpoints in timm's layout (torchvision names ``conv1``, ``layer1``
...) or transformers' (``microsoft/resnet-50``, renamed by :func:`torchvision_name`) load into
DeepLab's torchvision ResNet: keys matched by the prefix pair that matches most of them,
the classifier skipped. A backbone key the checkpoint lacks, or a tensor of another shape, is a
:class:`core.config.ConfigError` naming the key (exit 2) — checked on the driver before Ray
starts (:func:`training.models.check_weights`), and again when a worker loads.

Weights come from ``hf_hub_download(id, revision=...)`` (a pinned commit; offline it reads
the local hub cache) or ``local_path``; never pickle, never remote code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from core.config import ConfigError
from training.config import BackboneConfig, ModelConfig

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# checkpoint keys a backbone has no place for: classification heads, poolers, the final norm
SKIPPABLE = ("classifier", "fc.", "head.", "pooler", "layernorm.", "norm.")
# backbone keys a checkpoint may lack: transformers' BackboneMixin adds a norm per output stage
FRESH = ("hidden_states_norms.",)


def where(b: BackboneConfig) -> str:
    return f"model.backbone ({b.local_path or f'{b.id}@{b.revision}'})"


def resolve_file(b: BackboneConfig, name: str) -> Path:
    """``name`` in the backbone's local directory or its pinned hub revision (the local hub
    cache first; a download where the hub is reachable)."""
    if b.local_path:
        path = Path(b.local_path).expanduser() / name
        if not path.is_file():
            raise ConfigError(f"model.backbone.local_path: {path} not found (expected {name} in the hub layout)")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(b.id, name, revision=b.revision))
    except Exception as exc:  # noqa: BLE001 - offline, no such repo/revision/file: one line naming the key
        raise ConfigError(f"model.backbone.id: cannot get {name} of {b.id}@{b.revision} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def checkpoint_shapes(b: BackboneConfig) -> dict[str, tuple[int, ...]]:
    """Key (torchvision names, see :func:`torchvision_name`) -> shape from the safetensors
    header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(resolve_file(b, WEIGHTS)), framework="pt") as f:
        return {torchvision_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


_HF_RESNET = [(re.compile(r"^(resnet\.)?embedder\.embedder\.convolution\."), "conv1."),
              (re.compile(r"^(resnet\.)?embedder\.embedder\.normalization\."), "bn1."),
              (re.compile(r"^(resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\."),
               lambda m: f"layer{int(m[2]) + 1}.{m[3]}.downsample.0."),
              (re.compile(r"^(resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\."),
               lambda m: f"layer{int(m[2]) + 1}.{m[3]}.downsample.1."),
              (re.compile(r"^(resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\."),
               lambda m: f"layer{int(m[2]) + 1}.{m[3]}.conv{int(m[4]) + 1}."),
              (re.compile(r"^(resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\."),
               lambda m: f"layer{int(m[2]) + 1}.{m[3]}.bn{int(m[4]) + 1}.")]


def torchvision_name(key: str) -> str:
    """A transformers ResNet key (``microsoft/resnet-50``: ``resnet.encoder.stages.0.layers.0
    .layer.1.convolution.weight``) under torchvision's name (``layer1.0.conv2.weight``); other
    keys (timm / torchvision checkpoints) unchanged. Both are ResNet v1.5 (stride in the 3x3)."""
    for pattern, repl in _HF_RESNET:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def _prefixes(keys) -> set[str]:
    return {""} | {k.split(".", 1)[0] + "." for k in keys if "." in k}


def match_keys(theirs: dict[str, tuple], ours: dict[str, tuple]) -> dict[str, str]:
    """Our backbone key -> checkpoint key, by the (strip, add) prefix pair matching most keys."""
    best: dict[str, str] = {}
    for strip in _prefixes(theirs):
        for add in _prefixes(ours):
            found = {add + k[len(strip):]: k for k in theirs if k.startswith(strip) and add + k[len(strip):] in ours}
            if len(found) > len(best):
                best = found
    # a pair matching under half the backbone is a coincidence of names (classifier.bias -> bn1.bias)
    return best if 2 * len(best) >= len(ours) else {}


def problems(theirs: dict[str, tuple], ours: dict[str, tuple], where: str) -> tuple[dict[str, str], str | None]:
    """(mapping, first problem or None): a backbone key missing from the checkpoint, a shape
    that differs, or a checkpoint key left unused that is not a classification head."""
    mapping = match_keys(theirs, ours)
    for key in sorted(ours):
        if key.endswith("num_batches_tracked") or key.startswith(FRESH):
            continue
        if key not in mapping:
            return mapping, f"{where}: weights do not match the architecture: key {key!r} {list(ours[key])} is missing from the checkpoint"
        if tuple(theirs[mapping[key]]) != tuple(ours[key]):
            return mapping, (f"{where}: weights do not match the architecture: key {mapping[key]!r} has shape "
                             f"{list(theirs[mapping[key]])}, the model's {key!r} needs {list(ours[key])}")
    used = set(mapping.values())
    extra = [k for k in sorted(theirs) if k not in used and not any(s in k for s in SKIPPABLE)]
    if extra:
        return mapping, f"{where}: weights do not match the architecture: checkpoint key {extra[0]!r} has no place in the backbone"
    return mapping, None


def backbone_module(model, arch: str):
    """The module a backbone checkpoint loads into."""
    net = getattr(model, "module", model)
    if arch == "segformer":
        return net.segformer
    if arch == "mask2former":
        return net.model.pixel_level_module.encoder
    return net.backbone


HF_BACKBONES = {"segformer": ("transformers.models.segformer.modeling_segformer", "SegformerModel"),
                "resnet": ("transformers.models.resnet.modeling_resnet", "ResNetBackbone"),
                "swin": ("transformers.models.swin.modeling_swin", "SwinBackbone")}


def hf_backbone_config(b: BackboneConfig):
    """The transformers config of a backbone repo (its config.json: MiT, ResNet or Swin)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(b.local_path or b.id, **_revision(b), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where(b)}: no readable transformers config.json ({str(exc).splitlines()[0]})") from None


def _revision(b: BackboneConfig) -> dict[str, str]:
    return {} if b.local_path else {"revision": b.revision}


def load_hf_backbone(b: BackboneConfig, model_type: str, **kwargs):
    """The backbone module loaded by transformers from the checkpoint; a missing backbone key
    (other than the fresh per-stage norms) or a shape mismatch raises ConfigError naming it."""
    import importlib

    module, name = HF_BACKBONES[model_type]
    cls = getattr(importlib.import_module(module), name)
    net, info = cls.from_pretrained(b.local_path or b.id, **_revision(b), use_safetensors=True, trust_remote_code=False,
                                    ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
    bad = sorted(info.get("mismatched_keys") or [])
    if bad:
        key, theirs, ours = bad[0]
        raise ConfigError(f"{where(b)}: weights do not match the architecture: key {key!r} has shape {list(theirs)}, "
                          f"the model needs {list(ours)}")
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(FRESH))
    if missing or info.get("error_msgs"):
        what = f"key {missing[0]!r} is missing from the checkpoint" if missing else info["error_msgs"][0]
        raise ConfigError(f"{where(b)}: weights do not match the architecture: {what}")
    return net


def load_into(model, cfg: ModelConfig) -> None:
    """Copy the backbone checkpoint into ``model``'s backbone (strict: see :func:`problems`)."""
    module = backbone_module(model, cfg.arch)
    if cfg.arch.startswith("deeplab"):
        _load_timm_resnet(module, cfg.backbone)
        return
    kind = "segformer" if cfg.arch == "segformer" else model.config.backbone_config.model_type
    extra = {} if kind == "segformer" else {"out_features": list(model.config.backbone_config.out_features)}
    loaded = load_hf_backbone(cfg.backbone, kind, **extra)
    module.load_state_dict(loaded.state_dict(), strict=True)
    log.info("backbone %s: %d tensors loaded into %s", where(cfg.backbone), len(module.state_dict()), cfg.arch)


def _load_timm_resnet(module, b: BackboneConfig) -> None:
    from safetensors.torch import load_file

    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mapping, problem = problems(checkpoint_shapes(b), ours, where(b))
    if problem:
        raise ConfigError(problem)
    tensors = {torchvision_name(k): v for k, v in load_file(str(resolve_file(b, WEIGHTS))).items()}
    module.load_state_dict({k: tensors[v] for k, v in mapping.items()}, strict=False)
    log.info("backbone %s: %d tensors loaded", where(b), len(mapping))
