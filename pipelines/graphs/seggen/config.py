"""Config sections of the SegGen graphs (seggen, imgsyn, masksyn): copies per source/caption, Text2Mask."""

from __future__ import annotations

from pydantic import Field

from core.config import OMIT_DEFAULT, Strict
from pipelines.specs import SAMPLER_DOC, ModelSpec, Resources, SamplerName, SpeedOptions, VaeSpec


class ImgSynConfig(Strict):
    samples_per_source: int = Field(2, ge=0, description="K images generated per real mask")
    first_copy: int = Field(0, ge=0, json_schema_extra=OMIT_DEFAULT, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


class MaskSynConfig(Strict):
    samples_per_caption: int = Field(2, ge=0, description="M new masks (each with its image) per caption")
    first_copy: int = Field(0, ge=0, json_schema_extra=OMIT_DEFAULT, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


class Text2MaskStage(Strict):
    """SegGen Text2Mask: a text-to-image model fine-tuned to draw colour maps (App. A.4 defaults)."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the fine-tuned Text2Mask weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(200, ge=1, description="sampling steps (SegGen: 200 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance (SegGen does not say; SDXL's default)")
    resolution: int = Field(768, ge=8, description="generation side (SegGen trains at 768)")
    sampler: SamplerName = Field("edm", description=SAMPLER_DOC)
    vae: VaeSpec | None = Field(None, description="VAE override (real presets); None = the model's own")
    speed: SpeedOptions = Field(default_factory=SpeedOptions, json_schema_extra=OMIT_DEFAULT,
                                description="denoising speed options (actors/speedups.py)")
