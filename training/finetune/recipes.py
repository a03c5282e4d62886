"""The fine-tuning recipes and their registry: ``kind`` in the config -> a recipe class.

Every recipe is a :class:`training.finetune.recipe_base.Recipe` (torchtune style: its driver,
set-up of model / optimizer / data, train step, evaluation, save / load; the loop is shared).

- Text2Mask (SegGen A.4): the SDXL UNet learns to draw the colour map of a caption.
- Mask2Img (SegGen A.4): a ControlNet made by ``ControlNetModel.from_unet`` learns
  [caption, colour map -> image]; the UNet stays frozen (diffusers' ``train_controlnet_sdxl``).
- LoRA (attn2mask Tab. 2, DreamBooth-LoRA): peft adapters on the UNet's attention
  projections learn the target domain's images; only adapter weights are saved.
- Textual inversion (AlignDiff Sec. 3.4): one embedding per given instance, the masked loss
  (:mod:`training.finetune.textual_inversion`).

A new recipe subclasses ``Recipe`` (or ``DenoisingRecipe``) and registers in ``RECIPES``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from training.finetune.denoising import META_NAME, UNET_PIPE, DenoisingRecipe
from training.finetune.models import unet_kwargs, vae_factor
from training.finetune.recipe_base import Recipe
from training.finetune.textual_inversion import TextualInversionRecipe

log = logging.getLogger(__name__)


class Text2MaskRecipe(DenoisingRecipe):
    """The UNet trains in full on [caption -> colour map]."""

    kind = "text2mask"
    target_key = "cond"  # the picture the model denoises: the colour map

    def _build(self, lora: Any, controlnet_path: str | None) -> Any:
        return self.comps["unet"].requires_grad_(True)

    def export(self, out: Path, meta: dict[str, Any]) -> None:
        """A whole pipeline folder (``model_index.json``, safetensors) for ``text2mask.model.local_path``."""
        self.pipeline().save_pretrained(out, safe_serialization=True)
        (out / META_NAME).write_text(json.dumps(meta, indent=1))

    def sample_metrics(self, images: np.ndarray) -> dict[str, float]:
        from training.finetune.validate import color_fidelity

        return {"val_fidelity": color_fidelity(images, np.asarray(self.w.meta["palette"], np.uint8))}


class Mask2ImgRecipe(DenoisingRecipe):
    kind = "mask2img"
    target_key = "target"
    needs_cond = True

    def _build(self, lora: Any, controlnet_path: str | None) -> Any:
        from diffusers import ControlNetModel

        if controlnet_path:
            net = ControlNetModel.from_pretrained(controlnet_path, use_safetensors=True, local_files_only=True)
        else:
            # one stride-2 conv per VAE downsampling: the conditioning embedding must land on the
            # latent grid (SDXL/SD1.5: 8 -> (16, 32, 96, 256); tiny VAE: 2 -> (16, 32))
            n = int(math.log2(vae_factor(self.comps["vae"]))) + 1
            net = ControlNetModel.from_unet(self.comps["unet"],
                                            conditioning_embedding_out_channels=(16, 32, 96, 256)[:n])
        return net.to(self.comps["unet"].device).requires_grad_(True).train()

    def predict(self, model: Any, noisy: Any, timesteps: Any, batch: dict[str, Any]) -> Any:
        kw = unet_kwargs(batch, self.family, self.resolution)
        cond = batch["cond"].permute(0, 3, 1, 2).float() / 255.0  # the pipeline feeds [0, 1]
        down, mid = model(noisy, timesteps, controlnet_cond=cond, return_dict=False, **kw)
        return self.comps["unet"](noisy, timesteps, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid, **kw).sample

    def pipeline(self) -> Any:
        cls = dm._pipeline_class("controlnet", self.family)
        pipe = cls(**{k: self.comps[k] for k in UNET_PIPE if k in self.comps}, controlnet=self.module,
                   **dm._extras(self.family))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export(self, out: Path, meta: dict[str, Any]) -> None:
        """A ControlNet folder (``config.json`` + safetensors) for ``mask2img.controlnet.local_path``."""
        self.module.save_pretrained(out, safe_serialization=True)
        (out / META_NAME).write_text(json.dumps(meta, indent=1))


class LoraRecipe(DenoisingRecipe):
    kind = "lora"
    target_key = "target"

    def _build(self, lora: Any, controlnet_path: str | None) -> Any:
        from peft import LoraConfig

        unet = self.comps["unet"].requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                                    init_lora_weights="gaussian", target_modules=list(lora.target_modules)))
        for name, p in unet.named_parameters():  # only the adapters train
            p.requires_grad_("lora_" in name)
        return unet

    def state_dict(self, module: Any) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(module)

    def load_state_dict(self, module: Any, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint has unexpected keys, e.g. {result.unexpected_keys[0]}")

    def export(self, out: Path, meta: dict[str, Any]) -> None:
        """Adapter weights only (``pytorch_lora_weights.safetensors``), for ``load_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        cls = dm._pipeline_class("text2img", self.family)
        layers = convert_state_dict_to_diffusers(self.state_dict(self.module))
        out.mkdir(parents=True, exist_ok=True)
        cls.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
        (out / META_NAME).write_text(json.dumps(meta, indent=1))


RECIPES: dict[str, type[Recipe]] = {"text2mask": Text2MaskRecipe, "mask2img": Mask2ImgRecipe, "lora": LoraRecipe,
                                    "textual_inversion": TextualInversionRecipe}


def recipe_class(kind: str) -> type[Recipe]:
    if kind not in RECIPES:
        raise ValueError(f"unknown recipe {kind!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[kind]


def make_recipe(kind: str, comps: dict[str, Any], family: str, resolution: int, lora: Any = None,
                controlnet_path: str | None = None) -> DenoisingRecipe:
    """A denoising recipe built in this process (tests, the benchmark, ``training.finetune.local``)."""
    cls = recipe_class(kind)
    if not issubclass(cls, DenoisingRecipe):
        raise ValueError(f"recipe {kind!r} is not built from components (it runs only through `segfactory finetune`)")
    return cls(comps, family, resolution, lora=lora, controlnet_path=controlnet_path)
