"""Samplers by name: diffusers schedulers configured from a model's own scheduler config.

Any diffusion stage (Text2Mask, Mask2Img, and later graphs) picks its sampler with one string;
:func:`make_scheduler` turns it into a diffusers scheduler on the model's trained betas, so the
model's noise levels (its DDPM ``alphas_cumprod``) stay the ones it learned. No sampling loop is
written here: every option is a stock diffusers scheduler with a few config keys set.

``edm`` (SegGen's default): SegGen samples with "the default EDM sampler (Karras et al., 2022)"
of Stability's SGM code, i.e. ``EulerEDMSampler`` with ``s_churn=0`` (no noise injection, no 2nd
order correction) on an eps-prediction UNet through ``DiscreteDenoiser``. diffusers' equivalent is
``EulerDiscreteScheduler`` (same Euler step ``x += (σ_next - σ) * (x - x0) / σ``, same
``c_in = 1/sqrt(σ²+1)`` input scaling, same final σ = 0) with ``use_karras_sigmas=True`` (EDM's
ρ = 7 spacing) and ``timestep_spacing="linspace"``: diffusers takes the Karras σ range from the
first and last σ of the spaced timesteps, and only "linspace" spans the full trained range, t = 999
(σ_max ≈ 14.61 for SDXL/SD1.5) down to t = 0 (σ_min ≈ 0.029), whatever the step count. SDXL's own
"leading" spacing starts at t = 976 for 40 steps (σ 12.7 < σ_max): that is ``euler-karras-leading``,
this project's previous behaviour. diffusers' ``EDMEulerScheduler`` is not used: it feeds the UNet
``c_noise = log(σ)/4`` with σ_data = 0.5 preconditioning, i.e. for EDM-parameterised models, not
the eps-prediction SDXL/SD1.5 UNets. Differences to SGM that remain (both tiny): diffusers feeds
the UNet the fractional timestep of each Karras σ, where SGM rounds it to the nearest integer; the
first latent is drawn with std σ_max, where SGM uses sqrt(1 + σ_max²) (0.2% apart at σ 14.6).

``sgm-ddpm``: SGM's literal sampling default for SDXL (its demo's ``EulerEDMSampler`` over
``LegacyDDPMDiscretization``): Euler over the DDPM σ at evenly spaced integer timesteps from 999
down (not Karras-spaced). diffusers' "trailing" spacing gives exactly SGM's timesteps when the
step count divides 1000 (SegGen's 40 and 200; tested), and within one timestep otherwise.

Heavy imports (diffusers, torch) happen inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# name -> (diffusers class name, config overrides on top of the model's scheduler config)
_EULER_PLAIN = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "final_sigmas_type": "zero", "interpolation_type": "linear", "timestep_type": "discrete",
                "sigma_min": None, "sigma_max": None}
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "edm": ("EulerDiscreteScheduler", _EULER_PLAIN | {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "sgm-ddpm": ("EulerDiscreteScheduler", _EULER_PLAIN | {"timestep_spacing": "trailing"}),
    "euler": ("EulerDiscreteScheduler", _EULER_PLAIN),
    "euler-karras-leading": ("EulerDiscreteScheduler", _EULER_PLAIN | {"use_karras_sigmas": True,
                                                                      "timestep_spacing": "leading"}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
}
SAMPLER_NAMES = tuple(SAMPLERS)
DEFAULT_SAMPLER = "edm"
# What the diffusion stages used before the ``sampler`` key existed (kept out of config hashes).
LEGACY_SAMPLER = "euler-karras-leading"


def make_scheduler(name: str, model_config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler called ``name`` on ``model_config``'s betas (a loaded pipeline's
    ``scheduler.config`` or ``diffusion_configs.LDM_SCHEDULER``)."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES}")
    cls_name, overrides = SAMPLERS[name]
    base = {k: v for k, v in dict(model_config).items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config(base | overrides)


def model_sigmas(model_config: Mapping[str, Any]) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every trained timestep t (ascending), from the betas as
    diffusers builds them — the table SGM's ``LegacyDDPMDiscretization`` reads."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(dict(model_config)).alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - alphas) / alphas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM's discretisation (Karras et al. 2022, Eq. 5): n σ from σ_max down to σ_min."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sgm_ddpm_timesteps(n: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """SGM ``generate_roughly_equally_spaced_steps``, high to low: the timesteps whose σ its
    ``LegacyDDPMDiscretization`` returns."""
    return np.linspace(num_train_timesteps - 1, 0, n, endpoint=False).astype(int)
