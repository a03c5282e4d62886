"""Capture text-to-image cross-attention during the sampling pass that makes the image.

attn2mask, DiffuMask, Dataset Diffusion and AlignDiff's coarse masks all label a generated image
with the UNet's own cross-attention: the softmax over prompt tokens, per latent pixel, averaged
over heads, chosen UNet resolutions and chosen sampling steps. ``AttentionStore`` does that
without changing a single output value: it wraps every cross-attention processor of the UNet,
lets the original processor compute the layer output untouched, and recomputes the attention
probabilities of the **conditional** half of the batch on the side (classifier-free guidance
stacks ``[unconditional, conditional]``). The extra work is two projections and one softmax on
the captured layers and steps only.

Usage (SD1.5 or SDXL; any diffusers UNet2DConditionModel)::

    store = AttentionStore(token_indices_per_row=[[[5], [8, 9]], [[2]]],  # row -> class -> tokens
                           factors=(4,), step_range=(0, 50))
    with store.attached(pipe.unet):
        out = pipe(prompt=[...], ...)
    maps = store.maps()   # np.float32 [B, n_groups, h, w], h = latent_h // min(factors)

``factors`` are latent downsampling factors, so one setting fits every model and image size:
factor 4 is the 16x16 level of SD1.5 at 512 px (prompt-to-prompt's and DAAM's choice) and the
32x32 level of SDXL at 1024 px. A group's map is the mean over its tokens; rows with fewer
groups than others get zero maps for the missing ones. Steps are counted as UNet calls since
``attached`` began (one call per step with CFG batched, as diffusers does).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["AttentionStore"]


class AttentionStore:
    """Accumulates per-group cross-attention maps of a batch over chosen levels and steps.

    Args:
        token_indices_per_row: for each prompt row, a list of groups (e.g. classes), each a list
            of token positions in the tokenizer's padded sequence (position 0 is the start token).
        factors: latent downsampling factors whose cross-attention layers are captured
            (1 = latent resolution, 2, 4, 8 = coarser UNet levels).
        step_range: ``(start, stop)`` step indices captured, ``start <= step < stop``;
            None captures every step.
        seq_len: the text encoder's sequence length (77 for CLIP).
    """

    def __init__(self, token_indices_per_row: Sequence[Sequence[Sequence[int]]],
                 factors: Sequence[int] = (4,), step_range: tuple[int, int] | None = None,
                 seq_len: int = 77) -> None:
        self.rows = len(token_indices_per_row)
        if self.rows == 0:
            raise ValueError("AttentionStore: token_indices_per_row is empty")
        self.n_groups = max((len(groups) for groups in token_indices_per_row), default=0)
        if self.n_groups == 0:
            raise ValueError("AttentionStore: no token group in any row")
        self.factors = tuple(sorted({int(f) for f in factors}))
        if not self.factors or min(self.factors) < 1:
            raise ValueError(f"AttentionStore: factors must be positive integers, got {factors!r}")
        self.step_range = step_range
        # weights[b, t, g] = 1/len(group) for t in group g: a group's map is its tokens' mean
        self.weights = np.zeros((self.rows, seq_len, self.n_groups), dtype=np.float32)
        for b, groups in enumerate(token_indices_per_row):
            for g, tokens in enumerate(groups):
                tokens = [int(t) for t in tokens]
                bad = [t for t in tokens if not 0 <= t < seq_len]
                if bad:
                    raise ValueError(f"AttentionStore: row {b} group {g} has token positions "
                                     f"{bad} outside [0, {seq_len})")
                for t in tokens:
                    self.weights[b, t, g] += 1.0 / len(tokens)
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what was captured (the step counter restarts at 0)."""
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self._sums: dict[int, Any] = {}  # factor -> torch tensor [B, G, h, w] (float32)
        self._counts: dict[int, int] = {}  # factor -> layer-step contributions
        self._weights_t: Any = None

    def _step_wanted(self) -> bool:
        if self.step_range is None:
            return True
        start, stop = self.step_range
        return start <= self.step < stop

    # -- hooks -------------------------------------------------------------------------------
    def _on_unet_call(self, _module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.step += 1
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _level(self, n_pixels: int) -> tuple[int, int, int] | None:
        """(factor, h, w) of a layer with ``n_pixels`` query positions, if it is captured."""
        if self.latent_hw is None or not self._step_wanted():
            return None
        lh, lw = self.latent_hw
        factor = round(math.sqrt(lh * lw / n_pixels))
        if factor not in self.factors:
            return None
        h, w = -(-lh // factor), -(-lw // factor)  # the UNet's downsampling rounds up
        return (factor, h, w) if h * w == n_pixels else None

    def record(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any) -> None:
        """Add one cross-attention layer's conditional-half probabilities to the sums."""
        import torch

        if hidden_states.ndim == 4:  # (B, C, H, W) inputs, as the processor would reshape them
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        level = self._level(hidden_states.shape[1])
        if level is None:
            return
        factor, h, w = level
        total = hidden_states.shape[0]
        if total not in (self.rows, 2 * self.rows):
            raise RuntimeError(f"AttentionStore: UNet batch {total} is neither {self.rows} rows "
                               f"nor {2 * self.rows} (classifier-free guidance); one prompt "
                               "image per row is supported")
        with torch.no_grad():
            hs = hidden_states[total - self.rows:]  # CFG order is [unconditional, conditional]
            ehs = encoder_hidden_states[total - self.rows:]
            if attn.group_norm is not None:
                hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
            if attn.norm_cross:
                ehs = attn.norm_encoder_hidden_states(ehs)
            query = attn.head_to_batch_dim(attn.to_q(hs))
            key = attn.head_to_batch_dim(attn.to_k(ehs))
            probs = attn.get_attention_scores(query, key, None)  # (B*heads, N, T)
            probs = probs.float().view(self.rows, attn.heads, probs.shape[1], probs.shape[2])
            probs = probs.mean(dim=1)  # (B, N, T)
            if self._weights_t is None or self._weights_t.device != probs.device:
                self._weights_t = torch.from_numpy(self.weights).to(probs.device)
            weights = self._weights_t[:, : probs.shape[2]]
            maps = torch.einsum("bnt,btg->bgn", probs, weights).reshape(self.rows, self.n_groups, h, w)
            if factor in self._sums:
                self._sums[factor] += maps
            else:
                self._sums[factor] = maps.clone()
            self._counts[factor] = self._counts.get(factor, 0) + 1

    @contextlib.contextmanager
    def attached(self, unet: Any) -> Iterator[AttentionStore]:
        """Wrap the UNet's cross-attention processors (``set_attn_processor``) and count its
        calls; restores the original processors on exit, also on error."""
        self.reset()
        originals = dict(unet.attn_processors)
        wrapped = {name: _CaptureProcessor(self, proc) for name, proc in originals.items()}
        hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        unet.set_attn_processor(wrapped)
        try:
            yield self
        finally:
            hook.remove()
            unet.set_attn_processor(originals)

    # -- results -----------------------------------------------------------------------------
    def counts(self) -> dict[int, int]:
        """Layer-step contributions captured per factor (for logs and tests)."""
        return dict(self._counts)

    def maps(self) -> np.ndarray:
        """Mean maps, float32 [B, n_groups, h, w] at the finest captured factor: each factor's
        mean over its layers and steps, upsampled bilinearly, then averaged over factors."""
        import torch.nn.functional as F

        if not self._sums:
            raise RuntimeError(f"AttentionStore: nothing captured (factors {self.factors}, "
                               f"step_range {self.step_range}, {self.step + 1} UNet calls): "
                               "no cross-attention layer at those levels and steps")
        finest = min(self._sums)
        size = tuple(self._sums[finest].shape[-2:])
        out = None
        for factor, total in self._sums.items():
            mean = total / self._counts[factor]
            if tuple(mean.shape[-2:]) != size:
                mean = F.interpolate(mean, size=size, mode="bilinear", align_corners=False)
            out = mean if out is None else out + mean
        return (out / len(self._sums)).cpu().numpy().astype(np.float32)


class _CaptureProcessor:
    """Runs the original processor unchanged, then records cross-attention on the side."""

    def __init__(self, store: AttentionStore, inner: Any) -> None:
        self.store, self.inner = store, inner

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                         *args, **kwargs)
        if encoder_hidden_states is not None and attn.is_cross_attention:
            self.store.record(attn, hidden_states, encoder_hidden_states)
        return out
