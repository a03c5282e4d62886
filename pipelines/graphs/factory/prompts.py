"""Multi-way prompt generator (Diffusion Synthesis) with synonym/hyponym augmentation (attn2mask).

Diffusion Synthesis feeds ControlNet one of several prompts per image (its MPG): the BLIP caption
alone, the caption with the image's class names appended after "; " (its Fig. 3 example: "A
living room with a couch and a coffee table; pottedplant, sofa, chair"), or the class names
alone. Its Table 3 finds caption + classes best, so that is the default; the mix is a config
weight per way. attn2mask (Table 5 of its supplement) replaces each base class word of a caption
by one of its synonyms/hyponyms with probability 0.5; that table ships as
``pipelines/data/voc_synonyms.json`` and users may pass their own file of the same shape.

"The image's class names" are the classes present in its mask (from SAM), largest area first,
so a prompt names what the colour map will draw. Replacement touches the caption only: the
appended class names stay exact, which is why the paper appends them. Each sample draws its way
and its replacements from its own seed, so a rerun gives the same prompts.

Pure python/numpy — no ray, no models — so tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core import schema as S
from core.classnames import readable
from pipelines.synonyms import load_synonyms, replace_synonyms

WAYS = ("caption", "caption_classes", "classes")
CLASS_SEPARATOR = ", "
CAPTION_SEPARATOR = "; "
_PROMPT_STREAM = 0x9E37  # keeps the prompt draws apart from other users of the sample seed


def choose_way(weights: Mapping[str, float], rng: np.random.Generator) -> str:
    """One way, drawn with the configured weights (ways of weight 0 never)."""
    ways = [w for w in WAYS if weights.get(w, 0) > 0]
    if not ways:
        raise ValueError(f"prompts.ways: give a positive weight to one of {WAYS}")
    p = np.array([weights[w] for w in ways], dtype=np.float64)
    return ways[int(rng.choice(len(ways), p=p / p.sum()))]


def build_prompt(way: str, caption: str, class_names: Sequence[str],
                 table: Mapping[str, Sequence[str]] | None = None, probability: float = 0.0,
                 rng: np.random.Generator | None = None) -> str:
    """The prompt of one way. With no caption, the class names stand in (and vice versa)."""
    caption = " ".join(str(caption).split())
    if caption and table and rng is not None:
        caption = replace_synonyms(caption, table, probability, rng)
    names = CLASS_SEPARATOR.join(class_names)
    if way == "caption":
        return caption or names
    if way == "classes":
        return names or caption
    if way == "caption_classes":
        return CAPTION_SEPARATOR.join(p for p in (caption, names) if p)
    raise ValueError(f"unknown prompt way {way!r}; expected one of {WAYS}")


def classes_in_mask(mask: np.ndarray, classes: Sequence[str], background: int | None) -> list[str]:
    """Readable names of the classes present (ignore and background left out), largest first."""
    ids, counts = np.unique(mask, return_counts=True)
    present = [(-int(c), int(i)) for i, c in zip(ids, counts, strict=True)
               if i != S.IGNORE_INDEX and i != background and 0 <= i < len(classes)]
    return [readable(classes[i]) for _, i in sorted(present)]


def prompt_stage(batch: dict[str, np.ndarray], *, classes: Sequence[str], background: int | None,
                 mask_dtype: str, ways: Mapping[str, float], synonym_probability: float,
                 synonyms: str | None) -> dict[str, np.ndarray]:
    """CPU stage: fill ``prompt`` on kept rows from their caption, mask and seed."""
    from pipelines.stages import kept, set_rows

    batch = dict(batch)
    rows = np.flatnonzero(kept(batch))
    table = load_synonyms(synonyms) if synonym_probability > 0 else None
    prompts: list[Any] = []
    for i in rows:
        rng = np.random.default_rng([int(batch[S.SEED][i]), _PROMPT_STREAM])
        h, w = int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i])
        names = classes_in_mask(S.raw_to_array(batch[S.MASK_RAW][i], h, w, mask_dtype), classes, background)
        way = choose_way(ways, rng)
        prompts.append(build_prompt(way, str(batch[S.CAPTION][i] or ""), names, table,
                                    synonym_probability, rng))
    set_rows(batch, rows, {S.PROMPT: np.array(prompts, dtype=object)}, fill="")
    return batch
