"""The run's colour-map palette, including ``ade20k-by-name`` for ADE20K-trained control models.

A segmentation ControlNet trained on ADE20K colour maps (lllyasviel/sd-controlnet-seg and its
SDXL kin) reads each colour as an ADE20K class. Colouring a VOC mask by class *index* into the
ADE20K palette tells it the wrong classes (VOC background -> ADE wall, car -> bed, person ->
table). ``ade20k-by-name`` gives each source class the ADE20K colour of the ADE20K class with the
same name or a synonym:

1. a candidate word is the class name, its readable form ("pottedplant" -> "potted plant"), and
   its entry's base words then aliases in the synonym table (``pipelines/data/voc_synonyms.json``
   or the run's own, same shape);
2. the first candidate that is an ADE20K class name wins (ADE20K names from ``objectInfo150``,
   ``pipelines/data/ade20k_names.json``); else the first that is an ADE20K synonym listed for
   exactly one class (ambiguous ones such as "screen" are skipped); else a hypernym from
   :data:`HYPERNYMS` (ADE20K has one class for all animals: dog, cat, horse ... -> animal).

Background and unmatched classes get black (0, 0, 0) — a documented choice: black is no ADE20K
class colour (ADE20K's own annotations use 0 for "other/unlabelled"), so the control model is not
told to paint a wall or any other class there and leaves that area to the prompt. Unmatched names
are logged. Several source classes may share one ADE20K colour (VOC's animals all become
"animal"): fine for conditioning a ControlNet on a given mask (the factory, ImgSyn), not for
decoding a Text2Mask drawing back to class ids — use a palette with distinct colours there.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.classnames import readable
from pipelines.synonyms import VOC_SYNONYMS

log = logging.getLogger(__name__)

ADE20K_NAMES = Path(__file__).resolve().parent / "data" / "ade20k_names.json"
BY_NAME = "ade20k-by-name"
BACKGROUND_NAMES = frozenset({"background", "_background_", "bg", "other", "others", "unlabeled",
                              "unlabelled", "void", "none"})
NO_CLASS_COLOR = (0, 0, 0)
# Hypernyms neither table gives, towards an ADE20K class name (VOC and COCO animals).
HYPERNYMS = {w: "animal" for w in ("bird", "cat", "cow", "dog", "horse", "sheep", "elephant", "bear",
                                   "zebra", "giraffe", "mouse", "animals")}


@functools.cache
def _ade20k_index() -> tuple[dict[str, int], dict[str, int]]:
    """(class name -> id, unambiguous synonym -> id) from objectInfo150's names."""
    names = json.loads(ADE20K_NAMES.read_text(encoding="utf-8"))["names"]
    primary = {entry[0]: i for i, entry in enumerate(names)}
    owners: dict[str, set[int]] = {}
    for i, entry in enumerate(names):
        for alias in entry[1:]:
            owners.setdefault(alias, set()).add(i)
    aliases = {a: next(iter(ids)) for a, ids in owners.items() if len(ids) == 1 and a not in primary}
    return primary, aliases


@functools.lru_cache(maxsize=8)
def _synonym_entries(path: str | None) -> dict[str, tuple[str, ...]]:
    """class name (lower case) -> its base words then aliases, from a voc_synonyms-shaped table."""
    doc = json.loads((Path(path) if path else VOC_SYNONYMS).read_text(encoding="utf-8"))
    return {str(e["class"]).lower(): tuple(str(w).lower() for w in [*e.get("base", []), *e.get("aliases", [])])
            for e in doc["entries"]}


def ade20k_class_for(name: str, synonyms: str | None = None) -> int | None:
    """ADE20K class id (0 = wall) whose name or synonym matches ``name``; None if none does."""
    primary, aliases = _ade20k_index()
    key = str(name).strip().lower()
    words = [key, readable(key).lower(), *_synonym_entries(synonyms).get(key, ())]
    for table in (primary, aliases):
        for word in words:
            if word in table:
                return table[word]
    for word in words:
        if word in HYPERNYMS:
            return primary[HYPERNYMS[word]]
    return None


def ade20k_by_name(classes: Sequence[str], background: int | None = None,
                   synonyms: str | None = None) -> tuple[np.ndarray, list[int | None]]:
    """(palette (N, 3) uint8, ADE20K id per class or None) — see the module doc."""
    from actors.colormap import ade20k_palette

    ade = ade20k_palette()
    palette = np.empty((len(classes), 3), np.uint8)
    matched: list[int | None] = []
    for i, name in enumerate(classes):
        is_background = i == background or str(name).strip().lower() in BACKGROUND_NAMES
        ade_id = None if is_background else ade20k_class_for(name, synonyms)
        matched.append(ade_id)
        palette[i] = NO_CLASS_COLOR if ade_id is None else ade[ade_id]
    missing = [str(c) for c, m, i in zip(classes, matched, range(len(classes)), strict=True)
               if m is None and i != background and str(c).strip().lower() not in BACKGROUND_NAMES]
    if missing:
        log.warning("palette %s: no ADE20K class for %s: coloured %s like the background",
                    BY_NAME, missing, NO_CLASS_COLOR)
    return palette, matched


def resolve_palette(name: str, classes: Sequence[str], background: int | None = None,
                    synonyms: str | None = None) -> np.ndarray:
    """The palette for a config value: ``ade20k-by-name`` here, the others from
    ``actors.colormap.palette_by_name``."""
    from actors.colormap import palette_by_name

    if name == BY_NAME:
        return ade20k_by_name(classes, background, synonyms)[0]
    return palette_by_name(name, len(classes))
