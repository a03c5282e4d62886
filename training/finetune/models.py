"""Base components, frozen encoders and the denoising loss shared by every fine-tuning recipe.

No ray import: the Ray Data caching pass and the Ray Train workers both call these.
The conditioning follows diffusers' training scripts (``train_text_to_image_sdxl.py``,
``train_controlnet_sdxl.py``): SDXL uses the penultimate hidden states of both CLIP text
encoders, concatenated, plus the pooled projection of the second and the ``time_ids``
(original size, crop top-left, target size); SD1.5 uses the last hidden state of its one encoder.
Latents are ``vae.encode(x).latent_dist.sample() * scaling_factor`` with x in [-1, 1].
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from actors import diffusion_models as dm

log = logging.getLogger(__name__)


def build_components(preset: str, family: str, *, model_id: str = "", revision: str = "main",
                     local_path: str | None = None, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """unet, vae, text encoder(s), tokenizer(s) and scheduler of the base model, float32.

    ``local_path`` (a diffusers pipeline folder) wins with any preset; ``tiny`` builds the
    deterministic random tiny models (same ``seed`` = same weights, so the caching pass and the
    workers see one model); ``sdxl-random`` materialises the full-size SDXL with random weights.
    """
    import torch

    if local_path or preset in ("sdxl", "sd15"):
        cls = dm._pipeline_class("text2img", family)
        kwargs: dict[str, Any] = {"use_safetensors": True, "torch_dtype": torch.float32, **dm._extras(family)}
        if local_path:
            pipe = cls.from_pretrained(local_path, local_files_only=True, **kwargs)
        else:
            pipe = cls.from_pretrained(model_id, revision=revision or "main", **kwargs)
        keep = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
        comps = {k: v for k, v in pipe.components.items() if k in keep and v is not None}
    elif preset == "tiny":
        comps = dm.tiny_components(family, controlnet=False, seed=seed)
    elif preset == "sdxl-random":
        comps = dm.sdxl_random_components(controlnet=False)
        for name, comp in comps.items():
            if hasattr(comp, "to_empty"):
                comps[name] = dm.materialize(comp, device, torch.float32, seed=seed)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in comps:
            comps[name].to(device).requires_grad_(False).eval()
    return comps


def vae_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_prompts(comps: dict[str, Any], sdxl: bool, captions: list[str], device: Any) -> dict[str, Any]:
    """Captions through the pipeline's text encoder(s), as its ``encode_prompt`` does:
    ``prompt_embeds`` (SDXL: both encoders' penultimate hidden states, concatenated) and, for
    SDXL, ``pooled`` (the second encoder's projected embedding). Gradients flow where the
    caller allows them (textual inversion trains token embeddings through this)."""
    import torch

    encoders = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if sdxl else [])
    embeds, pooled = [], None
    for tok_name, enc_name in encoders:
        tok, enc = comps[tok_name], comps[enc_name]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        if sdxl:
            embeds.append(out.hidden_states[-2])
            if enc_name == "text_encoder_2":
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
        else:
            embeds.append(out[0])
    result = {"prompt_embeds": torch.cat(embeds, dim=-1)}
    if pooled is not None:
        result["pooled"] = pooled
    return result


class PairEncoder:
    """Frozen VAE + text encoders: captions -> embeddings, uint8 pixels -> scaled latents."""

    def __init__(self, comps: dict[str, Any], family: str, device: str = "cpu") -> None:
        self.comps, self.family, self.device = comps, family, device
        self.sdxl = family == "sdxl"

    def encode_text(self, captions: list[str]) -> dict[str, Any]:
        """``prompt_embeds`` (B, 77, D) and, for SDXL, ``pooled`` (B, P); frozen (no grads)."""
        import torch

        with torch.no_grad():
            return encode_prompts(self.comps, self.sdxl, list(captions), self.device)

    def encode_pixels(self, pixels: Any, generator: Any = None) -> Any:
        """uint8 (B, H, W, 3) numpy or torch -> latents (B, C, H/f, W/f) * scaling_factor."""
        import torch

        x = torch.as_tensor(np.asarray(pixels) if not torch.is_tensor(pixels) else pixels)
        x = x.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        vae = self.comps["vae"]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            return dist.sample(generator=generator) * vae.config.scaling_factor


def time_ids(orig_hw: Any, crop_tl: Any, resolution: int, device: Any) -> Any:
    """SDXL ``add_time_ids``: (original h, w, crop top, left, target h, w) per row, float."""
    import torch

    o, c = torch.as_tensor(orig_hw).reshape(-1, 2), torch.as_tensor(crop_tl).reshape(-1, 2)
    target = torch.full_like(o, resolution)
    return torch.cat([o, c, target], dim=1).to(device=device, dtype=torch.float32)


def noise_scheduler(comps: dict[str, Any]) -> Any:
    """DDPM training scheduler on the base model's betas (its prediction type included)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(comps["scheduler"].config)


def target_for(scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
    """What the model regresses: the noise (epsilon) or the velocity (v), as the scheduler says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported for training")


def unet_kwargs(batch: dict[str, Any], family: str, resolution: int) -> dict[str, Any]:
    """encoder_hidden_states (+ SDXL added_cond_kwargs) from an encoded batch."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": batch["prompt_embeds"]}
    if family == "sdxl":
        dev = batch["prompt_embeds"].device
        kwargs["added_cond_kwargs"] = {"text_embeds": batch["pooled"],
                                       "time_ids": time_ids(batch["orig_hw"], batch["crop_tl"], resolution, dev)}
    return kwargs


def draw_noise(latents: Any, scheduler: Any, generator: Any = None, timesteps: Any = None) -> tuple[Any, Any, Any]:
    """(noisy latents, noise, timesteps): uniform timesteps unless given (held-out loss)."""
    import torch

    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device, latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device).long()
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def eval_timesteps(scheduler: Any, count: int) -> list[int]:
    """``count`` evenly spaced timesteps over the training range (held-out loss)."""
    t = scheduler.config.num_train_timesteps
    return [min(t - 1, int(math.floor((i + 0.5) * t / count))) for i in range(count)]
