"""Periodic validation: held-out denoising loss, a PNG grid of samples, colour-map fidelity.

The held-out loss uses fixed noise and evenly spaced timesteps, so values at different steps
compare the model, not the draw. Colour-map fidelity (Text2Mask) is the fraction of sampled
pixels within the decode distance of a palette colour: half the smallest distance between two
candidate colours (classes + the ignore colour), i.e. the pixels nearest-colour decoding
assigns without ambiguity.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def decode_distance(palette: np.ndarray) -> float:
    """Half the smallest distance between two decodable colours (classes + ignore)."""
    from actors.colormap import default_ignore_color, min_pairwise_distance

    table = np.vstack([palette, np.asarray(default_ignore_color(palette), np.uint8)[None]])
    return 0.5 * min_pairwise_distance(np.unique(table, axis=0))


def color_fidelity(images: np.ndarray, palette: np.ndarray) -> float:
    """Fraction of pixels of (B, H, W, 3) uint8 maps within ``decode_distance`` of a colour."""
    from actors.colormap import default_ignore_color

    table = np.vstack([palette, np.asarray(default_ignore_color(palette), np.uint8)[None]]).astype(np.float32)
    px = np.asarray(images, np.float32).reshape(-1, 3)
    uniq, inverse = np.unique(px, axis=0, return_inverse=True)
    d2 = ((uniq[:, None, :] - table[None]) ** 2).sum(-1).min(1)
    ok = d2 <= decode_distance(palette) ** 2
    return float(ok[inverse.ravel()].mean())


def held_out_loss(recipe: Any, model: Any, batch: dict[str, Any], scheduler: Any, timesteps: list[int],
                  seed: int) -> float:
    """Mean denoising MSE over ``timesteps`` with noise seeded by ``seed`` (no grad)."""
    import torch

    from training.finetune.models import draw_noise, target_for

    gen = torch.Generator("cpu").manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for t in timesteps:
            ts = torch.full((batch["latents"].shape[0],), t, dtype=torch.long)
            noisy, noise, ts = draw_noise(batch["latents"], scheduler, gen, ts)
            pred = recipe.predict(model, noisy, ts, batch)
            total += float(torch.nn.functional.mse_loss(pred.float(), target_for(scheduler, batch["latents"], noise, ts).float()))
    return total / len(timesteps)


def sample_grid(recipe: Any, captions: list[str], conds: np.ndarray | None, resolution: int, steps: int,
                guidance: float, seed: int, out_png: Any) -> np.ndarray:
    """Sample one picture per caption (conditioned on ``conds`` for ControlNet), write them as
    one PNG row (conditions above when given) to ``out_png`` (a path or a
    :class:`core.storage.Location`: a URI works); returns the (B, R, R, 3) uint8 samples."""
    import io

    import torch
    from PIL import Image

    from actors.diffusion_models import images_to_uint8
    from core import storage

    pipe = recipe.pipeline()
    was = recipe.module.training
    recipe.module.eval()
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(captions))]
    kwargs: dict[str, Any] = {}
    if recipe.needs_cond and conds is not None:
        kwargs["image"] = [Image.fromarray(np.asarray(c, np.uint8)) for c in conds]
    with torch.no_grad():
        out = pipe(prompt=list(captions), generator=gens, height=resolution, width=resolution,
                   num_inference_steps=steps, guidance_scale=guidance, output_type="np", **kwargs)
    recipe.module.train(was)
    images = images_to_uint8(out.images)
    rows = [np.concatenate(list(images), axis=1)]
    if recipe.needs_cond and conds is not None:
        rows.insert(0, np.concatenate([np.asarray(c, np.uint8) for c in conds], axis=1))
    png = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(png, format="PNG")
    storage.write_bytes(storage.resolve(out_png), png.getvalue())
    return images
