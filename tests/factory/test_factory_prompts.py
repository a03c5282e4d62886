"""Multi-way prompt generator: class appending, synonym/hyponym replacement, the VOC table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import schema as S
from core.classnames import readable
from pipelines import synonyms
from pipelines.graphs.factory import prompts as P
from pipelines.sources import VOC_CLASSES


def test_voc_table_is_loaded_with_every_voc_class():
    doc = json.loads(synonyms.VOC_SYNONYMS.read_text())
    assert sorted(e["class"] for e in doc["entries"]) == sorted(VOC_CLASSES[1:])  # 20 classes, no background
    table = synonyms.load_synonyms()
    assert table["dog"] == table["dogs"] and "puppy" in table["dog"] and "terrier" in table["dog"]
    assert "persian cat" in table["cat"]  # attn2mask's curated form, not "persian"
    assert table["people"] == table["person"] == ("human", "homo sapiens", "citizen")
    assert len(table) == sum(len(e["base"]) for e in doc["entries"])


def test_class_names_appended_after_the_caption():
    caption = "A living room with a couch and a coffee table"
    names = [readable(n) for n in ("pottedplant", "sofa", "chair")]
    assert P.build_prompt("caption_classes", caption, names) == \
        "A living room with a couch and a coffee table; potted plant, sofa, chair"
    assert P.build_prompt("caption", caption, names) == caption
    assert P.build_prompt("classes", caption, names) == "potted plant, sofa, chair"
    assert P.build_prompt("caption_classes", "", names) == "potted plant, sofa, chair"
    assert P.build_prompt("classes", "a photo", []) == "a photo"


def test_synonym_replacement_rate_is_one_half():
    table = synonyms.load_synonyms()
    rng = np.random.default_rng(0)
    draws = 4000
    replaced = sum(synonyms.replace_synonyms("a dog", table, 0.5, rng) != "a dog" for _ in range(draws))
    assert replaced / draws == pytest.approx(0.5, abs=0.03)  # 4000 draws: sd 0.008
    out = synonyms.replace_synonyms("a dog", table, 1.0, rng)
    assert out.startswith("a ") and out[2:] in table["dog"]
    assert synonyms.replace_synonyms("a dog", table, 0.0, rng) == "a dog"
    # whole words only, case-insensitive, longest base first
    assert synonyms.replace_synonyms("hotdog stand", table, 1.0, rng) == "hotdog stand"
    assert synonyms.replace_synonyms("Two Motorcycles", table, 1.0, rng).split(" ", 1)[1] in table["motorcycles"]


def test_replacement_touches_the_caption_not_the_appended_names():
    table = synonyms.load_synonyms()
    rng = np.random.default_rng(1)
    out = P.build_prompt("caption_classes", "a cat on a sofa", ["cat", "sofa"], table, 1.0, rng)
    caption, names = out.split("; ")
    assert names == "cat, sofa"
    cat, sofa = caption.removeprefix("a ").split(" on a ")
    assert cat in table["cat"] and sofa in table["sofa"]


def test_ways_mix_follows_the_weights_and_the_stage_is_deterministic():
    rng = np.random.default_rng(0)
    ways = [P.choose_way({"caption": 1.0, "classes": 3.0, "caption_classes": 0.0}, rng) for _ in range(4000)]
    assert set(ways) == {"caption", "classes"}
    assert ways.count("classes") / len(ways) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError):
        P.choose_way({"caption": 0.0}, rng)

    mask = np.array([[0, 8, 8], [12, 12, 12]], dtype=np.uint8)  # dog (12) larger than cat (8)
    batch = {S.SEED: np.array([1, 2, 1]), S.HEIGHT: np.full(3, 2), S.WIDTH: np.full(3, 3),
             S.MASK_RAW: np.array([mask.tobytes()] * 3, dtype=object),
             S.CAPTION: np.array(["a dog and a cat"] * 3, dtype=object),
             S.PROMPT: np.array([""] * 3, dtype=object), S.DROP_REASON: np.array(["", "", ""], dtype=object)}
    kwargs = {"classes": list(VOC_CLASSES), "background": 0, "mask_dtype": "|u1",
              "ways": {"caption_classes": 1.0}, "synonym_probability": 0.5, "synonyms": None}
    out = P.prompt_stage(batch, **kwargs)
    assert all(p.endswith("; dog, cat") for p in out[S.PROMPT])
    assert out[S.PROMPT][0] == out[S.PROMPT][2]  # same seed, same prompt
    assert list(P.prompt_stage(batch, **kwargs)[S.PROMPT]) == list(out[S.PROMPT])
    assert P.classes_in_mask(np.array([[255, 0]]), VOC_CLASSES, 0) == []
