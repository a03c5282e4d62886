"""SAM (the ``segment_anything`` package): one mask per detected box, merged into a class-id map.

Diffusion Synthesis' mask generator prompts SAM (ViT-H in the paper) with each Grounding DINO box
(``multimask_output=False``, as Grounded-SAM does). The image encoder — nearly all of SAM's
cost — runs once per batch on the stacked images; the light prompt encoder and mask decoder run
once per image on all of its boxes (SAM's own ``Sam.forward`` splits the work the same way).

Merging: a pixel belongs to a box's mask where SAM's mask probability is above 0.5; where masks
overlap, the mask with the higher score (detection score x SAM's predicted IoU) wins; pixels no
mask covers are background (or 255 when the classes have no background). With
``uncertain_band`` > 0, pixels whose best mask probability lies within the band around 0.5 —
SAM is unsure whether they are object or not — become 255 (ignore) instead.

Real weights come from a SAM checkpoint path: ``.safetensors``, or the official ``.pth`` read
with ``torch.load(weights_only=True)`` (plain tensors only; never unpickling objects).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from actors import vision_models as vm
from core.schema import BOX_LABELS, BOX_SCORES, BOXES, IGNORE_INDEX, IMAGE_RAW, MASK_RAW

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_h", "vit_l", "vit_b")


def tiny_sam(seed: int = 0, image_size: int = 64) -> Any:
    """A tiny ``Sam`` (small ImageEncoderViT, 16-d prompts) with random weights, deterministic."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    patch, dim = 8, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=image_size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
                                      mlp_ratio=2.0, out_chans=dim, use_rel_pos=True, window_size=4,
                                      global_attn_indexes=(0,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(image_size // patch,) * 2,
                                     input_image_size=(image_size, image_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1,
                                 iou_head_hidden_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def load_sam(model_type: str, checkpoint: str) -> Any:
    """A real SAM from its registry architecture + a checkpoint file (tensors only)."""
    import torch
    from segment_anything import sam_model_registry

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {MODEL_TYPES}")
    if not checkpoint:
        raise ValueError("sam.checkpoint: give the path of a SAM checkpoint (e.g. sam_vit_h_4b8939.pth)")
    from core.storage import local_copy  # a URI: fetched once per node

    checkpoint = local_copy(str(checkpoint), "sam.checkpoint")
    sam = sam_model_registry[model_type](checkpoint=None)  # the registry's own loader unpickles
    if str(checkpoint).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam.eval()


def merge_masks(probs: np.ndarray, labels: np.ndarray, scores: np.ndarray, background: int | None,
                uncertain_band: float = 0.0, dtype: Any = np.uint8) -> np.ndarray:
    """(N, H, W) mask probabilities + class ids + scores -> one (H, W) class-id map (see module doc)."""
    n, h, w = probs.shape
    fill = IGNORE_INDEX if background is None else background
    out = np.full((h, w), fill, dtype=dtype)
    if n == 0:
        return out
    covered = probs > 0.5
    ranked = np.where(covered, np.asarray(scores, dtype=np.float32)[:, None, None], -np.inf)
    winner = ranked.argmax(axis=0)
    any_cover = covered.any(axis=0)
    out[any_cover] = np.asarray(labels)[winner[any_cover]].astype(dtype)
    if uncertain_band > 0:
        best = probs.max(axis=0)
        out[np.abs(best - 0.5) < uncertain_band] = IGNORE_INDEX
    return out


class SamMasks:
    """Images + boxes -> ``mask_raw`` (class ids, ``mask_dtype``).

    Input: ``image_column`` (``image_raw``) + ``height`` + ``width`` and the box columns of
    :class:`actors.grounding.Grounding` under ``prefix``. Output: ``mask_column``.
    """

    def __init__(
        self,
        background: int | None = 0,
        mask_dtype: str = "|u1",
        preset: str = "tiny",
        *,
        model_type: str = "vit_h",
        checkpoint: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        uncertain_band: float = 0.0,
        image_column: str = IMAGE_RAW,
        prefix: str = "",
        mask_column: str = MASK_RAW,
        sam: Any = None,
    ) -> None:
        """Build or load SAM once (``sam`` given ready built wins)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        self.background, self.mask_dtype = background, np.dtype(mask_dtype)
        self.uncertain_band = uncertain_band
        self.image_column, self.prefix, self.mask_column = image_column, prefix, mask_column
        self.device, self.dtype = vm.device_and_dtype(preset, device, dtype)
        if sam is None:
            sam = vm.build_or_load(preset, "sam", lambda: load_sam(model_type, checkpoint or ""))
        self.sam = sam.to(self.device, self.dtype).eval()
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self.calls = 0  # image-encoder calls (one per batch), for logs and tests

    def __call__(self, batch: dict) -> dict:
        """Add ``mask_column``: one image-encoder call for the batch, one decoder call per image."""
        import torch

        images = vm.batch_images(batch, self.image_column)
        inputs = [torch.as_tensor(self.transform.apply_image(im)).permute(2, 0, 1).contiguous() for im in images]
        sizes = [tuple(x.shape[-2:]) for x in inputs]
        with torch.inference_mode():
            stacked = torch.stack([self.sam.preprocess(x.to(self.device, torch.float32)) for x in inputs])
            embeddings = self.sam.image_encoder(stacked.to(self.dtype))
            self.calls += 1
            masks = [self._decode(embeddings[i:i + 1], batch, i, sizes[i], images[i].shape[:2])
                     for i in range(len(images))]
        return {self.mask_column: np.array([m.tobytes() for m in masks], dtype=object)}

    def _decode(self, embedding: Any, batch: dict, i: int, input_size: tuple[int, int],
                size: tuple[int, int]) -> np.ndarray:
        import torch

        boxes = vm.bytes_to_floats(batch[self.prefix + BOXES][i], 4)
        labels = np.frombuffer(batch[self.prefix + BOX_LABELS][i], dtype="<i4")
        scores = vm.bytes_to_floats(batch[self.prefix + BOX_SCORES][i])
        if len(boxes) == 0:
            return merge_masks(np.zeros((0, *size), np.float32), labels, scores, self.background,
                               self.uncertain_band, self.mask_dtype)
        box_t = torch.as_tensor(self.transform.apply_boxes(boxes, size), device=self.device, dtype=self.dtype)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_t, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        logits = self.sam.postprocess_masks(low_res.float(), input_size, size)[:, 0]
        probs = torch.sigmoid(logits).cpu().numpy()
        quality = np.clip(iou[:, 0].float().cpu().numpy(), 0.0, None)
        return merge_masks(probs, labels, scores * quality, self.background, self.uncertain_band,
                           self.mask_dtype)
