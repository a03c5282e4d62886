"""AlignDiff generation: text-to-image with bank embeddings, image + coarse attention mask in one pass.

The learned instance embeddings (``actors.textual_inversion`` bank) are installed as new tokens
of the pipeline's tokenizer(s) once per actor, so a prompt "a photo of a <aligndiff-3> sofa"
uses them; a plain "a photo of a sofa" does not. While the pipeline samples, the UNet's
cross-attention to the class noun's tokens is captured (``actors.attention_capture``, the
approach of Hertz et al. that AlignDiff builds its coarse masks on): the map is averaged over
the chosen UNet levels and steps, min-max scaled to [0, 1] (a softmax over the prompt's tokens
has a floor: dividing by the maximum alone would put most of a flat map above any threshold),
upsampled bilinearly to the image and thresholded — the coarse mask holds the target class where the map exceeds
``coarse_threshold``, else the background id. The refinement (``pipelines.graphs.aligndiff.refine``)
fixes what this gets wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from core.schema import (
    HEIGHT,
    IMAGE_RAW,
    MASK_RAW,
    PROMPT,
    PROMPT_TRUNCATED,
    SEED,
    WIDTH,
    require_columns,
)

log = logging.getLogger(__name__)

TARGET_CLASS = "aligndiff_class"
CLASS_NAME = "aligndiff_class_name"
NEEDED = (PROMPT, SEED, TARGET_CLASS, CLASS_NAME)


def noun_positions(tokenizer: Any, prompt: str, noun: str) -> list[int]:
    """Positions (start token = 0) of the last occurrence of ``noun``'s tokens in ``prompt``."""
    ids = tokenizer(prompt).input_ids
    word = tokenizer(noun, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word), -1, -1):
        if ids[start:start + len(word)] == word:
            return list(range(start, start + len(word)))
    raise ValueError(f"class noun {noun!r} not found in the prompt {prompt!r}")


def coarse_masks(maps: np.ndarray, targets: Sequence[int], background: int, size: tuple[int, int],
                 threshold: float, dtype: str) -> list[np.ndarray]:
    """(B, h, w) attention maps -> (H, W) class-id masks: target where the min-max scaled map
    exceeds ``threshold`` (a constant map gives no foreground)."""
    import torch
    import torch.nn.functional as F

    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[:, None].float(), size=size,
                       mode="bilinear", align_corners=False)[:, 0].numpy()
    out = []
    for m, t in zip(up, targets, strict=True):
        low, span = float(m.min()), float(m.max() - m.min())
        fg = (m - low) / span > threshold if span > 0 else np.zeros_like(m, bool)
        out.append(np.where(fg, int(t), background).astype(dtype))
    return out


class AlignDiffGenerator:
    """Prompts (with bank tokens) -> ``image_raw`` + coarse ``mask_raw`` at ``resolution``²."""

    def __init__(self, preset: str, bank: str, background: int, mask_dtype: str = "|u1", steps: int = 50,
                 guidance_scale: float = 7.5, resolution: int = 512, *, family: str | None = None,
                 model_id: str | None = None, revision: str | None = None, local_path: str | None = None,
                 dtype: str = "float16", device: str | None = None, attention_factors: Sequence[int] = (4,),
                 attention_steps: tuple[int, int] | None = None, coarse_threshold: float = 0.5,
                 pipeline: Any = None) -> None:
        """Build the pipeline (or take ``pipeline`` — convention 2) and install the bank."""
        from actors.textual_inversion import install_tokens, load_bank

        self.background, self.mask_dtype = int(background), mask_dtype
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution
        self.factors, self.step_range = tuple(attention_factors), attention_steps
        self.threshold = coarse_threshold
        self.pipe = pipeline if pipeline is not None else dm.build_pipeline(
            "text2img", preset, family=family, model_id=model_id, revision=revision, local_path=local_path,
            dtype=dtype, device=device)
        entries, embeddings, _ = load_bank(bank)
        tokens = [e.token for e in entries]
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        for (tok_name, enc_name), vectors in zip(pairs, embeddings, strict=False):
            encoder = getattr(self.pipe, enc_name, None)
            if encoder is None:
                raise ValueError(f"aligndiff.bank: {bank} holds embeddings for {len(embeddings)} text encoder(s); "
                                 f"this pipeline has no {enc_name}")
            if vectors.shape[1] != encoder.get_input_embeddings().embedding_dim:
                raise ValueError(f"aligndiff.bank: {bank} embeddings are {vectors.shape[1]}-d, {enc_name} takes "
                                 f"{encoder.get_input_embeddings().embedding_dim}-d (trained on another model?)")
            install_tokens(getattr(self.pipe, tok_name), encoder, tokens, vectors=vectors)
        self.multiple = dm.size_multiple(self.pipe)
        self.side = max(self.multiple, resolution // self.multiple * self.multiple)
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        from actors.attention_capture import AttentionStore

        require_columns(batch, NEEDED, "AlignDiffGenerator")
        tok = self.pipe.tokenizer
        prompts, truncated = dm.fit_prompts(tok, [str(p) for p in batch[PROMPT]])
        targets = [int(t) for t in batch[TARGET_CLASS]]
        groups = [[noun_positions(tok, p, str(n))] for p, n in zip(prompts, batch[CLASS_NAME], strict=True)]
        store = AttentionStore(groups, factors=self.factors, step_range=self.step_range,
                               seq_len=tok.model_max_length)
        with store.attached(self.pipe.unet):
            out = self.pipe(prompt=prompts, generator=dm.seeded_generators(np.asarray(batch[SEED], np.int64)),
                            height=self.side, width=self.side, num_inference_steps=self.steps,
                            guidance_scale=self.guidance_scale, output_type="np")
        self.calls += 1
        images = dm.images_to_uint8(out.images)
        masks = coarse_masks(store.maps()[:, 0], targets, self.background, (self.side, self.side),
                             self.threshold, self.mask_dtype)
        result = dict(batch)
        result[IMAGE_RAW] = np.array([np.ascontiguousarray(im).tobytes() for im in images], dtype=object)
        result[MASK_RAW] = np.array([m.tobytes() for m in masks], dtype=object)
        result[PROMPT] = np.array(prompts, dtype=object)
        result[PROMPT_TRUNCATED] = truncated
        result[HEIGHT] = np.full(len(prompts), self.side, np.int32)
        result[WIDTH] = np.full(len(prompts), self.side, np.int32)
        return result
