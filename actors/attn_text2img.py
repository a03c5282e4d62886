"""attn2mask generation: a text-to-image pass that also returns each class's cross-attention map.

attn2mask labels an image made by Stable Diffusion with the model's own text-to-image
cross-attention (seed 002). One sampling pass makes both: ``actors.attention_capture``
records the conditional half's attention probabilities of each class's prompt tokens while the
unchanged UNet draws the image (bit-identical to a run without capture). Which tokens belong to
which class comes from the ``class_spans`` column (character spans in the prompt, written by the
prompt stage) mapped to token positions with the tokenizer's offsets.

Rows are generated in one pipeline call per generation size, each with its own seeded
generator, as the other diffusion actors do. A DreamBooth-LoRA adapter (attn2mask's domain
adaptation; ``training.finetune`` writes ``pytorch_lora_weights.safetensors``) loads with
diffusers' ``load_lora_weights``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from actors.attention_capture import AttentionStore
from core.schema import (
    ATTN_CLASS_IDS,
    ATTN_HEIGHT,
    ATTN_RAW,
    ATTN_WIDTH,
    CLASS_SPANS,
    GENERATOR,
    HEIGHT,
    IMAGE_RAW,
    PROMPT,
    PROMPT_TRUNCATED,
    SAMPLE_ID,
    SEED,
    WIDTH,
    require_columns,
)

log = logging.getLogger(__name__)

NEEDED = (SAMPLE_ID, PROMPT, SEED, CLASS_SPANS)


def token_groups(tokenizer: Any, prompt: str, spans: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Token positions (in the padded sequence, start token at 0) of each class's spans.

    ``spans`` holds ``[class_id, start, end)`` character spans; a token belongs to a class when
    its character offsets overlap one of the class's spans. Classes whose tokens were all cut
    by the tokenizer's length limit are left out. Returns (groups, class ids), in first-span order.
    """
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length,
                    return_offsets_mapping=True)
    by_class: dict[int, set[int]] = {}
    for class_id, start, end in spans:
        hits = {pos for pos, (a, b) in enumerate(enc.offset_mapping) if b > a and a < end and b > start}
        if hits:
            by_class.setdefault(int(class_id), set()).update(hits)
    ids = list(by_class)
    return [sorted(by_class[c]) for c in ids], ids


class AttnText2Img:
    """Prompt -> RGB image + per-class cross-attention maps (attn2mask).

    Input columns: ``sample_id``, ``prompt``, ``seed``, ``class_spans`` (JSON list of
    ``[class_id, start, end]``). Output adds ``image_raw`` (H*W*3 uint8 bytes), ``height``,
    ``width`` (int32), ``attn_raw`` (float32 bytes, [G, attn_height, attn_width], G = classes
    found in the prompt's tokens), ``attn_height``/``attn_width`` (int32), ``attn_class_ids``
    (int32 bytes [G]), ``generator`` and ``prompt_truncated``.
    """

    def __init__(
        self,
        preset: str,
        family: str | None = None,
        steps: int = 100,
        guidance_scale: float = 7.5,
        resolution: int = 512,
        attention_factors: Sequence[int] = (4,),
        step_window: tuple[float, float] = (0.5, 0.51),
        *,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        lora_path: str | None = None,
        lora_scale: float = 1.0,
        dtype: str = "float16",
        device: str | None = None,
        sampler: str = dm.DEFAULT_SAMPLER,
        variant: str | None = None,
        max_rows_per_call: int | None = None,
        capture: bool = True,
        pipeline: Any = None,
    ) -> None:
        """Build the text-to-image pipeline once (or take ``pipeline`` ready built).

        ``attention_factors``: latent downsampling factors captured (4 = SD1.5's 16x16 level at
        512 px). ``step_window``: fractions ``[start, stop)`` of the sampling steps captured
        (step i is captured when start <= i/steps < stop; at least one step always is).
        ``capture=False`` makes images only (benchmarks: the cost of capturing).
        """
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution
        self.factors = tuple(int(f) for f in attention_factors)
        self.step_range = _step_range(step_window, steps)
        self.max_rows_per_call, self.capture = max_rows_per_call, capture
        self.generator_name = dm.generator_name(preset, model_id=model_id, revision=revision,
                                                local_path=local_path)
        self.pipe = pipeline if pipeline is not None else dm.build_pipeline(
            "text2img", preset, family=family, model_id=model_id, revision=revision,
            local_path=local_path, dtype=dtype, device=device, sampler=sampler, variant=variant)
        if lora_path:
            from core.storage import local_copy  # a URI: fetched once per node

            self.pipe.load_lora_weights(local_copy(lora_path, "lora_path"), adapter_name="attn2mask")
            self.pipe.set_adapters(["attn2mask"], adapter_weights=[lora_scale])
            self.generator_name += f"+lora:{lora_path}"
        self.multiple = dm.size_multiple(self.pipe)
        self.calls = 0  # pipeline calls made, for logs and tests

    def __call__(self, batch: dict) -> dict:
        """Add the image and attention columns: one pipeline call per size bucket."""
        require_columns(batch, NEEDED, "AttnText2Img")
        tok = self.pipe.tokenizer
        prompts, truncated = dm.fit_prompts(tok, [str(p) for p in batch[PROMPT]])
        seeds = np.asarray(batch[SEED], dtype=np.int64)
        n = len(prompts)
        hs = batch.get(HEIGHT, [None] * n)
        ws = batch.get(WIDTH, [None] * n)
        sizes = [dm.generation_size(h or None, w or None, self.resolution, self.multiple)
                 for h, w in zip(hs, ws, strict=True)]
        groups, class_ids = zip(*(token_groups(tok, p, json.loads(s))
                                  for p, s in zip(prompts, batch[CLASS_SPANS], strict=True)), strict=True)
        images: list[bytes] = [b""] * n
        attn: list[bytes] = [b""] * n
        attn_hw = np.zeros((n, 2), dtype=np.int32)
        for (gh, gw), rows in dm.buckets(sizes, self.max_rows_per_call):
            # a row without any class token still gets its image; its (empty) group is ignored
            store = AttentionStore([groups[i] or [[0]] for i in rows], self.factors, self.step_range,
                                   seq_len=tok.model_max_length)
            kwargs = {"prompt": [prompts[i] for i in rows], "generator": dm.seeded_generators(seeds[rows]),
                      "height": gh, "width": gw, "num_inference_steps": self.steps,
                      "guidance_scale": self.guidance_scale, "output_type": "np"}
            if self.capture:
                with store.attached(self.pipe.unet):
                    out = self.pipe(**kwargs)
                maps = store.maps()
            else:
                out, maps = self.pipe(**kwargs), None
            self.calls += 1
            finite = np.isfinite(np.asarray(out.images, dtype=np.float32)).all(axis=(1, 2, 3))
            for j, (img, ok, i) in enumerate(zip(dm.images_to_uint8(out.images), finite, rows, strict=True)):
                if ok:  # a non-finite (fp16 VAE) image stays empty; the checks name it
                    images[i] = np.ascontiguousarray(img).tobytes()
                if maps is not None and groups[i]:
                    g = len(groups[i])
                    attn[i] = np.ascontiguousarray(maps[j, :g], dtype=np.float32).tobytes()
                    attn_hw[i] = maps.shape[-2:]
            log.debug("AttnText2Img: %d rows at %dx%d", len(rows), gw, gh)
        result = dict(batch)
        result[IMAGE_RAW] = np.array(images, dtype=object)
        result[HEIGHT] = np.array([s[0] for s in sizes], dtype=np.int32)
        result[WIDTH] = np.array([s[1] for s in sizes], dtype=np.int32)
        result[ATTN_RAW] = np.array(attn, dtype=object)
        result[ATTN_HEIGHT], result[ATTN_WIDTH] = attn_hw[:, 0], attn_hw[:, 1]
        result[ATTN_CLASS_IDS] = np.array([np.asarray(c, dtype=np.int32).tobytes() for c in class_ids],
                                          dtype=object)
        result[PROMPT] = np.array(prompts, dtype=object)
        result[PROMPT_TRUNCATED] = truncated
        result[GENERATOR] = np.array([self.generator_name] * n, dtype=object)
        return result


def _step_range(window: Sequence[float], steps: int) -> tuple[int, int]:
    """Step indices [start, stop) of the fractions ``window``; never empty."""
    lo, hi = float(window[0]), float(window[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"step_window must be 0 <= start < stop <= 1, got {list(window)}")
    start = min(int(np.ceil(lo * steps - 1e-9)), steps - 1)
    stop = max(int(np.ceil(hi * steps - 1e-9)), start + 1)
    return start, stop
