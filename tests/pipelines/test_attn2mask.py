"""attn2mask pieces without Ray: pseudo-masks on hand-built attention, prompts, actor, plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import schema as S
from core.config import ConfigError
from pipelines.config import GenerateConfig
from pipelines.graphs.attn2mask.masks import (
    MaskParams,
    attn_mask_stage,
    otsu_threshold,
    pseudo_mask,
)
from pipelines.graphs.attn2mask.prompts import Lexicon, caption_prompt, class_prompt, expand_prompts
from pipelines.sources import VOC_CLASSES

# --- mask stage on hand-built attention ------------------------------------------------------


def _edge_scene():
    """Image: black left half, white right half. Attention of class 8 reaches 4 px too far left."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    maps = np.full((1, 32, 32), 0.1, np.float32)
    maps[0, :, 12:] = 0.8
    return image, maps


@pytest.mark.parametrize("threshold", ["fixed", "adaptive"])
def test_crf_snaps_to_the_image_edge_and_the_disagreement_is_ignored(threshold):
    image, maps = _edge_scene()
    out = pseudo_mask(maps, [8], image, 0, MaskParams(threshold=threshold))
    expected = np.array([0] * 12 + [255] * 4 + [8] * 16, np.uint8)
    assert np.array_equal(out.mask, np.tile(expected, (32, 1)))
    assert np.array_equal(out.raw[0], [0] * 12 + [1] * 20)  # argmax before the CRF
    assert np.array_equal(out.refined[0], [0] * 16 + [1] * 16)  # the CRF follows the colours
    assert out.reliable_fraction == pytest.approx(28 / 32)
    assert out.reliable_foreground_fraction == pytest.approx(16 / 32)
    assert 0.2 <= out.threshold <= 0.8


def test_top_two_within_the_margin_are_unreliable_and_labels_map_to_class_ids():
    image = np.full((8, 8, 3), 128, np.uint8)
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, :, :4], maps[1, :, 4:] = 1.0, 1.0  # class 15 left, class 12 right
    maps[0, :2, :], maps[1, :2, :] = 0.9, 0.9  # top rows: a tie between them
    maps[0, 6:, :], maps[1, 6:, :] = 0.0, 0.0  # bottom rows: neither
    p = MaskParams(threshold="fixed", fixed_threshold=0.5, margin=0.05, crf=False)
    out = pseudo_mask(maps, [15, 12], image, 0, p)
    assert (out.mask[:2] == 255).all()  # tie -> unreliable
    assert (out.mask[2:6, :4] == 15).all() and (out.mask[2:6, 4:] == 12).all()
    assert (out.mask[6:] == 0).all()  # below the background score -> background
    # a source without a background class: background pixels are ignored, not labelled
    assert (pseudo_mask(maps, [15, 12], image, None, p).mask[6:] == 255).all()


def test_otsu_splits_two_modes_in_the_middle():
    values = np.r_[np.full(100, 0.1), np.full(300, 0.7)]
    assert 0.1 < otsu_threshold(values) < 0.7
    assert otsu_threshold(values) == pytest.approx(0.4, abs=0.01)


def test_mask_stage_rows_scores_and_rejection():
    image, maps = _edge_scene()
    empty = np.zeros_like(maps)  # a flat map: nothing rises above the background
    batch = {S.SAMPLE_ID: np.array(["a", "b", "c"], object), S.DROP_REASON: np.array(["", "", ""], object),
             S.HEIGHT: np.array([32] * 3), S.WIDTH: np.array([32] * 3),
             S.IMAGE_RAW: np.array([image.tobytes()] * 3, object),
             S.ATTN_RAW: np.array([maps.tobytes(), empty.tobytes(), b""], object),
             S.ATTN_HEIGHT: np.array([32, 32, 0]), S.ATTN_WIDTH: np.array([32, 32, 0]),
             S.ATTN_CLASS_IDS: np.array([np.int32([8]).tobytes()] * 2 + [b""], object)}
    out = attn_mask_stage(batch, background=0, mask_dtype="|u1", params={"threshold": "fixed"})
    assert list(out[S.DROP_REASON][:2]) == ["", S.NO_RELIABLE_FOREGROUND]
    assert out[S.DROP_REASON][2].startswith("no_class_tokens")
    mask = np.frombuffer(out[S.MASK_RAW][0], np.uint8).reshape(32, 32)
    assert out[S.SCORE_RELIABLE_FRACTION][0] == pytest.approx((mask != 255).mean())
    assert S.ATTN_RAW not in out and S.NO_RELIABLE_FOREGROUND in S.FILTER_REASONS


# --- prompts -----------------------------------------------------------------------------------


def test_caption_prompt_replaces_base_words_and_records_their_spans():
    lex = Lexicon(VOC_CLASSES, background=0)
    rng = np.random.default_rng(0)
    text, spans = caption_prompt("Two dogs and a man on a sofa", lex, 1.0, rng)  # always replace
    found = {VOC_CLASSES[c]: text[a:b] for c, a, b in spans}
    assert set(found) == {"dog", "person", "sofa"}
    assert found["dog"] in lex.aliases[VOC_CLASSES.index("dog")]
    assert found["person"] in lex.aliases[VOC_CLASSES.index("person")]
    assert text.startswith("Two ") and " on a " in text
    kept, spans0 = caption_prompt("Two dogs and a man", lex, 0.0, rng)
    assert kept == "Two dogs and a man" and [kept[a:b] for _, a, b in spans0] == ["dogs", "man"]


def test_class_prompts_name_distinct_classes_and_are_deterministic():
    lex = Lexicon(["background", "cat", "dog", "bird"], background=0)
    for seed in range(20):
        text, spans = class_prompt(lex, ["a photo of {}"], 2, 0.0, np.random.default_rng(seed))
        ids = [c for c, _, _ in spans]
        assert 1 <= len(ids) <= 2 and len(set(ids)) == len(ids) and 0 not in ids
        assert [text[a:b] for _, a, b in spans] == [lex.name[c] for c in ids]
        assert text.startswith("a photo of a ")
    batch = {S.SOURCE_ID: np.array(["x", "y"], object), S.CAPTION: np.array(["", "a bird"], object),
             S.SHARD: np.array([0, 0])}
    kw = {"copies": 2, "first_copy": 0, "seed": 3, "classes": ["background", "cat", "dog", "bird"],
          "background": 0, "mode": "auto", "templates": ["{}"], "max_objects": 2,
          "synonym_probability": 0.5, "synonyms": None}
    a, b = expand_prompts(batch, **kw), expand_prompts(batch, **kw)
    assert list(a[S.PROMPT]) == list(b[S.PROMPT]) and list(a[S.SEED]) == list(b[S.SEED])
    assert list(a[S.SAMPLE_ID]) == ["x/attn2mask/0", "x/attn2mask/1", "y/attn2mask/0", "y/attn2mask/1"]
    (cid, start, end), = json.loads(a[S.CLASS_SPANS][2])  # the caption's "bird", maybe an alias of it
    bird = Lexicon(kw["classes"], 0)
    assert cid == 3 and a[S.PROMPT][2][:start] == "a " and a[S.PROMPT][2][start:end] in ("bird", *bird.aliases[3])
    drop = expand_prompts(batch, **{**kw, "mode": "captions"})
    assert list(drop[S.DROP_REASON][:2]) == ["no_caption", "no_caption"] and drop[S.DROP_REASON][2] == ""


# --- actor and plan ------------------------------------------------------------------------------


def test_actor_maps_class_tokens_and_capture_keeps_the_image():
    from actors.attn_text2img import AttnText2Img, token_groups

    actor = AttnText2Img("tiny", family="sd15", steps=2, resolution=32, attention_factors=(2,),
                         step_window=(0.0, 1.0), device="cpu")
    tok = actor.pipe.tokenizer  # tiny tokenizer: a token per character but none for spaces; start token at 0
    assert token_groups(tok, "a dog and a cat", [[12, 2, 5], [8, 12, 15]]) == ([[2, 3, 4], [9, 10, 11]], [12, 8])
    batch = {S.SAMPLE_ID: np.array(["s/0", "s/1"], object), S.PROMPT: np.array(["a dog and a cat", "a cat"], object),
             S.SEED: np.array([5, 6]), S.CLASS_SPANS: np.array([json.dumps([[12, 2, 5], [8, 12, 15]]),
                                                               json.dumps([[8, 2, 5]])], object)}
    out = actor(batch)
    assert list(out[S.HEIGHT]) == [32, 32] and list(out[S.ATTN_HEIGHT]) == [8, 8]
    assert np.frombuffer(out[S.ATTN_CLASS_IDS][0], np.int32).tolist() == [12, 8]
    maps = np.frombuffer(out[S.ATTN_RAW][0], np.float32).reshape(2, 8, 8)
    assert np.all(maps > 0) and np.all(maps < 1) and not np.allclose(maps[0], maps[1])
    actor.capture = False
    plain = actor(batch)
    assert list(plain[S.IMAGE_RAW]) == list(out[S.IMAGE_RAW])  # capture changes no byte
    assert actor.calls == 2


def test_plan_map_batches_arguments_and_presets():
    from pipelines.graphs import RunContext, get_graph, model_refs, stage_plan

    cfg = GenerateConfig.model_validate({"pipeline": "attn2mask", "preset": "tiny", "attn2mask": {
        "samples_per_source": 2, "resources": {"batch_size": 3, "max_actors": 2, "num_gpus": 0.5},
        "lora_path": "/x/lora", "mask": {"threshold": "fixed", "min_reliable_foreground": 0.01}}})
    ctx = RunContext(classes=list(VOC_CLASSES), palette=np.zeros((21, 3), np.uint8), background=0)
    plan = stage_plan(cfg, ctx, "captions")
    assert [s.name for s in plan] == ["prompts", "attn_text2img", "attn_masks", "finalize"]
    pool = plan[1].kwargs
    assert pool["batch_size"] == 3 and pool["num_gpus"] == 0.5 and pool["compute"].max_size == 2
    actor = pool["fn_constructor_kwargs"]["actor_kwargs"]
    assert actor["lora_path"] == "/x/lora" and actor["family"] == "sd15" and actor["steps"] == 100
    assert actor["attention_factors"] == [4] and actor["step_window"] == (0.5, 0.51)
    assert plan[0].kwargs["fn_kwargs"]["copies"] == 2 and plan[0].kwargs["fn_kwargs"]["synonym_probability"] == 0.5
    masks = plan[2].kwargs["fn_kwargs"]
    assert masks["params"]["threshold"] == "fixed" and masks["min_reliable_foreground"] == 0.01
    assert cfg.config_hash() != GenerateConfig.model_validate({**cfg.model_dump(), "attn2mask": {}}).config_hash()
    assert get_graph("attn2mask").needs_masks is False and model_refs(cfg) == []  # tiny loads nothing
    real = cfg.model_copy(update={"preset": "sd15"})
    assert [r.key for _, r in model_refs(real)] == ["attn2mask.model", "attn2mask.lora_path"]
    with pytest.raises(ConfigError, match="^preset: .*the attn2mask graph runs with presets"):
        from core.config import load_config

        load_config(GenerateConfig, None, ["pipeline=attn2mask", "preset=toy"])


def test_lora_adapter_loads_through_load_lora_weights(tmp_path):
    """A DreamBooth-LoRA file as `segfactory finetune` writes it (save_lora_weights) changes the
    images; at lora_scale 0 they are the base model's again."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from actors import diffusion_models as dm
    from actors.attn_text2img import AttnText2Img

    unet = dm.tiny_components("sd15")["unet"]
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    batch = {S.SAMPLE_ID: np.array(["s/0"], object), S.PROMPT: np.array(["a cat"], object),
             S.SEED: np.array([5]), S.CLASS_SPANS: np.array([json.dumps([[8, 2, 5]])], object)}
    kw = {"family": "sd15", "steps": 2, "resolution": 32, "attention_factors": (2,), "step_window": (0.0, 1.0),
          "device": "cpu"}
    base = AttnText2Img("tiny", **kw)(batch)
    adapted = AttnText2Img("tiny", lora_path=str(tmp_path), **kw)
    out = adapted(batch)
    assert out[S.GENERATOR][0] == f"tiny-random+lora:{tmp_path}"
    assert out[S.IMAGE_RAW][0] != base[S.IMAGE_RAW][0]
    adapted.pipe.set_adapters(["attn2mask"], adapter_weights=[0.0])
    assert adapted(batch)[S.IMAGE_RAW][0] == base[S.IMAGE_RAW][0]
