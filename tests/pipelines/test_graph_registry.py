"""The graph registry: every graph declared once; the config hash, presets, plans and prefetch
derive from it. Hashes of existing datasets' configs are pinned (they name output dirs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import ConfigError, load_config
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, get_graph, graph_names, stage_plan

ROOT = Path(__file__).resolve().parents[2]
# copies of the shipped configs as they were when the registry replaced the hand-kept hash
PINNED = ROOT / "tests" / "fixtures" / "hash_pins"
CTX = RunContext(classes=["background", "cat", "dog"], palette=np.zeros((3, 3), np.uint8), background=0)

# computed with the code before the registry (commit 087ac9f): a change here re-names every
# existing dataset's output and breaks resuming it. The diffusion presets' default sampler has
# since become SGM's EDM (it changes the images, so it changes the hash): their datasets were
# made with the sampler now called euler-karras-leading, which gives back the old hashes.
OLD = ["text2mask.sampler=euler-karras-leading", "mask2img.sampler=euler-karras-leading"]
HASHES = {
    "factory-sd15": ("factory-sd15.yaml", OLD, "645169b9e9c0b16b"),
    "factory-sdxl": ("factory-sdxl.yaml", OLD, "9e395a4102c38e61"),
    "factory-tiny": ("factory-tiny.yaml", OLD, "61fa134d06b5cd46"),
    # seggen-sdxl now captions with the captioner by default (SegGen's BLIP-2), which changes its
    # bytes and so its hash; with the template captions it had, the hash is the old one
    "seggen-sdxl": ("seggen-sdxl.yaml", [*OLD, "captions=template"], "b5ba3d50ce0e59df"),
    "seggen-tiny": ("seggen-tiny.yaml", OLD, "7075c8673d1d1c82"),
    "seggen-toy": ("seggen-toy.yaml", [], "0a6ea4971b0b9d8c"),
    "imgsyn": ("seggen-toy.yaml", ["pipeline=imgsyn"], "43494c61aa45772d"),
    "masksyn": ("seggen-toy.yaml", ["pipeline=masksyn"], "f1656bc7223480b0"),
    "first_copy": ("seggen-toy.yaml", ["imgsyn.first_copy=3", "masksyn.first_copy=2"], "989c3234d2e797e0"),
    "runtime-knobs": ("seggen-tiny.yaml", [*OLD, "source.path=/x", "output.path=/y", "ray.address=auto",
                                           "mask2img.resources.num_gpus=0.5", "cpu.batch_size=3"], "7075c8673d1d1c82"),
    # the captioner section enters seggen's hash only when it captions (toy: template captions);
    # a factory-only section (factory.samples_per_image) is now refused: see the test below
    "captioner-in-toy-seggen": ("seggen-toy.yaml", ["captioner.kind=blip2"], "0a6ea4971b0b9d8c"),
    "factory-selection": ("factory-tiny.yaml", [*OLD, "selection.similarity_threshold=null",
                                                "grounding.resources.num_gpus=0.5"], "3881124291d7ccb0"),
    "defaults": (None, [], "2ab3b0819d0cbfe3"),
    "defaults-factory": (None, [*OLD, "pipeline=factory", "preset=tiny"], "68aed0f3bf50976e"),
}


@pytest.mark.parametrize("case", sorted(HASHES))
def test_existing_dataset_hashes_are_unchanged(case):
    name, overrides, expected = HASHES[case]
    cfg = load_config(GenerateConfig, name and PINNED / name, overrides)
    assert cfg.config_hash() == expected


def test_hash_follows_the_graphs_sections():
    base = GenerateConfig(pipeline="factory", preset="tiny")
    assert base.model_copy(update={"seed": 1}).config_hash() != base.config_hash()
    changed = load_config(GenerateConfig, None, ["pipeline=factory", "preset=tiny", "selection.similarity_threshold=0.5"])
    assert changed.config_hash() != base.config_hash()  # a factory section enters the factory's hash
    # a section the graph does not read is refused, not silently left out of the hash
    with pytest.raises(ConfigError, match=r"^selection\.similarity_threshold: the seggen graph does not read"):
        load_config(GenerateConfig, None, ["selection.similarity_threshold=0.5"])
    with pytest.raises(ConfigError, match=r"^factory\.samples_per_image: the seggen graph"):
        load_config(GenerateConfig, PINNED / "seggen-toy.yaml", ["factory.samples_per_image=7"])
    # a section set to its defaults changes nothing, so it is accepted (configs dumped whole reload)
    same = load_config(GenerateConfig, None, ["factory.samples_per_image=5"])
    assert same.config_hash() == GenerateConfig().config_hash()


def test_registry_lists_the_graphs():
    assert {"seggen", "imgsyn", "masksyn", "factory"} <= set(graph_names())
    assert get_graph("factory").needs_masks is False and get_graph("seggen").needs_masks is True
    assert get_graph("factory").presets == ("tiny", "sdxl", "sd15")
    assert [m for m, _ in get_graph("seggen").extendable] == ["imgsyn", "masksyn"]
    assert get_graph("factory").extendable == ()
    with pytest.raises(ConfigError, match="^pipeline: unknown graph 'nope'"):
        get_graph("nope")
    with pytest.raises(ConfigError, match="^pipeline: .*unknown graph"):
        load_config(GenerateConfig, None, ["pipeline=nope"])
    with pytest.raises(ConfigError, match="^preset: .*factory graph runs with"):
        load_config(GenerateConfig, None, ["pipeline=factory", "preset=toy"])


@pytest.mark.parametrize("pipeline,names,copies", [
    ("seggen", ["expand", "text2mask", "colorize", "mask2img", "finalize"], {"imgsyn": 2, "masksyn": 3}),
    ("imgsyn", ["expand", "colorize", "mask2img", "finalize"], {"imgsyn": 2, "masksyn": 0}),
    ("masksyn", ["expand", "text2mask", "colorize", "mask2img", "finalize"], {"imgsyn": 0, "masksyn": 3}),
])
def test_seggen_plans(pipeline, names, copies):
    cfg = load_config(GenerateConfig, None, [f"pipeline={pipeline}", "imgsyn.samples_per_source=2",
                                             "masksyn.samples_per_caption=3", "cpu.batch_size=12",
                                             "text2mask.resources.num_gpus=0.25", "text2mask.resources.min_actors=2",
                                             "text2mask.resources.max_actors=3"])
    plan = {s.name: s for s in stage_plan(cfg, CTX, "voc")}
    assert list(plan) == names
    assert plan["expand"].kwargs["fn_kwargs"]["copies"] == copies
    assert plan["expand"].kwargs["batch_size"] == 12 // sum(copies.values())
    assert [s.name for s in get_graph(pipeline).model_stages(cfg)] == [n for n in names if n in ("text2mask", "mask2img")]
    if "text2mask" in plan:
        t2m = plan["text2mask"].kwargs
        assert (t2m["num_gpus"], t2m["compute"].min_size, t2m["compute"].max_size) == (0.25, 2, 3)
        assert t2m["fn_constructor_kwargs"]["needs"] == "mask_raw"


def test_factory_model_stages_follow_the_selection():
    cfg = load_config(GenerateConfig, ROOT / "pipelines/configs/factory-sdxl.yaml", [])
    assert [s.name for s in get_graph("factory").model_stages(cfg)] == [
        "captioner", "grounding", "sam", "mask2img", "clip", "reseg_grounding", "reseg_sam"]
    stages = {s.name: s for s in get_graph("factory").model_stages(cfg)}
    assert stages["reseg_sam"].resources(cfg) is cfg.sam.resources
    refs = {r.key: r for s in stages.values() for r in s.models(cfg)}
    assert refs["grounding.model"].id == "IDEA-Research/grounding-dino-tiny" and refs["sam.checkpoint"].kind == "file"
    assert refs["mask2img.controlnet"].local_path == "models/controlnet-seg-sdxl"
    off = cfg.model_copy(update={"selection": cfg.selection.model_copy(
        update={"similarity_threshold": None, "reseg_miou_threshold": None})})
    assert [s.name for s in get_graph("factory").model_stages(off)] == ["captioner", "grounding", "sam", "mask2img"]
    tiny = load_config(GenerateConfig, ROOT / "pipelines/configs/factory-tiny.yaml", [])
    assert all(s.models(tiny) == [] for s in get_graph("factory").model_stages(tiny))  # built in code


@pytest.mark.subprocess
def test_hash_and_registry_import_neither_torch_nor_ray():
    code = ("import sys; from pipelines.config import GenerateConfig; import pipelines.prefetch; "
            "GenerateConfig(pipeline='factory', preset='tiny').config_hash(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_seggen_captioner_enters_the_hash_only_when_it_captions():
    old = load_config(GenerateConfig, PINNED / "seggen-sdxl.yaml", ["captions=template"]).config_hash()
    new = load_config(GenerateConfig, PINNED / "seggen-sdxl.yaml", []).config_hash()
    assert new != old
    blip2 = load_config(GenerateConfig, PINNED / "seggen-sdxl.yaml", ["captioner.kind=blip2"]).config_hash()
    assert blip2 != new  # the captioner's settings count once it runs
    toy = load_config(GenerateConfig, PINNED / "seggen-toy.yaml", ["captioner.kind=blip2"])
    assert toy.config_hash() == HASHES["seggen-toy"][2]  # template captions: the captioner does not count


def test_seggen_plan_captions_rows_without_one():
    from pipelines.graphs.base import CaptionerPool

    cfg = load_config(GenerateConfig, PINNED / "seggen-tiny.yaml", ["captions=captioner", "captioner.kind=blip2"])
    plan = {s.name: s for s in stage_plan(cfg, CTX, "voc")}
    assert list(plan)[:3] == ["caption_load", "captioner", "expand"]
    cap = plan["captioner"]
    assert cap.fn is CaptionerPool and cap.kwargs["fn_constructor_kwargs"]["needs"] == "caption"
    kwargs = cap.kwargs["fn_constructor_kwargs"]["actor_kwargs"]
    assert kwargs["kind"] == "blip2" and kwargs["prompt"] is None  # None = SegGen's BLIP-2 question
    assert [s.name for s in get_graph("seggen").model_stages(cfg)] == ["captioner", "text2mask", "mask2img"]
    every_row_captioned = RunContext(CTX.classes, CTX.palette, CTX.background, uncaptioned=0)
    assert "captioner" not in [s.name for s in stage_plan(cfg, every_row_captioned, "voc")]
    assert "captioner" not in [s.name for s in stage_plan(cfg, CTX, "captions")]  # captions are the source
    template = load_config(GenerateConfig, PINNED / "seggen-tiny.yaml", [])
    assert "captioner" not in [s.name for s in stage_plan(template, CTX, "voc")]  # tiny default: template
    real = load_config(GenerateConfig, PINNED / "seggen-sdxl.yaml", [])
    assert [s.name for s in get_graph("seggen").model_stages(real)][0] == "captioner"  # real presets: SegGen's way
    with pytest.raises(ConfigError, match="^captions: the toy preset has no captioner"):
        stage_plan(load_config(GenerateConfig, PINNED / "seggen-toy.yaml", ["captions=captioner"]), CTX, "voc")


def test_factory_starts_no_captioner_when_every_row_has_a_caption():
    cfg = load_config(GenerateConfig, PINNED / "factory-tiny.yaml", [])
    assert "captioner" in [s.name for s in stage_plan(cfg, CTX, "folder")]
    captioned = RunContext(CTX.classes, CTX.palette, CTX.background, uncaptioned=0)
    assert [s.name for s in stage_plan(cfg, captioned, "folder")][:3] == ["load", "grounding", "sam"]
