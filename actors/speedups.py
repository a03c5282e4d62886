"""Denoising speed options for the diffusion actors (Text2Mask, Mask2Img), applied once per actor.

- ``channels_last``: the UNet, ControlNet and VAE in NHWC memory format (convolutions on tensor
  cores without layout transposes).
- ``fuse_qkv``: diffusers' fused QKV projections (one matmul instead of three per attention).
- ``compile``: ``regional`` compiles each repeated block of the UNet and ControlNet once — the
  transformer layers and ResNet blocks, diffusers' ``compile_repeated_blocks`` — so compile time
  is that of one block per shape, not of the whole network (published: 5-7x less warm-up);
  ``full`` compiles the whole UNet and ControlNet. ``compile_mode``: ``torch.compile``'s mode
  (``reduce-overhead`` adds CUDA graphs where shapes are static; ``max-autotune`` also tunes
  kernels). The compiled artifacts persist on the node in ``$SEGFACTORY_COMPILE_CACHE`` (default
  ``~/.cache/segfactory/torchinductor``), so a restarted actor or a second run reuses them.

None of these is bit-exact against eager bf16, so each enters the config hash when set
(``OMIT_DEFAULT`` keeps existing datasets' hashes at the defaults). All are off by default: they
have not been measured on a GPU yet (benchmarks/bench_gpu.py reports each alone and combined).
FP8 (torchao's float8 on the UNet's linear layers; no convolution kernels) is not offered: it
needs a Hopper-class GPU to build or check, and none was available to this change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPILE = ("none", "regional", "full")
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # the UNet's and ControlNet's repeated layers
DENOISERS = ("unet", "controlnet")


def compile_cache_dir() -> str:
    """Where inductor keeps compiled kernels on this node (set once, before the first compile)."""
    default = Path(os.environ.get("SEGFACTORY_COMPILE_CACHE", "~/.cache/segfactory/torchinductor")).expanduser()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def apply_speedups(pipe: Any, *, compile: str = "none", compile_mode: str = "default",
                   fuse_qkv: bool = False, channels_last: bool = False, backend: str = "inductor") -> list[str]:
    """Apply the options to ``pipe`` in place; returns what was applied, for the actor's log.

    ``backend`` is torch.compile's (tests pass ``eager`` to check the wiring without inductor).
    """
    if compile not in COMPILE:
        raise ValueError(f"compile: {compile!r} is not one of {COMPILE}")
    import torch

    denoisers = [getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None]
    done: list[str] = []
    if channels_last:
        for module in [*denoisers, getattr(pipe, "vae", None)]:
            if module is not None:
                module.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if fuse_qkv:
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        for module in denoisers:
            # the UNet's and ControlNet's Attention layers predate diffusers' AttentionMixin fusion
            # (model.fuse_qkv_projections() skips them): fuse each, then use the processor that reads
            # to_qkv (self-attention) / to_kv (cross-attention)
            for layer in module.modules():
                if isinstance(layer, Attention):
                    layer.fuse_projections(fuse=True)
            module.set_attn_processor(FusedAttnProcessor2_0())
        done.append("fused qkv")
    if compile != "none":
        cache = compile_cache_dir()
        kwargs = {"mode": None if compile_mode == "default" else compile_mode, "backend": backend}
        for module in denoisers:
            if compile == "regional":
                module._repeated_blocks = REPEATED_BLOCKS  # diffusers compiles every module of these classes
                module.compile_repeated_blocks(**kwargs)
            else:
                module.compile(**kwargs)
        done.append(f"{compile} compile ({compile_mode}, cache {cache})")
    return done
