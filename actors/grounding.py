"""Grounding DINO (transformers): boxes for the target class names in each image.

Diffusion Synthesis' mask generator detects the target classes with Grounding DINO, then SAM
turns each box into a mask (``actors/sam.py``, its own pool). The text prompt is the class names
joined Grounded-SAM style, "cat . dog . potted plant ."; a query's score is its highest token
probability (sigmoid of the logits), its label the class whose tokens score highest, and it is
kept when the score passes ``box_threshold`` and its class's tokens pass ``text_threshold``
(Grounding DINO's two thresholds; defaults from Grounded-SAM's demo: 0.3 and 0.25). Boxes of
one class that overlap above ``nms_threshold`` are merged by NMS (Grounded-SAM: 0.8).

Batching: one model call per image size in the batch (images of one size share a tensor with no
padding, so a row's boxes never depend on which rows share its batch). Class lists too long for
the text encoder are split into chunks, one call each. Output columns are flat: boxes as
float32 bytes (N x 4, pixel x0 y0 x1 y1), labels as int32 bytes, scores as float32 bytes, and
the count N.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors import vision_models as vm
from core.classnames import readable
from core.schema import BOX_COUNT, BOX_LABELS, BOX_SCORES, BOXES, IMAGE_RAW

log = logging.getLogger(__name__)


def tiny_grounding(seed: int = 0, max_text_len: int = 128) -> tuple[Any, Any]:
    """(model, processor): a tiny Grounding DINO (Swin + BERT-like text), random weights."""
    import torch
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tok = vm.make_bert_tokenizer(max_text_len)
    swin = SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      image_size=64, out_indices=[2, 3, 4])
    text = {"model_type": "bert", "vocab_size": len(tok), "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": max_text_len}
    # d_model 32: the input projections use GroupNorm(32, d_model); 2 decoder layers: the box
    # heads of layers 1.. are tied to layer 0's.
    config = GroundingDinoConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=16, encoder_n_points=2, decoder_n_points=2,
        backbone_config=swin, text_config=text, max_text_len=max_text_len)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok)


def phrase_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """"cat . dog ." and each phrase's character span in it."""
    text, spans = "", []
    for phrase in phrases:
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + " . "
    return text.strip(), spans


class Grounding:
    """Images -> boxes of the target classes (every class but ``background``).

    Input: ``image_raw`` + ``height`` + ``width`` (``image_column`` picks another raw column,
    e.g. the generated variant for re-segmentation). Output: ``{prefix}boxes``,
    ``{prefix}box_labels`` (class ids), ``{prefix}box_scores``, ``{prefix}box_count``.
    """

    def __init__(
        self,
        classes: Sequence[str],
        background: int | None = 0,
        preset: str = "tiny",
        *,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        variant: str | None = None,
        dtype: str = "float16",
        device: str | None = None,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        nms_threshold: float = 0.8,
        max_boxes: int = 32,
        image_column: str = IMAGE_RAW,
        prefix: str = "",
        model: Any = None,
        processor: Any = None,
    ) -> None:
        """Load once (or take ``model``/``processor`` ready built); split the classes into
        text chunks that fit the text encoder."""
        self.targets = [(i, readable(n).lower()) for i, n in enumerate(classes) if i != background]
        if not self.targets:
            raise ValueError("Grounding: no target classes (every class is the background)")
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.nms_threshold, self.max_boxes = nms_threshold, max_boxes
        self.image_column, self.prefix = image_column, prefix
        self.device, self.dtype = vm.device_and_dtype(preset, device, dtype)
        if model is None or processor is None:
            def load() -> tuple[Any, Any]:
                from transformers import AutoProcessor, GroundingDinoForObjectDetection

                return (vm.load_pretrained(GroundingDinoForObjectDetection, model_id, revision, local_path,
                                           "grounding", dtype=self.dtype, variant=variant),
                        vm.load_pretrained(AutoProcessor, model_id, revision, local_path, "grounding", weights=False))

            model, processor = vm.build_or_load(preset, "grounding", load)
        self.model, self.processor = model.to(self.device).eval(), processor
        self.chunks = self._chunks(int(model.config.max_text_len))
        self.calls = 0  # model calls made, for logs and tests

    def _chunks(self, max_len: int) -> list[tuple[str, np.ndarray, list[int]]]:
        """(text, token -> target index or -1, class ids) per chunk of targets that fits."""
        chunks, start = [], 0
        while start < len(self.targets):
            end = len(self.targets)
            while True:
                part = self.targets[start:end]
                text, spans = phrase_prompt([p for _, p in part])
                enc = self.processor.tokenizer(text, return_offsets_mapping=True)
                if len(enc["input_ids"]) <= max_len or end == start + 1:
                    break
                end = start + max(1, (end - start) // 2)
            token_target = np.full(max_len, -1, dtype=np.int64)
            for t, (a, b) in enumerate(enc["offset_mapping"][:max_len]):
                for k, (s, e) in enumerate(spans):
                    if b > a and s <= a and b <= e:
                        token_target[t] = k
            chunks.append((text, token_target, [c for c, _ in part]))
            start = end
        if len(chunks) > 1:
            log.info("Grounding: %d classes in %d text chunks", len(self.targets), len(chunks))
        return chunks

    def __call__(self, batch: dict) -> dict:
        """Add the box columns: one model call per (image size, text chunk)."""
        images = vm.batch_images(batch, self.image_column)
        found: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in images]
        for rows in _size_groups(images):
            for text, token_target, class_ids in self.chunks:
                for i, result in zip(rows, self._detect([images[i] for i in rows], text, token_target,
                                                        class_ids), strict=True):
                    found[i].append(result)
        cols: dict[str, list] = {BOXES: [], BOX_LABELS: [], BOX_SCORES: [], BOX_COUNT: []}
        for parts, image in zip(found, images, strict=True):
            boxes, labels, scores = self._nms(*(np.concatenate(p) for p in zip(*parts, strict=True)),
                                              image.shape[:2])
            cols[BOXES].append(vm.floats_to_bytes(boxes))
            cols[BOX_LABELS].append(labels.astype("<i4").tobytes())
            cols[BOX_SCORES].append(vm.floats_to_bytes(scores))
            cols[BOX_COUNT].append(len(scores))
        return {self.prefix + BOXES: np.array(cols[BOXES], dtype=object),
                self.prefix + BOX_LABELS: np.array(cols[BOX_LABELS], dtype=object),
                self.prefix + BOX_SCORES: np.array(cols[BOX_SCORES], dtype=object),
                self.prefix + BOX_COUNT: np.array(cols[BOX_COUNT], dtype=np.int64)}

    def _detect(self, images: list[np.ndarray], text: str, token_target: np.ndarray,
                class_ids: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One model call on same-size images: per image (xyxy pixel boxes, class ids, scores)."""
        import torch

        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt",
                                padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model(**inputs)
        self.calls += 1
        probs = out.logits.float().sigmoid().cpu().numpy()  # (B, Q, max_text_len)
        centers = out.pred_boxes.float().cpu().numpy()  # (B, Q, 4) cx cy w h in [0, 1]
        h, w = images[0].shape[:2]
        tt = token_target[: probs.shape[-1]]
        on_target = tt >= 0
        results = []
        for p, c in zip(probs, centers, strict=True):
            per_class = np.zeros((p.shape[0], len(class_ids)), dtype=np.float32)
            for k in range(len(class_ids)):
                per_class[:, k] = p[:, tt == k].max(axis=1, initial=0.0)
            score = p[:, on_target].max(axis=1, initial=0.0)
            label = per_class.argmax(axis=1)
            keep = (score > self.box_threshold) & (per_class[np.arange(len(label)), label] > self.text_threshold)
            cx, cy, bw, bh = c[keep].T
            boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], axis=1)
            boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
            results.append((boxes.reshape(-1, 4), np.asarray(class_ids)[label[keep]].astype(np.int32),
                            score[keep].astype(np.float32)))
        return results

    def _nms(self, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
             size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class NMS, drop empty boxes, keep the ``max_boxes`` best (best first)."""
        import torch
        from torchvision.ops import batched_nms

        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels, scores = boxes[valid], labels[valid], scores[valid]
        if len(scores):
            keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                               torch.from_numpy(labels.astype(np.int64)), self.nms_threshold).numpy()
            keep = keep[: self.max_boxes]
            boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        return boxes.reshape(-1, 4), labels, scores


def _size_groups(images: list[np.ndarray]) -> list[list[int]]:
    """Row indices grouped by image size, first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(i)
    return list(groups.values())
