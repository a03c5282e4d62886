"""Toy Mask2Img: mask -> image, procedurally (the `toy` preset).

Stands in for SegGen's Mask2Img (a ControlNet conditioned on the colour map). The real actor
reads ``color_raw``; this stand-in reads the class-id mask (``mask_raw``) directly, since the
toy renderer needs class ids to pick each region's appearance. ``gap`` sets how far its renders
drift from the "real" toy images (rendered with gap=0), i.e. the synthetic-to-real domain gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.toy_domain import render_image
from core.schema import (
    GENERATOR,
    HEIGHT,
    IMAGE_RAW,
    MASK_RAW,
    PROMPT,
    SAMPLE_ID,
    SEED,
    WIDTH,
    raw_to_array,
    require_columns,
)

# Stream tag mixed into the seed so rendering draws are independent of the layout draws.
RENDER_STREAM = 2
NEEDED = (SAMPLE_ID, PROMPT, SEED, MASK_RAW, HEIGHT, WIDTH)


class ToyMask2Img:
    """Callable actor: batch with mask_raw/height/width/seed -> batch + image_raw/generator."""

    def __init__(self, gap: float = 0.3, palette: Sequence | np.ndarray | None = None):
        """``palette`` is accepted for the same signature as the real actor and not needed."""
        if not 0.0 <= gap <= 1.0:
            raise ValueError(f"gap must be in [0, 1], got {gap}")
        self.gap = float(gap)
        self.palette = palette
        self.generator = f"toy-mask2img@gap={self.gap:g}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, NEEDED, "ToyMask2Img")
        images = []
        for i in range(len(batch[SAMPLE_ID])):
            h, w = int(batch[HEIGHT][i]), int(batch[WIDTH][i])
            data = batch[MASK_RAW][i]
            # uint8 masks, or little-endian uint16 past 255 classes (schema.mask_dtype).
            dtype = np.uint8 if len(data) == h * w else np.dtype("<u2")
            mask = raw_to_array(data, h, w, dtype=dtype)
            rng = np.random.default_rng((int(batch[SEED][i]), RENDER_STREAM))
            images.append(render_image(mask, rng, self.gap).tobytes())
        out = dict(batch)
        out[IMAGE_RAW] = np.array(images, dtype=object)
        out[GENERATOR] = np.array([self.generator] * len(images), dtype=object)
        return out
