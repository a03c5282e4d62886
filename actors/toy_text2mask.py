"""Toy Text2Mask: caption -> segmentation mask, procedurally (the `toy` preset).

Stands in for SegGen's Text2Mask (an SDXL fine-tune that draws colour maps from a caption):
the class words of each prompt become randomly placed toy shapes. Being exact, it emits the
class-id mask directly; with a palette it also emits the colour map the real model would draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.toy_domain import class_words_in, sample_layout
from core.schema import (
    COLOR_RAW,
    HEIGHT,
    MASK_RAW,
    PROMPT,
    SAMPLE_ID,
    SEED,
    WIDTH,
    require_columns,
)

# Stream tag mixed into the seed so the layout draws are independent of Mask2Img's draws.
LAYOUT_STREAM = 1


class ToyText2Mask:
    """Callable actor: ``batch`` with sample_id/prompt/seed -> batch + mask_raw/height/width."""

    def __init__(self, resolution: int = 128, palette: Sequence | np.ndarray | None = None):
        """``palette`` ((N, 3) uint8): when given, a ``color_raw`` colour map is added too."""
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        self.resolution = int(resolution)
        self.palette = None if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)

    def _size(self, batch: dict[str, np.ndarray], i: int) -> tuple[int, int]:
        """Keep a row's height/width when the batch carries them, else a square of resolution."""
        if HEIGHT in batch and WIDTH in batch:
            return int(batch[HEIGHT][i]), int(batch[WIDTH][i])
        return self.resolution, self.resolution

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, (SAMPLE_ID, PROMPT, SEED), "ToyText2Mask")
        n = len(batch[SAMPLE_ID])
        masks, colors, heights, widths = [], [], [], []
        for i in range(n):
            h, w = self._size(batch, i)
            rng = np.random.default_rng((int(batch[SEED][i]), LAYOUT_STREAM))
            mask = sample_layout(rng, class_words_in(str(batch[PROMPT][i])), h, w)
            masks.append(mask.tobytes())
            heights.append(h)
            widths.append(w)
            if self.palette is not None:
                colors.append(self.palette[mask].tobytes())
        out = dict(batch)
        out[MASK_RAW] = np.array(masks, dtype=object)
        out[HEIGHT] = np.array(heights, dtype=np.int32)
        out[WIDTH] = np.array(widths, dtype=np.int32)
        if self.palette is not None:
            out[COLOR_RAW] = np.array(colors, dtype=object)
        return out
