"""Mask2Img (SegGen): an image for a given segmentation colour map, via ControlNet.

SegGen's Mask2Img is a ControlNet on SDXL conditioned on the palette colour map, sampled with
40 EDM steps at resolution 768 (appendix A.4). We generate at about ``resolution**2`` pixels
with the mask's aspect (sides a multiple of the model's downsampling factor), feed the colour
map resized with NEAREST (no blended colours that would mean other classes), and resize the
image back to exactly the mask's (height, width) with Lanczos: ImgSyn keeps the real mask
untouched, so the image must match it pixel for pixel, not the other way round.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from actors.speedups import apply_speedups
from core.schema import (
    COLOR_RAW,
    GENERATOR,
    HEIGHT,
    IMAGE_RAW,
    PROMPT,
    PROMPT_TRUNCATED,
    SAMPLE_ID,
    SEED,
    WIDTH,
    raw_to_array,
    require_columns,
)

log = logging.getLogger(__name__)

NEEDED = (SAMPLE_ID, PROMPT, SEED, COLOR_RAW, HEIGHT, WIDTH)


class Mask2Img:
    """Colour map + prompt -> RGB image at the mask's exact size.

    Input columns: ``sample_id``, ``prompt``, ``seed``, ``color_raw`` (H*W*3 uint8 bytes),
    ``height``, ``width``. Output adds ``image_raw`` (H*W*3 uint8 bytes, same H, W) and
    ``generator`` (``model_id@revision[+controlnet_id@revision]``, ``tiny-random`` or
    ``sdxl-random``).
    """

    def __init__(
        self,
        preset: str,
        family: str | None = None,
        steps: int = 40,
        guidance_scale: float = 5.0,
        controlnet_conditioning_scale: float = 1.0,
        resolution: int = 768,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        controlnet_id: str | None = None,
        controlnet_revision: str | None = None,
        controlnet_local_path: str | None = None,
        dtype: str = "float16",
        device: str | None = None,
        sampler: str = dm.DEFAULT_SAMPLER,
        variant: str | None = None,
        controlnet_variant: str | None = None,
        vae: dict | None = None,
        max_rows_per_call: int | None = None,
        size_multiple: int | None = None,
        pipeline: Any = None,
        lora_path: str | None = None,
        speed: dict | None = None,
    ) -> None:
        """Build the ControlNet pipeline once (or take ``pipeline``, ready built — convention 2).

        ``family`` None means the preset's own (``sdxl`` for ``tiny``); model arguments
        (``sampler``, ``variant``s, ``vae`` too) are those of ``diffusion_models.build_pipeline``;
        ``max_rows_per_call`` splits big buckets.
        """
        self.steps, self.guidance_scale, self.resolution = steps, guidance_scale, resolution
        self.controlnet_conditioning_scale = controlnet_conditioning_scale
        self.max_rows_per_call = max_rows_per_call
        model = {"model_id": model_id, "revision": revision, "local_path": local_path,
                 "controlnet_id": controlnet_id, "controlnet_revision": controlnet_revision,
                 "controlnet_local_path": controlnet_local_path, "lora_path": lora_path}
        self.generator_name = dm.generator_name(preset, **model, vae=vae)
        self.pipe = pipeline if pipeline is not None else dm.build_pipeline(
            "controlnet", preset, family=family, dtype=dtype, device=device, sampler=sampler,
            variant=variant, controlnet_variant=controlnet_variant, vae=vae, **model)
        if speed:  # actors/speedups.py: compile, fused QKV, channels-last
            log.info("%s speed-ups: %s", type(self).__name__, ", ".join(apply_speedups(self.pipe, **speed)))
        self.multiple = size_multiple or dm.size_multiple(self.pipe)
        self.calls = 0  # pipeline calls made, for logs and tests

    def __call__(self, batch: dict) -> dict:
        """Add ``image_raw`` and ``generator``: one pipeline call per size bucket."""
        from PIL import Image

        require_columns(batch, NEEDED, "Mask2Img")
        prompts, truncated = dm.fit_prompts(self.pipe.tokenizer, [str(p) for p in batch[PROMPT]])
        seeds = np.asarray(batch[SEED], dtype=np.int64)
        hs = [int(h) for h in batch[HEIGHT]]
        ws = [int(w) for w in batch[WIDTH]]
        sizes = [dm.generation_size(h, w, self.resolution, self.multiple) for h, w in zip(hs, ws, strict=True)]
        images: list[bytes] = [b""] * len(prompts)
        for (gh, gw), rows in dm.buckets(sizes, self.max_rows_per_call):
            conds = [
                Image.fromarray(raw_to_array(batch[COLOR_RAW][i], hs[i], ws[i], channels=3))
                .resize((gw, gh), Image.Resampling.NEAREST)
                for i in rows
            ]
            out = self.pipe(
                prompt=[prompts[i] for i in rows], image=conds,
                generator=dm.seeded_generators(seeds[rows]),
                height=gh, width=gw, num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                controlnet_conditioning_scale=self.controlnet_conditioning_scale,
                output_type="np",
            )
            self.calls += 1
            finite = np.isfinite(np.asarray(out.images, dtype=np.float32)).all(axis=(1, 2, 3))
            for img, ok, i in zip(dm.images_to_uint8(out.images), finite, rows, strict=True):
                if not ok:  # the fp16 VAE failure: leave image_raw empty, the checks name it
                    continue
                if img.shape[:2] != (hs[i], ws[i]):
                    img = np.asarray(Image.fromarray(img).resize((ws[i], hs[i]),
                                                                 Image.Resampling.LANCZOS))
                images[i] = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
            log.debug("Mask2Img: %d rows at %dx%d", len(rows), gw, gh)
        result = dict(batch)
        result[IMAGE_RAW] = np.array(images, dtype=object)
        result[PROMPT] = np.array(prompts, dtype=object)
        if PROMPT_TRUNCATED in batch:  # Text2Mask may have cut it already
            truncated |= np.asarray(batch[PROMPT_TRUNCATED], dtype=bool)
        result[PROMPT_TRUNCATED] = truncated
        result[GENERATOR] = np.array([self.generator_name] * len(prompts), dtype=object)
        return result
