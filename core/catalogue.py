"""The model catalogue: every set of hub weights a shipped config loads, named once.

A config names a model instead of repeating its id and pinned commit::

    mask2img:
      model: sdxl-base-1.0                      # the whole spec from the table
      controlnet: {name: sdxl-base-1.0, local_path: models/my-controlnet}   # table + what differs

Resolution happens while the config is validated (before any other check), into the same
fields an explicit spec has, so a named model and the same model written out give the same
config and the same config hash. Only the keys the spec type has are taken from an entry
(``family`` for a diffusers spec, not for a transformers one). Every entry is pinned to a commit
(tests/test_safety.py checks) and loaded as safetensors, never with remote code.
"""

from __future__ import annotations

from typing import Any

# name -> spec keys (id, revision, family) and what the weights are
MODELS: dict[str, dict[str, Any]] = {
    "sdxl-base-1.0": {"id": "stabilityai/stable-diffusion-xl-base-1.0",
                      "revision": "462165984030d82259a11f4367a4eed129e94a7b", "family": "sdxl",
                      "what": "SDXL base 1.0: unet, vae, text_encoder(_2), tokenizer(_2), scheduler"},
    "sd-1.5": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "revision": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14", "family": "sd15",
               "what": "Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5's mirror)"},
    "blip-large": {"id": "Salesforce/blip-image-captioning-large",
                   "revision": "353689b859fcf0523410b1806dace5fb46ecdf41",
                   # the paper does not say which BLIP; public records list -base with pytorch_model.bin
                   # only, while -large carries model.safetensors (1,879,014,680 bytes) at this commit
                   "what": "BLIP captioner, ViT-L (Diffusion Synthesis)"},
    "blip2-opt-2.7b": {"id": "Salesforce/blip2-opt-2.7b", "revision": "51572668da0eb669e01a189dc22abe6088589a24",
                       # pinned commit found in public code; safetensors not checked here (offline)
                       "what": "BLIP-2 with OPT-2.7B: the lighter BLIP-2"},
    "resnet-50": {"id": "microsoft/resnet-50", "revision": "34c2154c194f829b11125337b98c8f5f9965ff19",
                  # pinned commit found in public code (a transformers test); safetensors not checked here (offline)
                  "what": "ResNet-50 v1.5, ImageNet-1k: the R50 backbone of Mask2Former (SegGen) and DeepLab (attn2mask, DS)"},
    "grounding-dino-tiny": {"id": "IDEA-Research/grounding-dino-tiny",
                            "revision": "a2bb814dd30d776dcf7e30523b00659f4f141c71",
                            "what": "Grounding DINO Swin-T (the paper's groundingdino_swint_ogc)"},
    "clip-vit-large-patch14": {"id": "openai/clip-vit-large-patch14",
                               "revision": "32bd64288804d66eefd0ccbe215aa642df71cc41",
                               "what": "CLIP ViT-L/14: image embeddings for the similarity filter"},
    "dinov2-small": {"id": "facebook/dinov2-small", "revision": "150c8e7bb7cef2d30ec31b13a517af14840ee3f7",
                     # pinned commit found in public code
                     "what": "DINOv2 ViT-S/14: AlignDiff's few-shot prototype features"},
}


def resolve_model(value: Any, fields: set[str]) -> Any:
    """``value`` with a catalogue name replaced by the entry's keys that ``fields`` has.

    A string is a name; a mapping with ``name`` is that entry updated by the mapping's other
    keys; anything else is returned as is (an explicit spec, validated as before).
    """
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        return value
    rest = {k: v for k, v in value.items() if k != "name"}
    name = value["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the catalogue (core/catalogue.py) has "
                          f"{', '.join(sorted(MODELS))}")
    entry = {k: v for k, v in MODELS[name].items() if k in fields}
    return {**entry, **rest}
