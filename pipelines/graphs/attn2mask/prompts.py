"""attn2mask prompts: class lists or captions -> prompts, with where each class's words are.

attn2mask (seed 002) generates from text only. Two ways, chosen per sample:

- **captions**: a source caption that names a class (its readable name, a base word of the
  synonym table, or one of its aliases) is used as it is, each base word replaced by one of its
  synonyms/hyponyms with probability 0.5 (supplement §5 and Table 5, shipped as
  ``pipelines/data/voc_synonyms.json``);
- **classes**: 1..``max_objects`` distinct foreground classes drawn from the class list, each
  word replaced by an alias with the same probability, filled into a template
  ("a photo of a dog and a cat": multi-object prompts).

Every prompt carries ``class_spans``: JSON ``[[class_id, start, end], ...]`` character spans of
the words that stand for a class, so the generator can find their tokens (tokenizer offsets)
and capture their cross-attention. Each sample draws from its own seed: reruns give the same
prompts. Pure python/numpy, no Ray, no models.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core import schema as S
from core.classnames import readable
from pipelines.stages import SIBLINGS, _objects
from pipelines.synonyms import VOC_SYNONYMS

METHOD = "attn2mask"
MODES = ("auto", "captions", "classes")
_STREAM = 0xA77E  # keeps these draws apart from other users of the sample seed




class Lexicon:
    """Which words stand for which class, and the aliases a class word may be replaced by."""

    def __init__(self, classes: Sequence[str], background: int | None, synonyms: str | None = None) -> None:
        doc = json.loads(Path(synonyms or VOC_SYNONYMS).read_text(encoding="utf-8"))
        by_name = {_key(e["class"]): e for e in doc["entries"]}
        self.foreground: list[int] = []
        self.name: dict[int, str] = {}  # class id -> the word used in class prompts
        self.aliases: dict[int, tuple[str, ...]] = {}
        self.base: dict[str, int] = {}  # lower-case word -> class id (replaceable)
        self.words: dict[str, int] = {}  # every lower-case word that stands for a class
        for cid, cls in enumerate(classes):
            if cid == background or not str(cls).strip():
                continue
            self.foreground.append(cid)
            name = readable(cls)
            entry = by_name.get(_key(cls)) or by_name.get(_key(name)) or {"base": [], "aliases": []}
            self.name[cid] = name
            self.aliases[cid] = tuple(str(a) for a in entry["aliases"])
            for word in (name, *entry["base"]):
                self.base.setdefault(word.lower(), cid)
            for word in (name, *entry["base"], *entry["aliases"]):
                self.words.setdefault(word.lower(), cid)
        if not self.foreground:
            raise ValueError("attn2mask: the class list has no foreground class")
        words = sorted(self.words, key=len, reverse=True)  # longest first: "dining table" before "table"
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def maybe_alias(self, cid: int, word: str, probability: float, rng: np.random.Generator) -> str:
        """``word`` or, with ``probability``, a random alias of class ``cid`` (one draw either way)."""
        aliases = self.aliases.get(cid, ())
        swap = rng.random() < probability
        pick = int(rng.integers(len(aliases))) if aliases else 0
        return aliases[pick] if swap and aliases else word


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", str(name).lower())


@functools.lru_cache(maxsize=8)
def _lexicon(classes: tuple[str, ...], background: int | None, synonyms: str | None) -> Lexicon:
    return Lexicon(classes, background, synonyms)


def caption_prompt(caption: str, lex: Lexicon, probability: float,
                   rng: np.random.Generator) -> tuple[str, list[list[int]]]:
    """The caption with base class words maybe replaced, and the spans of every class word."""
    out, spans, last = [], [], 0
    for match in lex.pattern.finditer(caption):
        word = match.group(0)
        cid = lex.words[word.lower()]
        if word.lower() in lex.base:
            word = lex.maybe_alias(cid, word, probability, rng)
        out.append(caption[last:match.start()])
        start = sum(len(p) for p in out)
        out.append(word)
        spans.append([cid, start, start + len(word)])
        last = match.end()
    out.append(caption[last:])
    return "".join(out), spans


def class_prompt(lex: Lexicon, templates: Sequence[str], max_objects: int, probability: float,
                 rng: np.random.Generator) -> tuple[str, list[list[int]]]:
    """A template filled with 1..max_objects distinct classes ("a photo of a dog and a cat")."""
    n = int(rng.integers(1, min(max_objects, len(lex.foreground)) + 1))
    chosen = [lex.foreground[int(k)] for k in rng.choice(len(lex.foreground), size=n, replace=False)]
    template = templates[int(rng.integers(len(templates)))]
    head, _, tail = template.partition("{}")
    text, spans = head, []
    for j, cid in enumerate(chosen):
        word = lex.maybe_alias(cid, lex.name[cid], probability, rng)
        text += (" and " if j else "") + ("an " if word[:1].lower() in "aeiou" else "a ")
        spans.append([cid, len(text), len(text) + len(word)])
        text += word
    return text + tail, spans


def expand_prompts(batch: dict[str, np.ndarray], *, copies: int, first_copy: int, seed: int,
                   classes: Sequence[str], background: int | None, mode: str, templates: Sequence[str],
                   max_objects: int, synonym_probability: float,
                   synonyms: str | None) -> dict[str, np.ndarray]:
    """CPU stage: each source row -> ``copies`` sample rows with ``prompt`` and ``class_spans``.

    Source images are never read: a row gives its id, shard and caption. ``mode``: ``auto``
    uses a caption when it names a class, else a class prompt; ``captions`` drops rows whose
    caption names none (``no_class_in_caption``); ``classes`` ignores captions.
    """
    if mode not in MODES:
        raise ValueError(f"attn2mask.prompts.mode: unknown {mode!r}; expected one of {MODES}")
    lex = _lexicon(tuple(str(c) for c in classes), background, synonyms)
    out: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
    for i in range(len(batch[S.SOURCE_ID])):
        sid, caption = str(batch[S.SOURCE_ID][i]), " ".join(str(batch[S.CAPTION][i] or "").split())
        for k in range(first_copy, first_copy + copies):
            sample_id = S.make_sample_id(sid, METHOD, k)
            sample_seed = S.derive_seed(seed, sample_id)
            rng = np.random.default_rng([sample_seed, _STREAM])
            prompt, spans, reason = "", [], ""
            if mode != "classes" and caption:
                prompt, spans = caption_prompt(caption, lex, synonym_probability, rng)
            if not spans:
                if mode == "captions":
                    reason = "no_class_in_caption: the caption names no class" if caption else "no_caption"
                else:
                    prompt, spans = class_prompt(lex, templates, max_objects, synonym_probability, rng)
            row = {S.SAMPLE_ID: sample_id, S.SOURCE_ID: sid, S.METHOD: METHOD,
                   S.CAPTION: caption or ", ".join(lex.name[c] for c, _, _ in spans),
                   S.PROMPT: prompt, S.CLASS_SPANS: json.dumps(spans), S.SEED: sample_seed,
                   S.DROP_REASON: reason, S.SHARD: int(batch[S.SHARD][i]), SIBLINGS: copies,
                   S.SOURCE_PATH: str(batch[S.SOURCE_PATH][i] or "") if S.SOURCE_PATH in batch else ""}
            for col, default in _COLUMNS.items():
                out[col].append(row.get(col, default))
    ints = {S.SEED, S.HEIGHT, S.WIDTH, S.SHARD, SIBLINGS, S.PROMPT_TRUNCATED}
    return {c: (np.array(v, dtype=np.int64) if c in ints else _objects(v)) for c, v in out.items()}


_COLUMNS: dict[str, Any] = {
    S.SAMPLE_ID: "", S.SOURCE_ID: "", S.METHOD: METHOD, S.CAPTION: "", S.PROMPT: "", S.CLASS_SPANS: "[]",
    S.SEED: 0, S.HEIGHT: 0, S.WIDTH: 0, S.IMAGE_RAW: b"", S.MASK_RAW: b"", S.GENERATOR: "",
    S.DROP_REASON: "", S.SHARD: 0, SIBLINGS: 0, S.SOURCE_PATH: "", S.PROMPT_TRUNCATED: 0,
}
