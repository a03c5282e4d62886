"""Text2Mask (SegGen): draw a segmentation colour map from a caption, decode it to class ids.

SegGen fine-tunes SDXL to paint the palette colour map of a scene described by a caption and
samples it with 200 EDM steps at resolution 768 (appendix A.4). The map is decoded to class ids
by nearest palette colour (``actors.colormap.color_to_mask``), which absorbs the VAE's colour
drift. Rows are generated in one pipeline call per generation size (aspect bucket), each with
its own seeded generator, so a row's result depends on its seed, not on its batch-mates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from actors.speedups import apply_speedups
from core.schema import (
    HEIGHT,
    MASK_RAW,
    PROMPT,
    PROMPT_TRUNCATED,
    SAMPLE_ID,
    SEED,
    WIDTH,
    require_columns,
)

log = logging.getLogger(__name__)

NEEDED = (SAMPLE_ID, PROMPT, SEED)


class Text2Mask:
    """Caption -> class-id mask, via a text-to-image diffusion pipeline drawing colour maps.

    Input columns: ``sample_id``, ``prompt``, ``seed`` and optionally ``height``/``width`` (only
    their aspect ratio is used). Output adds ``mask_raw`` (H*W bytes, ``mask_dtype`` of the
    palette) and sets ``height``/``width`` (int32) to the generated size: about
    ``resolution**2`` pixels with the target aspect, sides a multiple of the model's
    downsampling factor (see ``diffusion_models.generation_size``).
    """

    def __init__(
        self,
        preset: str,
        palette: np.ndarray | Sequence[Sequence[int]],
        steps: int = 200,
        guidance_scale: float = 5.0,
        resolution: int = 768,
        *,
        family: str | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        dtype: str = "float16",
        device: str | None = None,
        sampler: str = dm.DEFAULT_SAMPLER,
        variant: str | None = None,
        vae: dict | None = None,
        max_rows_per_call: int | None = None,
        size_multiple: int | None = None,
        ignore_color: Sequence[int] | None = None,
        max_distance: float | None = None,
        pipeline: Any = None,
        lora_path: str | None = None,
        speed: dict | None = None,
    ) -> None:
        """Build the pipeline once (or take ``pipeline``, ready built — convention 2).

        ``family`` None means the preset's own (``sdxl`` for ``tiny``); model arguments
        (``sampler``, ``variant``, ``vae`` too) are those of ``diffusion_models.build_pipeline``;
        ``ignore_color``/``max_distance`` go to
        ``color_to_mask``; ``max_rows_per_call`` splits big buckets.
        """
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution
        self.max_rows_per_call = max_rows_per_call
        self.ignore_color, self.max_distance = ignore_color, max_distance
        dm.check_palette(local_path, self.palette)  # a fine-tuned Text2Mask speaks one palette
        self.pipe = pipeline if pipeline is not None else dm.build_pipeline(
            "text2img", preset, family=family, model_id=model_id, revision=revision,
            local_path=local_path, dtype=dtype, device=device, sampler=sampler, variant=variant,
            vae=vae, lora_path=lora_path)
        if speed:  # actors/speedups.py: compile, fused QKV, channels-last
            log.info("%s speed-ups: %s", type(self).__name__, ", ".join(apply_speedups(self.pipe, **speed)))
        self.multiple = size_multiple or dm.size_multiple(self.pipe)
        self.calls = 0  # pipeline calls made, for logs and tests

    def generation_sizes(self, batch: dict) -> list[tuple[int, int]]:
        """Generation (height, width) per row; square at ``resolution`` without a target."""
        n = len(batch[PROMPT])
        hs = batch.get(HEIGHT, [None] * n)
        ws = batch.get(WIDTH, [None] * n)
        return [dm.generation_size(h, w, self.resolution, self.multiple) for h, w in zip(hs, ws, strict=True)]

    def __call__(self, batch: dict) -> dict:
        """Add ``mask_raw``, ``height``, ``width``: one pipeline call per size bucket."""
        from actors.colormap import color_to_mask

        require_columns(batch, NEEDED, "Text2Mask")
        prompts, truncated = dm.fit_prompts(self.pipe.tokenizer, [str(p) for p in batch[PROMPT]])
        seeds = np.asarray(batch[SEED], dtype=np.int64)
        sizes = self.generation_sizes(batch)
        masks: list[bytes] = [b""] * len(prompts)
        for (gh, gw), rows in dm.buckets(sizes, self.max_rows_per_call):
            out = self.pipe(
                prompt=[prompts[i] for i in rows],
                generator=dm.seeded_generators(seeds[rows]),
                height=gh, width=gw, num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale, output_type="np",
            )
            self.calls += 1
            colors = dm.images_to_uint8(out.images)
            for color, i in zip(colors, rows, strict=True):
                mask = color_to_mask(color, self.palette, ignore_color=self.ignore_color,
                                     max_distance=self.max_distance)
                masks[i] = np.ascontiguousarray(mask).tobytes()
            log.debug("Text2Mask: %d rows at %dx%d", len(rows), gw, gh)
        result = dict(batch)
        result[MASK_RAW] = np.array(masks, dtype=object)
        result[PROMPT] = np.array(prompts, dtype=object)
        result[PROMPT_TRUNCATED] = truncated
        result[HEIGHT] = np.array([s[0] for s in sizes], dtype=np.int32)
        result[WIDTH] = np.array([s[1] for s in sizes], dtype=np.int32)
        return result
