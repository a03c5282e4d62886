"""Synonym/hyponym tables (attn2mask supplement, Table 5) and the replacement both prompt builders
(factory, attn2mask) and the ADE20K-by-name palette use. The VOC table ships as
``pipelines/data/voc_synonyms.json``; users may pass their own file of the same shape."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

VOC_SYNONYMS = Path(__file__).resolve().parent / "data" / "voc_synonyms.json"


@functools.lru_cache(maxsize=8)
def load_synonyms(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """base word (lower case) -> its aliases, from a table like ``voc_synonyms.json``.

    The file holds ``{"entries": [{"class": ..., "base": [...], "aliases": [...]}, ...]}``.
    """
    file = Path(path) if path else VOC_SYNONYMS
    doc = json.loads(file.read_text(encoding="utf-8"))
    table: dict[str, tuple[str, ...]] = {}
    for entry in doc["entries"]:
        aliases = tuple(str(a) for a in entry["aliases"])
        if not aliases:
            continue
        for base in entry["base"]:
            table[str(base).lower()] = aliases
    return table


@functools.lru_cache(maxsize=8)
def _pattern(bases: tuple[str, ...]) -> re.Pattern:
    words = sorted(bases, key=len, reverse=True)  # longest first: "motorcycles" before "motor"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def replace_synonyms(text: str, table: Mapping[str, Sequence[str]], probability: float,
                     rng: np.random.Generator) -> str:
    """Replace each base word of ``text`` by a random alias with ``probability`` (attn2mask: 0.5)."""
    if not text or probability <= 0 or not table:
        return text

    def swap(match: re.Match) -> str:
        if rng.random() >= probability:
            return match.group(0)
        aliases = table[match.group(0).lower()]
        return str(aliases[int(rng.integers(len(aliases)))])

    return _pattern(tuple(sorted(table))).sub(swap, text)
