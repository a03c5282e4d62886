"""actors/speedups.py on the tiny preset: every option builds, images keep their shape, the
numbers stay close to eager, and the options reach the actors and the config hash."""

from __future__ import annotations

import numpy as np
import pytest

from actors import diffusion_models as dm
from actors.mask2img import Mask2Img
from actors.speedups import apply_speedups
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, stage_plan
from tests.actors.test_diffusion_actors import PALETTE, STEPS, _m2i_batch


def _images(actor: Mask2Img) -> list[np.ndarray]:
    batch = _m2i_batch()
    out = actor(batch)
    shapes = zip(batch["height"], batch["width"], strict=True)
    return [np.frombuffer(b, np.uint8).reshape(int(h), int(w), 3) for b, (h, w) in zip(out["image_raw"], shapes,
                                                                                         strict=True)]


@pytest.fixture(scope="module")
def eager_images() -> list[np.ndarray]:
    return _images(Mask2Img("tiny", steps=STEPS, resolution=32, device="cpu"))


@pytest.mark.parametrize("speed", [{"channels_last": True}, {"fuse_qkv": True},
                                   {"channels_last": True, "fuse_qkv": True}])
def test_layout_and_fusion_keep_shapes_and_stay_close_to_eager(speed, eager_images):
    actor = Mask2Img("tiny", steps=STEPS, resolution=32, device="cpu", speed=speed)
    if speed.get("fuse_qkv"):  # fused weights, and a processor that uses them
        for net in (actor.pipe.unet, actor.pipe.controlnet):
            assert {type(p).__name__ for p in net.attn_processors.values()} == {"FusedAttnProcessor2_0"}
            assert any(getattr(m, "fused_projections", False) for m in net.modules())
    if speed.get("channels_last"):
        conv = actor.pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=__import__("torch").channels_last)
    for img, ref in zip(_images(actor), eager_images, strict=True):
        assert img.shape == ref.shape
        # same math reordered: float32 on the CPU differs by rounding only (uint8 steps)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


@pytest.mark.slow  # dynamo traces the tiny UNet and ControlNet: tens of seconds on 2 CPUs
@pytest.mark.parametrize("compile", ["regional", "full"])
def test_compile_wraps_the_repeated_blocks_or_the_whole_network(compile, eager_images):
    pipe = dm.build_pipeline("controlnet", "tiny", device="cpu")
    done = apply_speedups(pipe, compile=compile, backend="eager")  # dynamo tracing, no inductor build
    assert done and done[0].startswith(compile)
    compiled = [m for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if compile == "regional":
        assert compiled and {type(m).__name__ for m in compiled} <= {"BasicTransformerBlock", "ResnetBlock2D"}
    else:
        assert compiled == [pipe.unet]
    images = _images(Mask2Img("tiny", steps=STEPS, resolution=32, pipeline=pipe))
    for img, ref in zip(images, eager_images, strict=True):
        assert img.shape == ref.shape and np.abs(img.astype(int) - ref.astype(int)).max() <= 2


@pytest.mark.slow
def test_regional_compile_with_inductor_builds_and_draws(eager_images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    actor = Mask2Img("tiny", steps=STEPS, resolution=32, device="cpu", speed={"compile": "regional"})
    for img, ref in zip(_images(actor), eager_images, strict=True):
        assert img.shape == ref.shape and np.abs(img.astype(int) - ref.astype(int)).max() <= 2
    assert any((tmp_path / "inductor").rglob("*"))  # the compiled kernels persist for the next actor


def test_unknown_compile_choice_is_refused():
    with pytest.raises(ValueError, match="compile: 'fast' is not one of"):
        apply_speedups(dm.build_pipeline("controlnet", "tiny", device="cpu"), compile="fast")


def test_options_reach_the_actors_and_enter_the_hash():
    base = load_config(GenerateConfig, None, ["preset=tiny"])
    fast = load_config(GenerateConfig, None, ["preset=tiny", "mask2img.speed.compile=regional",
                                              "text2mask.speed.channels_last=true"])
    assert fast.config_hash() != base.config_hash()  # not bit-exact: a different dataset
    ctx = RunContext(classes=["background", "a"], palette=PALETTE[:2], background=0)
    plans = {name: {s.name: s for s in stage_plan(cfg, ctx, "voc")} for name, cfg in (("base", base), ("fast", fast))}
    actor = {name: {stage: plan[stage].kwargs["fn_constructor_kwargs"]["actor_kwargs"] for stage in ("text2mask",
                                                                                                "mask2img")}
             for name, plan in plans.items()}
    assert "speed" not in actor["base"]["mask2img"] and "speed" not in actor["base"]["text2mask"]
    assert actor["fast"]["mask2img"]["speed"]["compile"] == "regional"
    assert actor["fast"]["text2mask"]["speed"]["channels_last"] is True
