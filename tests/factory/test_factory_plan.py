"""The factory graph's stage plan is a pure function of the config (no Ray run, no models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.captioner import Captioner
from actors.clip_embedder import ClipEmbedder
from actors.grounding import Grounding
from actors.sam import SamMasks
from core import schema as S
from core.config import ConfigError, load_config
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, stage_plan
from pipelines.graphs.factory.plan import expand_variants
from pipelines.stages import SIBLINGS

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
CTX = RunContext(classes=["background", "cat", "dog"], palette=np.zeros((3, 3), np.uint8), background=0)


def _plan(name="factory-tiny.yaml", *overrides):
    cfg = load_config(GenerateConfig, CONFIGS / name, ["source.path=src", "output.path=out", *overrides])
    return cfg, {s.name: s for s in stage_plan(cfg, CTX, "folder")}


def test_plan_lists_the_paper_pipeline_in_order():
    cfg, plan = _plan()
    assert list(plan) == ["load", "captioner", "grounding", "sam", "expand", "prompts", "colorize", "mask2img",
                          "clip", "similarity", "reseg_grounding", "reseg_sam", "reseg", "finalize"]
    cap = plan["captioner"].kwargs["fn_constructor_kwargs"]
    assert cap["actor_cls"] is Captioner and cap["needs"] == S.CAPTION  # only rows with no caption
    g, rg = (plan[n].kwargs["fn_constructor_kwargs"] for n in ("grounding", "reseg_grounding"))
    assert g["actor_cls"] is rg["actor_cls"] is Grounding
    assert g["actor_kwargs"]["classes"] == CTX.classes and g["actor_kwargs"]["box_threshold"] == 0.3
    assert rg["actor_kwargs"]["prefix"] == S.RESEG_PREFIX and g["actor_kwargs"].get("prefix", "") == ""
    rs = plan["reseg_sam"].kwargs["fn_constructor_kwargs"]
    assert rs["actor_cls"] is SamMasks and rs["actor_kwargs"]["mask_column"] == S.RESEG_MASK_RAW
    assert plan["clip"].kwargs["fn_constructor_kwargs"]["actor_cls"] is ClipEmbedder
    assert plan["mask2img"].kwargs["fn_constructor_kwargs"]["needs"] == S.IMAGE_RAW
    assert plan["expand"].kwargs["fn_kwargs"]["copies"] == cfg.factory.samples_per_image == 2
    assert plan["similarity"].kwargs["fn_kwargs"] == {"threshold": 0.8}


def test_pool_resources_come_from_config_in_one_place():
    _, plan = _plan("factory-tiny.yaml", "sam.resources.num_gpus=0.5", "sam.resources.max_actors=3",
                    "grounding.resources.batch_size=7")
    for name in ("sam", "reseg_sam"):
        kwargs = plan[name].kwargs
        assert kwargs["num_gpus"] == 0.5 and kwargs["compute"].max_size == 3 and kwargs["batch_format"] == "numpy"
    assert plan["grounding"].kwargs["batch_size"] == plan["reseg_grounding"].kwargs["batch_size"] == 7


def test_disabled_filters_load_no_models_and_toy_is_refused():
    _, plan = _plan("factory-tiny.yaml", "selection.similarity_threshold=null", "selection.reseg_miou_threshold=null")
    assert not {"clip", "similarity", "reseg_grounding", "reseg_sam", "reseg"} & set(plan)
    with pytest.raises(ConfigError, match="preset"):
        _plan("factory-tiny.yaml", "preset=toy")


def test_paper_defaults():
    cfg = GenerateConfig(pipeline="factory")
    assert cfg.selection.similarity_threshold == 0.8  # ε, Table 4
    assert cfg.factory.samples_per_image == 5  # K, Table 4
    assert cfg.prompts.synonym_probability == 0.5  # attn2mask
    assert (cfg.grounding.box_threshold, cfg.grounding.text_threshold) == (0.3, 0.25)  # Grounded-SAM
    assert cfg.sam.model_type == "vit_h"
    for name in ("factory-sdxl.yaml", "factory-sd15.yaml"):
        real = load_config(GenerateConfig, CONFIGS / name, [])
        assert real.selection.similarity_threshold == 0.8 and real.factory.samples_per_image == 5
        assert real.mask2img.steps == 50 and real.mask2img.guidance_scale == 7.5  # Table 4


def test_expand_makes_k_seeded_copies_and_keeps_empty_sources_as_one_row():
    mask = np.zeros((2, 2), np.uint8)
    full = mask.copy()
    full[0, 0] = 1
    batch = {S.SOURCE_ID: np.array(["a", "b", "c"], dtype=object), S.SAMPLE_ID: np.array(["a/source", "b/source", "c/source"], dtype=object),
             S.DROP_REASON: np.array(["", "", "corrupt_image: c.png"], dtype=object),
             S.MASK_RAW: np.array([full.tobytes(), mask.tobytes(), b""], dtype=object),
             S.IMAGE_RAW: np.array([b"x" * 12, b"y" * 12, b""], dtype=object),
             S.HEIGHT: np.array([2, 2, 0]), S.WIDTH: np.array([2, 2, 0]), S.SEED: np.zeros(3, np.int64),
             S.SHARD: np.zeros(3, np.int64), SIBLINGS: np.ones(3, np.int64),
             S.BOXES: np.array([b"", b"", b""], dtype=object)}
    out = expand_variants(batch, copies=3, seed=7, mask_dtype="|u1", background=0, drop_empty=True)
    assert list(out[S.SAMPLE_ID]) == ["a/factory/0", "a/factory/1", "a/factory/2", "b/source", "c/source"]
    assert list(out[SIBLINGS]) == [3, 3, 3, 1, 1]
    assert list(out[S.SEED][:3]) == [S.derive_seed(7, f"a/factory/{k}") for k in range(3)]
    assert list(out[S.SOURCE_IMAGE_RAW][:3]) == [b"x" * 12] * 3 and list(out[S.IMAGE_RAW][:3]) == [b""] * 3
    assert out[S.DROP_REASON][3].startswith("no_objects") and out[S.DROP_REASON][4] == "corrupt_image: c.png"
    assert S.BOXES not in out  # detection columns end at SAM
