"""Samplers by name (actors/samplers.py): the schedules they produce, and that each runs."""

from __future__ import annotations

import numpy as np
import pytest

from actors import diffusion_configs as cfg
from actors import diffusion_models as dm
from actors import samplers as smp
from pipelines.config import GenerateConfig


def test_model_sigma_range_is_sdxls() -> None:
    sig = smp.model_sigmas(cfg.LDM_SCHEDULER)  # scaled_linear 0.00085..0.012, 1000 steps
    assert len(sig) == 1000 and abs(sig[-1] - 14.6146) < 1e-3 and abs(sig[0] - 0.02917) < 1e-4


@pytest.mark.parametrize("steps", [40, 200, 7])
def test_edm_is_karras_rho7_from_the_models_sigma_max(steps: int) -> None:
    sig = smp.model_sigmas(cfg.LDM_SCHEDULER)
    sched = smp.make_scheduler("edm", cfg.LDM_SCHEDULER)
    sched.set_timesteps(steps)
    got = sched.sigmas.numpy().astype(np.float64)
    assert len(got) == steps + 1 and got[-1] == 0.0  # Euler's last step lands on sigma 0
    assert abs(got[0] - sig[-1]) < 1e-3  # sigma_max of the model (t = 999), not 12.7
    want = smp.karras_sigmas(sig[0], sig[-1], steps, rho=7.0)
    np.testing.assert_allclose(got[:-1], want, rtol=1e-5)
    # rho = 7 and not another rho: sigma^(1/7) falls linearly
    np.testing.assert_allclose(np.diff(got[:-1] ** (1 / 7)), np.diff(got[:-1] ** (1 / 7))[0], rtol=1e-4)
    assert float(sched.init_noise_sigma) == pytest.approx(sig[-1], rel=1e-5)
    assert sched.timesteps[0] == pytest.approx(999.0)


def test_old_default_started_below_sigma_max() -> None:
    sched = smp.make_scheduler("euler-karras-leading", cfg.LDM_SCHEDULER)
    sched.set_timesteps(40)
    assert float(sched.sigmas[0]) == pytest.approx(12.74, abs=0.01)  # t = 976 with "leading"


@pytest.mark.parametrize("steps", [40, 200])
def test_sgm_ddpm_matches_sgm_legacy_discretization(steps: int) -> None:
    sig = smp.model_sigmas(cfg.LDM_SCHEDULER)
    sched = smp.make_scheduler("sgm-ddpm", cfg.LDM_SCHEDULER)
    sched.set_timesteps(steps)
    ts = smp.sgm_ddpm_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps.numpy(), ts)
    np.testing.assert_allclose(sched.sigmas.numpy()[:-1], sig[ts], rtol=1e-5)
    assert not sched.config.use_karras_sigmas


def test_every_sampler_draws_with_the_tiny_pipeline() -> None:
    import torch

    torch.set_num_threads(1)
    pipe = dm.build_pipeline("text2img", "tiny", device="cpu", sampler="ddim")
    images = {}
    for name in smp.SAMPLER_NAMES:
        pipe.scheduler = smp.make_scheduler(name, pipe.scheduler.config)
        out = pipe(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0))
        assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
        images[name] = out.images
    # the samplers are really different: edm and the old default give different pixels
    assert np.abs(images["edm"] - images["euler-karras-leading"]).max() > 1e-3
    with pytest.raises(ValueError, match="unknown sampler"):
        smp.make_scheduler("heun-2", cfg.LDM_SCHEDULER)


def test_config_sampler_key_reaches_the_actors_and_the_hash() -> None:
    from pipelines.graphs import RunContext
    from pipelines.graphs.base import mask2img_actor, text2mask_actor

    ctx = RunContext(classes=["bg", "a"], palette=np.zeros((2, 3), np.uint8), background=0)
    base = GenerateConfig(preset="tiny")
    assert base.text2mask.sampler == base.mask2img.sampler == "edm"
    c = GenerateConfig(preset="tiny", text2mask={"sampler": "ddim"},
                       mask2img={"sampler": "dpmpp-2m", "model": {"variant": "fp16"},
                                 "vae": {"id": "madebyollin/sdxl-vae-fp16-fix", "revision": "abc"}})
    (_, t2m), (_, m2i) = text2mask_actor(c, ctx), mask2img_actor(c, ctx)
    assert t2m["sampler"] == "ddim" and m2i["sampler"] == "dpmpp-2m" and m2i["variant"] == "fp16"
    assert m2i["vae"]["id"] == "madebyollin/sdxl-vae-fp16-fix" and t2m["vae"] is None
    assert c.config_hash() != base.config_hash()
    # keys added later leave older datasets' hashes alone (values computed before the keys
    # existed): toy ignores samplers; the old sampler and unset variant/vae hash as before
    assert GenerateConfig(preset="toy", mask2img={"sampler": "ddim"}).config_hash() == "2ab3b0819d0cbfe3"
    old = {"sampler": "euler-karras-leading"}
    assert GenerateConfig(preset="tiny", text2mask=old, mask2img=old).config_hash() == "5dbb21cf8923e514"
    assert GenerateConfig(preset="tiny", pipeline="factory", text2mask=old,
                          mask2img=old).config_hash() == "68aed0f3bf50976e"
    assert base.config_hash() != "5dbb21cf8923e514"  # the new default sampler changes the bytes
    with pytest.raises(Exception, match="sampler"):
        GenerateConfig(mask2img={"sampler": "heun-2"})
