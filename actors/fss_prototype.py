"""Training-free few-shot segmenter (FSS) for AlignDiff's mask refinement (seed 000, Sec. 3.5).

AlignDiff needs an FSS model f_theta that is *conditioned* on a set of image-mask pairs
(D_good) and then predicts masks, with no optimisation in either step. We use the simplest
model with that property, a prototype matcher (PANet-style masked average pooling) on a
frozen self-supervised backbone:

- features: the last-layer patch tokens of DINOv2 (``transformers.Dinov2Model``), each
  L2-normalised. DINOv2 patch features are known to separate object parts from background
  without fine-tuning (they are the basis of training-free matchers such as Matcher/PerSAM
  variants), and the model loads through transformers with safetensors weights. Any
  backbone whose ``last_hidden_state`` ends with the patch tokens works (``model=``).
- conditioning: for every class c, the sum of the patch features weighted by the share of
  each patch's pixels labelled c (the mask area-resized to the patch grid), and the sum of
  the weights. The prototype is sum / weight. Because the state is a *sum*, conditioning on
  a grown D_good is adding the new samples' sums — an aggregate Ray Data can compute in
  parallel (``pipelines.aligndiff``), with no driver loop over samples.
- prediction for an image whose target class is t: cosine similarity of every patch to the
  background prototype and to t's, upsampled bilinearly to the image size, argmax. The mask
  holds t or the background id (FSS is binary per episode).

The episode is binary, so the source must have a background class (``background``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors import vision_models as vm
from core.schema import HEIGHT, IGNORE_INDEX, IMAGE_RAW, WIDTH, raw_to_array

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's preprocessing statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_DINOV2: dict = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 37, "patch_size": 4, "image_size": 32}


@dataclass
class PrototypeState:
    """Summed (weighted) features and weights per class id: ``sums`` (K, C), ``weights`` (K,)."""

    sums: np.ndarray
    weights: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> PrototypeState:
        return cls(np.zeros((num_classes, dim), np.float64), np.zeros(num_classes, np.float64))

    def add(self, classes: Sequence[int], sums: np.ndarray, weights: np.ndarray) -> PrototypeState:
        """Accumulate one sample's (or batch's) per-class sums in place; returns self."""
        np.add.at(self.sums, np.asarray(classes, dtype=np.int64), np.asarray(sums, np.float64))
        np.add.at(self.weights, np.asarray(classes, dtype=np.int64), np.asarray(weights, np.float64))
        return self

    def merged(self, other: PrototypeState) -> PrototypeState:
        return PrototypeState(self.sums + other.sums, self.weights + other.weights)

    def to_dict(self) -> dict[str, list]:
        """A small picklable form for actor constructor arguments."""
        return {"sums": self.sums.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrototypeState:
        return cls(np.asarray(data["sums"], np.float64), np.asarray(data["weights"], np.float64))


def tiny_backbone(seed: int = 0) -> Any:
    """A random-weight tiny DINOv2 (tests and the ``tiny`` preset)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval()


class PrototypeFSS:
    """Masked-average-pooling prototypes on frozen patch features; see the module doc."""

    def __init__(self, preset: str, background: int, *, model_id: str | None = None,
                 revision: str | None = None, local_path: str | None = None, dtype: str = "float32",
                 device: str | None = None, image_size: int | None = None, model: Any = None) -> None:
        """Load the backbone once (or take ``model``, ready built — convention 2).

        ``image_size``: side the image is resized to (a multiple of the patch size; None = the
        backbone config's ``image_size``). DINOv2 interpolates its position embeddings, so
        448 (32x32 patches at patch 14) gives finer masks than the 224 it was trained at.
        """
        import torch

        self.background = int(background)
        self.device, self.dtype = vm.device_and_dtype(preset, device, dtype)
        if model is None:
            def load() -> Any:
                from transformers import Dinov2Model

                return vm.load_pretrained(Dinov2Model, model_id, revision, local_path, "fss backbone",
                                          torch_dtype=self.dtype)

            model = vm.build_or_load(preset, "fss", load)
        self.model = model.to(self.device, self.dtype).eval()
        self.patch = int(self.model.config.patch_size)
        size = int(image_size or self.model.config.image_size)
        self.size = max(self.patch, size // self.patch * self.patch)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def features(self, images: Sequence[np.ndarray]) -> Any:
        """(B, C, h, w) unit-norm patch features of uint8 RGB images (any sizes)."""
        import torch
        import torch.nn.functional as F

        x = torch.stack([
            F.interpolate(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0,
                          size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
            for im in images])
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        grid = self.size // self.patch
        with torch.inference_mode():
            hidden = self.model(pixel_values=x).last_hidden_state[:, -grid * grid:]  # drop CLS/registers
        feats = hidden.float().reshape(len(images), grid, grid, -1).permute(0, 3, 1, 2)
        return F.normalize(feats, dim=1).cpu()

    def pooled(self, feats: Any, masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (class ids present, their feature sums (n, C), their weights (n,)).

        The mask is area-resized to the patch grid, so a patch's weight for class c is the
        share of its pixels labelled c; ignored pixels count for no class.
        """
        import torch
        import torch.nn.functional as F

        out = []
        for feat, mask in zip(feats, masks, strict=True):
            mask = np.asarray(mask)
            classes = np.array([c for c in np.unique(mask) if c != IGNORE_INDEX], dtype=np.int64)
            if not len(classes):
                out.append((classes, np.zeros((0, feat.shape[0]), np.float32), np.zeros(0, np.float32)))
                continue
            onehot = torch.from_numpy(mask[None] == classes[:, None, None]).float()[None]
            w = F.interpolate(onehot, size=feat.shape[-2:], mode="area")[0]  # (n, h, w)
            sums = torch.einsum("nhw,chw->nc", w, feat)
            out.append((classes, sums.numpy().astype(np.float32), w.sum(dim=(1, 2)).numpy().astype(np.float32)))
        return out

    def condition(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  num_classes: int, state: PrototypeState | None = None) -> PrototypeState:
        """Add the pairs' per-class sums to ``state`` (a new empty one when None)."""
        state = state or PrototypeState.empty(num_classes, self.dim)
        for classes, sums, weights in self.pooled(self.features(images), masks):
            state.add(classes, sums, weights)
        return state

    def predict(self, feats: Any, state: PrototypeState, targets: Sequence[int],
                sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Binary masks (target id / background id) of images with these features.

        A target class without a prototype (never seen in the conditioning set) predicts
        all background: there is nothing to match.
        """
        import torch
        import torch.nn.functional as F

        protos = torch.from_numpy(state.sums / np.maximum(state.weights, 1e-12)[:, None]).float()
        protos = F.normalize(protos, dim=1)
        masks = []
        for feat, t, (h, w) in zip(feats, targets, sizes, strict=True):
            t = int(t)
            if state.weights[t] <= 0 or state.weights[self.background] <= 0:
                masks.append(np.full((h, w), self.background, np.uint8 if t < 256 else np.uint16))
                continue
            pair = protos[[self.background, t]]  # (2, C)
            sim = torch.einsum("kc,chw->khw", pair, feat)[None]
            sim = F.interpolate(sim, size=(h, w), mode="bilinear", align_corners=False)[0]
            fg = (sim[1] > sim[0]).numpy()
            mask = np.where(fg, t, self.background)
            masks.append(mask.astype(np.uint8 if max(t, self.background) < 256 else np.uint16))
        return masks


def batch_rgb(batch: dict) -> list[np.ndarray]:
    """The uint8 RGB images of a batch's ``image_raw`` column (copies; torch needs writable)."""
    return [np.array(raw_to_array(raw, int(h), int(w), np.uint8, 3))
            for raw, h, w in zip(batch[IMAGE_RAW], batch[HEIGHT], batch[WIDTH], strict=True)]
