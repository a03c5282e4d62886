"""`sdxl-random`: full-size SDXL architectures on the meta device, made real only on use."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest
import torch

from actors import diffusion_models as dm


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_random_on_meta_has_full_size_and_no_memory() -> None:
    import accelerate  # noqa: F401  (imports are not what we measure)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    before = _peak_rss_mb()
    comps = dm.sdxl_random_components(controlnet=True)
    grown = _peak_rss_mb() - before

    counts = {name: _count(m) for name, m in comps.items() if isinstance(m, torch.nn.Module)}
    assert counts["unet"] == pytest.approx(2.567e9, rel=0.01)
    assert counts["controlnet"] == pytest.approx(1.25e9, rel=0.02)
    assert counts["text_encoder"] == pytest.approx(123e6, rel=0.01)  # CLIP ViT-L/14 text
    assert counts["text_encoder_2"] == pytest.approx(695e6, rel=0.01)  # OpenCLIP bigG text
    assert counts["vae"] == pytest.approx(83.65e6, rel=0.01)
    for name, m in comps.items():
        if isinstance(m, torch.nn.Module):
            assert all(p.is_meta for p in m.parameters()), name
    # 4.7 B parameters would be ~19 GB in fp32; building them allocated next to nothing
    assert grown < 500, f"peak RSS grew by {grown:.0f} MB"
    assert comps["unet"].config.cross_attention_dim == 2048
    assert type(comps["scheduler"]).__name__ == "EulerDiscreteScheduler"


def test_sdxl_random_pipeline_assembles_without_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole build path (meta -> materialize -> pipeline), aimed at the meta device."""
    monkeypatch.setattr(dm, "pick_device", lambda requested=None: "meta")
    pipe = dm.build_pipeline("controlnet", "sdxl-random", dtype="float16")
    assert type(pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    assert pipe.unet.dtype == torch.float16 and pipe.controlnet.dtype == torch.float16
    assert pipe.scheduler.config.use_karras_sigmas
    assert dm.size_multiple(pipe) == 32  # VAE 8 x two UNet downsamplings


def test_materialize_fills_params_and_keeps_buffers() -> None:
    """The meta -> device step on small models: no meta left, finite values, buffers intact."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from actors import diffusion_configs as cfg

    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg.TINY_SDXL_UNET)
        tok = dm.make_clip_tokenizer()
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        text = CLIPTextModel(CLIPTextConfig(**cfg.TINY_CLIP_TEXT, **ids))
    for module in (unet, text):
        dm.materialize(module, "cpu", torch.float32, seed=3)
        params = list(module.parameters())
        assert not any(p.is_meta for p in params)
        assert all(torch.isfinite(p).all() for p in params)
        assert all(p.std() > 0 for p in params if p.numel() > 1 and p.dim() > 1)
    (pos,) = [b for name, b in text.named_buffers() if name.endswith("position_ids")]
    assert torch.equal(pos.flatten(), torch.arange(77))
    norm = unet.conv_norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # norms reset to identity
    ids = tok(["a cat"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and np.isfinite(text(ids).pooler_output.detach().numpy()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (full-size SDXL)")
def test_sdxl_random_generates_on_gpu() -> None:
    from actors.colormap import mask_to_color
    from actors.mask2img import Mask2Img

    actor = Mask2Img("sdxl-random", steps=2, resolution=768, dtype="float16")
    mask = np.zeros((480, 640), np.uint8)
    mask[100:300, 200:500] = 1
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    batch = {"sample_id": np.array(["x/imgsyn/0"], dtype=object),
             "prompt": np.array(["a room"], dtype=object), "seed": np.array([1], dtype=np.int64),
             "color_raw": np.array([mask_to_color(mask, palette).tobytes()], dtype=object),
             "height": np.array([480], dtype=np.int32), "width": np.array([640], dtype=np.int32)}
    out = actor(batch)
    assert len(out["image_raw"][0]) == 480 * 640 * 3
    assert out["generator"][0] == "sdxl-random"
