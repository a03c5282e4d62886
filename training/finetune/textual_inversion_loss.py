"""AlignDiff's normalized masked textual-inversion loss (seed 000, Sec. 3.4, Eq. 3).

    L = sum_{y_i=1} ||eps_i - eps_theta_i||^2 / #fg  +  lambda * sum_{y_i=0} ||eps_i - eps_theta_i||^2 / #bg

The denoising error is averaged over the foreground and the background pixels *separately*,
so an object that covers a small part of the image still gets half the say (lambda = 0.6 is
the authors' code default); plain textual inversion averages over all pixels and learns the
background instead.

The error lives at latent resolution while the mask is given at image resolution. The mask is
resized with area averaging (``F.interpolate(mode="area")``): each latent cell gets the
fraction of its image pixels that are foreground, ``w_i`` in [0, 1], and of those that are
background, ``b_i``. The two sums of Eq. 3 become weighted sums, ``sum w_i e_i / sum w_i`` and
``sum b_i e_i / sum b_i``. Where the mask is aligned with the latent grid this is Eq. 3 exactly;
elsewhere a boundary cell counts for both sides in proportion (nearest-neighbour resizing
would instead drop thin objects entirely). Ignored pixels (255) count for neither.

``||.||^2`` is summed over the latent channels, as in Eq. 3 (diffusers' textual-inversion
script takes the mean: a constant factor that Adam's step size does not see).
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = 255


def latent_weights(masks: Any, latent_hw: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> tuple[Any, Any]:
    """(foreground, background) weights at latent resolution from binary masks (B, H, W).

    ``masks`` holds 1 (foreground), 0 (background) or ``ignore_index``; the result are two
    (B, h, w) float tensors: the share of each latent cell's pixels that are fg / bg.
    """
    import torch
    import torch.nn.functional as F

    masks = torch.as_tensor(masks)
    fg = (masks == 1).float().unsqueeze(1)
    bg = (masks == 0).float().unsqueeze(1)
    both = torch.cat([fg, bg], dim=1)
    small = F.interpolate(both, size=tuple(latent_hw), mode="area")
    return small[:, 0], small[:, 1]


def normalized_masked_loss(noise_pred: Any, noise: Any, masks: Any, bg_weight: float = 0.6,
                           ignore_index: int = IGNORE_INDEX, eps: float = 1e-8) -> Any:
    """Eq. 3: fg-mean + ``bg_weight`` * bg-mean of the per-pixel squared error, batch-averaged.

    ``noise_pred``/``noise``: (B, C, h, w) latents' noise; ``masks``: (B, H, W) with 1 = the
    instance's class, 0 = everything else, ``ignore_index`` = not counted. An image with no
    foreground (or no background) pixel contributes 0 for that side.
    """
    import torch

    err = (noise_pred.float() - noise.float()).pow(2).sum(dim=1)  # (B, h, w): ||.||^2 per pixel
    w_fg, w_bg = latent_weights(masks, err.shape[-2:], ignore_index)
    w_fg, w_bg = w_fg.to(err.device), w_bg.to(err.device)
    fg = (err * w_fg).sum(dim=(1, 2)) / w_fg.sum(dim=(1, 2)).clamp_min(eps)
    bg = (err * w_bg).sum(dim=(1, 2)) / w_bg.sum(dim=(1, 2)).clamp_min(eps)
    return torch.mean(fg + bg_weight * bg)
