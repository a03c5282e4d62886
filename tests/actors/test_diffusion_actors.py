"""Text2Mask / Mask2Img on the `tiny` preset: real diffusers pipelines, random weights, CPU."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pytest

from actors import diffusion_models as dm
from actors.colormap import mask_to_color
from actors.mask2img import Mask2Img
from actors.text2mask import Text2Mask

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
STEPS = 2


class CountingPipe:
    """Wraps a pipeline, recording each call's arguments (to check batching)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box OpenMP
    threads contending with other processes make each call ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def t2i_pipe() -> Any:
    return dm.build_pipeline("text2img", "tiny", device="cpu")


@pytest.fixture(scope="module")
def cn_pipe() -> Any:
    return dm.build_pipeline("controlnet", "tiny", device="cpu")


def _t2m_batch() -> dict:
    return {
        "sample_id": np.array(["s/masksyn/0", "s/masksyn/1", "s/masksyn/2"], dtype=object),
        "prompt": np.array(["a cat on a sofa"] * 3, dtype=object),
        "seed": np.array([11, 12, 11], dtype=np.int64),
        "height": np.array([32, 32, 48], dtype=np.int32),  # rows 0, 1 square; row 2 portrait
        "width": np.array([32, 32, 32], dtype=np.int32),
    }


def test_text2mask_buckets_sizes_and_seeds(t2i_pipe: Any) -> None:
    pipe = CountingPipe(t2i_pipe)
    actor = Text2Mask("tiny", PALETTE, steps=STEPS, resolution=32, pipeline=pipe)
    out = actor(_t2m_batch())

    # one pipeline call per aspect bucket, each carrying all its rows and one generator per row
    assert [len(c["prompt"]) for c in pipe.calls] == [2, 1]
    assert [len(c["generator"]) for c in pipe.calls] == [2, 1]
    assert [(c["height"], c["width"]) for c in pipe.calls] == [(32, 32), (40, 24)]
    assert all(c["num_inference_steps"] == STEPS and c["output_type"] == "np" for c in pipe.calls)

    assert out["height"].dtype == np.int32 and out["width"].dtype == np.int32
    assert out["height"].tolist() == [32, 32, 40] and out["width"].tolist() == [32, 32, 24]
    masks = [np.frombuffer(m, np.uint8).reshape(h, w)
             for m, h, w in zip(out["mask_raw"], out["height"], out["width"], strict=True)]
    for mask in masks:
        ids = set(np.unique(mask).tolist())
        assert ids <= set(range(len(PALETTE))) | {255}
        assert len(ids) > 1  # a random model draws noise: several classes appear
    assert not np.array_equal(masks[0], masks[1])  # different seed, same prompt and size
    assert out["sample_id"].tolist() == _t2m_batch()["sample_id"].tolist()

    again = actor(_t2m_batch())  # same seeds -> same bytes
    assert again["mask_raw"].tolist() == out["mask_raw"].tolist()
    # a row's result depends on its own seed, not on its batch-mates
    alone = actor({k: v[:1] for k, v in _t2m_batch().items()})
    assert alone["mask_raw"][0] == out["mask_raw"][0]


def test_text2mask_square_without_target_size(t2i_pipe: Any) -> None:
    batch = {k: v for k, v in _t2m_batch().items() if k not in ("height", "width")}
    out = Text2Mask("tiny", PALETTE.tolist(), steps=STEPS, resolution=24, pipeline=t2i_pipe)(batch)
    assert out["height"].tolist() == [24] * 3 and out["width"].tolist() == [24] * 3
    assert out["mask_raw"][0] == out["mask_raw"][2]  # same seed, same prompt, same size


def test_text2mask_names_missing_columns(t2i_pipe: Any) -> None:
    with pytest.raises(KeyError, match="seed"):
        Text2Mask("tiny", PALETTE, steps=STEPS, pipeline=t2i_pipe)({"sample_id": [], "prompt": []})


def _m2i_batch() -> dict:
    rng = np.random.default_rng(0)
    shapes = [(37, 29), (37, 29), (21, 45)]  # odd sizes: the image must come back at exactly these
    masks = [rng.integers(0, len(PALETTE), size=s, dtype=np.uint8) for s in shapes]
    masks[1] = np.zeros_like(masks[1])  # row 1: same seed and size as row 0, other colour map
    return {
        "sample_id": np.array(["m/imgsyn/0", "m/imgsyn/1", "m/imgsyn/2"], dtype=object),
        "prompt": np.array(["a kitchen"] * 3, dtype=object),
        "seed": np.array([5, 5, 6], dtype=np.int64),
        "color_raw": np.array([mask_to_color(m, PALETTE).tobytes() for m in masks], dtype=object),
        "height": np.array([s[0] for s in shapes], dtype=np.int32),
        "width": np.array([s[1] for s in shapes], dtype=np.int32),
    }


def test_mask2img_sizes_batching_and_conditioning(cn_pipe: Any) -> None:
    pipe = CountingPipe(cn_pipe)
    actor = Mask2Img("tiny", steps=STEPS, resolution=32, pipeline=pipe)
    batch = _m2i_batch()
    out = actor(batch)

    assert [len(c["prompt"]) for c in pipe.calls] == [2, 1]
    assert [(c["height"], c["width"]) for c in pipe.calls] == [(40, 32), (24, 48)]
    # the colour map reaches the ControlNet at the generation size, resized with NEAREST
    for call in pipe.calls:
        for cond in call["image"]:
            arr = np.asarray(cond)
            assert arr.shape == (call["height"], call["width"], 3)
            assert {tuple(c) for c in arr.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}

    images = [np.frombuffer(b, np.uint8) for b in out["image_raw"]]
    for img, h, w in zip(images, batch["height"], batch["width"], strict=True):
        assert img.size == h * w * 3  # exactly the mask's size
    assert out["height"].tolist() == batch["height"].tolist()
    assert out["generator"].tolist() == ["tiny-random"] * 3
    assert out["image_raw"][0] != out["image_raw"][1]  # the colour map steers the image
    again = actor(_m2i_batch())
    assert again["image_raw"].tolist() == out["image_raw"].tolist()


def test_mask2img_seed_changes_image(cn_pipe: Any) -> None:
    batch = _m2i_batch()
    batch["seed"] = np.array([5, 7, 6], dtype=np.int64)
    batch["color_raw"][1] = batch["color_raw"][0]
    out = Mask2Img("tiny", steps=STEPS, resolution=32, pipeline=cn_pipe)(batch)
    assert out["image_raw"][0] != out["image_raw"][1]


def test_sd15_family_tiny() -> None:
    t2m = Text2Mask("tiny", PALETTE, steps=STEPS, resolution=32, family="sd15", device="cpu")
    assert type(t2m.pipe).__name__ == "StableDiffusionPipeline"
    out = t2m(_t2m_batch())
    assert [len(m) for m in out["mask_raw"]] == [32 * 32, 32 * 32, 40 * 24]
    m2i = Mask2Img("tiny", family="sd15", steps=STEPS, resolution=32, device="cpu")
    assert type(m2i.pipe).__name__ == "StableDiffusionControlNetPipeline"
    batch = _m2i_batch()
    res = m2i(batch)
    sizes = zip(batch["height"], batch["width"], strict=True)
    assert [len(b) for b in res["image_raw"]] == [h * w * 3 for h, w in sizes]


def test_scheduler_is_euler_karras(t2i_pipe: Any) -> None:
    sched = t2i_pipe.scheduler  # the default sampler, "edm" (tests/actors/test_samplers.py)
    assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.use_karras_sigmas
    assert sched.config.timestep_spacing == "linspace"
    assert sched.config.prediction_type == "epsilon" and sched.config.beta_schedule == "scaled_linear"


def test_generation_size_and_names() -> None:
    assert dm.generation_size(None, None, 768, 32) == (768, 768)
    assert dm.generation_size(1000, 1000, 768, 32) == (768, 768)
    h, w = dm.generation_size(375, 500, 768, 32)  # VOC-like 3:4 landscape
    assert (h, w) == (672, 896) and h % 32 == 0 and w % 32 == 0
    assert abs(h * w / 768**2 - 1) < 0.05
    assert dm.generation_size(10, 1000, 768, 32) == (384, 1536)  # aspect clamped to 4
    assert dm.generator_name("sdxl-random") == "sdxl-random"
    assert dm.generator_name("sdxl", model_id="org/m", revision="abc", controlnet_id="org/cn",
                             controlnet_revision="def") == "org/m@abc+org/cn@def"
    with pytest.raises(ValueError, match="family"):
        dm.resolve_family("sd15", "sdxl")


def test_gpu_request_falls_back_to_cpu(caplog: pytest.LogCaptureFixture, monkeypatch: Any) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dm, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="actors.diffusion_models"):
        assert dm.pick_device("cuda") == "cpu"
        assert dm.pick_device("cuda") == "cpu"
    assert sum("CUDA is unavailable" in r.message for r in caplog.records) == 1


def test_real_presets_load_safely(monkeypatch: Any) -> None:
    """sdxl/sd15 load with pinned revision, safetensors only and no remote code (mocked)."""
    import diffusers

    seen: dict[str, dict] = {}

    class FakePipe:
        scheduler = diffusers.EulerDiscreteScheduler()

        @classmethod
        def from_pretrained(cls, path: str, **kwargs: Any) -> FakePipe:
            seen["pipe"] = {"path": path, **kwargs}
            return cls()

        def to(self, device: str) -> FakePipe:
            return self

        def set_progress_bar_config(self, **kwargs: Any) -> None:
            pass

    def fake_cn(path: str, **kwargs: Any) -> str:
        seen["controlnet"] = {"path": path, **kwargs}
        return "controlnet-object"

    monkeypatch.setattr(dm, "_pipeline_class", lambda task, family: FakePipe)
    monkeypatch.setattr(diffusers.ControlNetModel, "from_pretrained", fake_cn)
    pipe = dm.build_pipeline("controlnet", "sdxl", model_id="org/base", revision="r1",
                             controlnet_id="org/cn", controlnet_revision="r2", device="cpu")
    assert seen["pipe"]["path"] == "org/base" and seen["pipe"]["revision"] == "r1"
    assert seen["controlnet"]["path"] == "org/cn" and seen["controlnet"]["revision"] == "r2"
    assert seen["pipe"]["controlnet"] == "controlnet-object"
    for kwargs in seen.values():
        assert kwargs["use_safetensors"] is True and "trust_remote_code" not in kwargs
    assert pipe.scheduler.config.use_karras_sigmas
    dm.build_pipeline("text2img", "sd15", local_path="/models/sd15", device="cpu")
    assert seen["pipe"]["path"] == "/models/sd15" and seen["pipe"]["local_files_only"] is True
    assert seen["pipe"]["safety_checker"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("SEGFACTORY_SDXL_PATH"),
                    reason="real weights: set SEGFACTORY_SDXL_PATH and SEGFACTORY_CONTROLNET_PATH "
                           "to local diffusers-format SDXL and SDXL ControlNet folders")
def test_real_sdxl_weights_from_local_paths() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    actor = Mask2Img("sdxl", steps=4, local_path=os.environ["SEGFACTORY_SDXL_PATH"],
                     controlnet_local_path=os.environ["SEGFACTORY_CONTROLNET_PATH"])
    out = actor(_m2i_batch())
    assert [len(b) for b in out["image_raw"]] == [37 * 29 * 3, 37 * 29 * 3, 21 * 45 * 3]
    assert out["generator"][0].startswith("local:")


def test_overlong_prompts_are_cut_to_the_tokenizer_and_flagged(cn_pipe: Any) -> None:
    batch = _m2i_batch()
    long_prompt = "a kitchen with " + "a very long list of things, " * 10
    batch["prompt"] = np.array(["a kitchen", long_prompt, "a kitchen"], dtype=object)
    batch["prompt_truncated"] = np.array([0, 0, 1])  # row 2 was cut upstream (by Text2Mask)
    out = Mask2Img("tiny", steps=STEPS, resolution=32, pipeline=cn_pipe)(batch)
    limit = cn_pipe.tokenizer.model_max_length - 2  # start/end tokens take two places
    assert out["prompt_truncated"].tolist() == [False, True, True]
    assert out["prompt"][0] == "a kitchen"
    cut = out["prompt"][1]
    assert long_prompt.startswith(cut) and len(cn_pipe.tokenizer(cut, add_special_tokens=False).input_ids) == limit
