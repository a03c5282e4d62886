"""Config pieces several graphs (and training) share: resources, model weights, samplers, the
Mask2Img and captioner stages. Each graph's own sections live in its package
(``pipelines/graphs/<name>/config.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.catalogue import resolve_model
from core.config import OMIT_DEFAULT, Strict


class NamedModel(Strict):
    """A weights spec that may be given by catalogue name (``model: sdxl-base-1.0``, or
    ``{name: sdxl-base-1.0, local_path: ...}``): core/catalogue.py resolves it to these fields."""

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        return resolve_model(value, set(cls.model_fields))


class Resources(Strict):
    """Where and how wide one stage runs: the only place num_gpus/batch/pool sizes are set."""

    batch_size: int = Field(4, ge=1, description="rows per map_batches call (one model call)")
    min_actors: int = Field(1, ge=1, description="actor pool minimum size")
    max_actors: int = Field(1, ge=1, description="actor pool maximum size (autoscales up to it)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractional shares a GPU")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor or task")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'")

    @model_validator(mode="after")
    def _pool_bounds(self) -> Resources:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        return self


class ModelSpec(NamedModel):
    """Which weights a diffusion stage loads (presets sdxl/sd15; ignored by toy/tiny)."""

    id: str = Field("", description="model id on the hub, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="weights dtype on GPU (CPU always float32)")
    family: Literal["sdxl", "sd15"] = Field("sdxl", description="architecture family")
    variant: str | None = Field(None, json_schema_extra=OMIT_DEFAULT, description="weights variant, e.g. 'fp16': "
                                "only the *.fp16.safetensors files are loaded and prefetched; None = the plain files")
    lora_path: str | None = Field(None, json_schema_extra=OMIT_DEFAULT, description="LoRA adapter weights (segfactory "
                                  "finetune kind=lora: OUT/model) loaded into this base UNet with load_lora_weights; "
                                  "base models only, any preset")


class VaeSpec(NamedModel):
    """A VAE that replaces the pipeline's own (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 decoding)."""

    id: str = Field("", description="model id on the hub, e.g. madebyollin/sdxl-vae-fp16-fix")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    subfolder: str | None = Field(None, description="folder of the VAE inside the repo, e.g. 'vae' in a pipeline repo")
    variant: str | None = Field(None, description="weight file variant, e.g. 'fp16' (diffusers variant=)")


# Sampler names of actors.samplers.SAMPLERS (kept literal here: config must not import actors).
SamplerName = Literal["edm", "sgm-ddpm", "euler", "euler-karras-leading", "dpmpp-2m", "dpmpp-2m-karras", "ddim"]
SAMPLER_DOC = ("diffusers scheduler by name (actors/samplers.py): edm = Euler over EDM's rho=7 sigmas from the "
                "model's sigma_max (SGM's EulerEDMSampler, SegGen's 'default EDM sampler'); sgm-ddpm = SGM's "
                "LegacyDDPMDiscretization; euler-karras-leading = this project's sampler before the key existed")


class SpeedOptions(Strict):
    """Denoising speed options (actors/speedups.py). None is bit-exact against eager, so each
    enters the config hash when set; off by default until measured on a GPU."""

    compile: Literal["none", "regional", "full"] = Field("none", description="torch.compile of the UNet and "
                                                         "ControlNet: regional = each repeated block once (fast "
                                                         "warm-up), full = the whole network")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; reduce-overhead adds CUDA graphs where shapes are static")
    fuse_qkv: bool = Field(False, description="fused QKV projections (diffusers fuse_qkv_projections)")
    channels_last: bool = Field(False, description="UNet, ControlNet and VAE in channels-last memory format")

    def actor_kwargs(self) -> dict:
        """The ``speed`` argument of a diffusion actor: empty when every option is off."""
        return {} if self == SpeedOptions() else {"speed": self.model_dump()}


class Mask2ImgStage(Strict):
    """SegGen Mask2Img: ControlNet on SDXL (or SD 1.5) conditioned on the colour map."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the base text-to-image weights")
    controlnet: ModelSpec = Field(default_factory=ModelSpec, description="the segmentation ControlNet weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(40, ge=1, description="sampling steps (SegGen: 40 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance")
    controlnet_conditioning_scale: float = Field(1.0, ge=0, description="ControlNet residual scale")
    resolution: int = Field(768, ge=8, description="generation side; source aspect ratio kept, sides multiples of 8")
    sampler: SamplerName = Field("edm", description=SAMPLER_DOC)
    vae: VaeSpec | None = Field(None, description="VAE override (real presets); None = the model's own")
    speed: SpeedOptions = Field(default_factory=SpeedOptions, json_schema_extra=OMIT_DEFAULT,
                                description="denoising speed options (actors/speedups.py)")


class HfModelSpec(NamedModel):
    """Which transformers weights a factory stage loads (real presets; ignored by tiny)."""

    id: str = Field("", description="model id on the hub, e.g. IDEA-Research/grounding-dino-tiny")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="weights dtype on GPU (CPU always float32)")
    variant: str | None = Field(None, json_schema_extra=OMIT_DEFAULT, description="weights variant, e.g. 'fp16': "
                                "only model.fp16.safetensors is loaded and prefetched; None = the plain files")


class CaptionerStage(Strict):
    """Captions for images without one: BLIP (Diffusion Synthesis) or BLIP-2 (SegGen)."""

    kind: Literal["blip", "blip2"] = Field("blip", description="blip = BlipForConditionalGeneration; blip2 = Blip2ForConditionalGeneration")
    model: HfModelSpec = Field(default_factory=HfModelSpec, description="captioner weights")
    prompt: str | None = Field(None, description="text fed with the image; None = the kind's default (blip2: SegGen's "
                               "'Question: What are shown in the photo? Answer:', blip: none)")
    max_new_tokens: int = Field(30, ge=1, description="longest caption, in tokens")
    min_new_tokens: int = Field(0, ge=0, description="shortest caption, in tokens")
    num_beams: int = Field(1, ge=1, description="beam search width (1 = greedy)")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
