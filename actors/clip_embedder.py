"""CLIP image embeddings (transformers ``CLIPVisionModelWithProjection``) for image selection.

Diffusion Synthesis keeps a generated variant when the cosine similarity between it and the real
image it came from exceeds ε (its Eq. 2). This actor embeds both in one model call per batch:
the variants (``image_raw``) and the real images (``source_image_raw``). The K variants of one
source carry the same real image, so identical real images in a batch are embedded once.
Embeddings are L2-normalised float32 bytes, so the similarity is a dot product
(``pipelines/graphs/factory/selection.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from actors import vision_models as vm
from core.schema import CLIP_EMBEDDING, CLIP_SOURCE_EMBEDDING, IMAGE_RAW, SOURCE_IMAGE_RAW

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = {IMAGE_RAW: CLIP_EMBEDDING, SOURCE_IMAGE_RAW: CLIP_SOURCE_EMBEDDING}


def tiny_clip(seed: int = 0) -> tuple[Any, Any]:
    """(model, image processor) of a tiny CLIP vision tower with projection, random weights."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    return model, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


class ClipEmbedder:
    """Raw image columns -> unit-norm embedding columns (``columns``: input -> output name)."""

    def __init__(
        self,
        preset: str = "tiny",
        *,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        variant: str | None = None,
        dtype: str = "float16",
        device: str | None = None,
        columns: Mapping[str, str] | None = None,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        """Load once (or take ``model``/``processor`` ready built)."""
        self.columns = dict(columns or DEFAULT_COLUMNS)
        self.device, self.dtype = vm.device_and_dtype(preset, device, dtype)
        if model is None or processor is None:
            def load() -> tuple[Any, Any]:
                from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

                return (vm.load_pretrained(CLIPVisionModelWithProjection, model_id, revision, local_path, "clip",
                                           dtype=self.dtype, variant=variant),
                        vm.load_pretrained(CLIPImageProcessor, model_id, revision, local_path, "clip", weights=False))

            model, processor = vm.build_or_load(preset, "clip", load)
        self.model, self.processor = model.to(self.device).eval(), processor
        self.calls = 0  # model calls made, for logs and tests

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 unit vectors; one model call."""
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model(pixel_values=pixels.to(self.device, self.dtype)).image_embeds
        self.calls += 1
        out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict) -> dict:
        """Add one embedding column per input column present, embedding unique images once."""
        unique: dict[tuple, int] = {}
        slots: dict[str, list[int]] = {}
        images: list[np.ndarray] = []
        for column in self.columns:
            if column not in batch:
                continue
            decoded = vm.batch_images(batch, column)
            index = []
            for raw, image in zip(batch[column], decoded, strict=True):
                key = (bytes(raw), image.shape[:2])
                if key not in unique:
                    unique[key] = len(images)
                    images.append(image)
                index.append(unique[key])
            slots[column] = index
        if not slots:
            raise KeyError(f"ClipEmbedder: batch has none of {list(self.columns)}; has {sorted(batch)}")
        vectors = self.embed(images)
        log.debug("ClipEmbedder: %d images for %d rows", len(images), len(next(iter(batch.values()))))
        return {self.columns[c]: np.array([vectors[j].tobytes() for j in idx], dtype=object)
                for c, idx in slots.items()}
