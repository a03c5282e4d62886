"""Config section of the attn2mask graph (seed 002): cross-attention pseudo-masks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import Strict
from pipelines.specs import SAMPLER_DOC, ModelSpec, Resources, SamplerName

# --- attn2mask graph (seed 002): cross-attention pseudo-masks ------------------------------
# The seed file holds the paper's supplement only; the main text's method section was not
# available offline. Defaults from the supplement: synonym probability 0.5 (§5), Table 5's
# table, dCRF, reliability maps (Fig. 2). SD1.5, 100 steps and the attention of the middle step
# follow the published re-implementation of attn2mask in OVAM (Marcos-Manchón et al., CVPR
# 2024: "100 timesteps ... cross-attentions only to t=50 ... as specified in paper"). The
# adaptive threshold is Otsu's (our reading: the paper reports it helps, Table 4(b), but the
# supplement does not define it). Everything else is marked "ours".


class Attn2MaskPrompts(Strict):
    """Where prompts come from and how they are augmented."""

    mode: Literal["auto", "captions", "classes"] = Field("auto", description="auto = a source caption when it names a "
                                                         "class (the paper's caption corpus), else a class prompt; "
                                                         "captions = caption rows only; classes = class prompts only")
    templates: list[str] = Field(default_factory=lambda: ["a photo of {}"], min_length=1,
                                 description="class-prompt templates; {} becomes 'a dog and a cat' (ours)")
    max_objects: int = Field(2, ge=1, description="class prompts name 1..max_objects distinct classes (ours)")
    synonym_probability: float = Field(0.5, ge=0, le=1, description="chance a class word is replaced by a "
                                       "synonym/hyponym (attn2mask §5: 0.5)")
    synonyms: str | None = Field(None, description="synonym table JSON; None = the shipped VOC table (Table 5)")


class Attn2MaskMasks(Strict):
    """Pseudo-mask from the attention maps: threshold, dense CRF, reliability."""

    normalize: Literal["minmax", "max"] = Field("minmax", description="per-class map scaling to [0, 1] after "
                                                "upsampling: (x-min)/(max-min) or x/max (ours: the supplement does not say)")
    threshold: Literal["adaptive", "fixed"] = Field("adaptive", description="background score: adaptive = Otsu's "
                                                    "threshold per image (see above), fixed = fixed_threshold")
    fixed_threshold: float = Field(0.5, ge=0, le=1, description="background score when threshold=fixed (ours)")
    adaptive_min: float = Field(0.2, ge=0, le=1, description="lower clip of the adaptive threshold (ours)")
    adaptive_max: float = Field(0.8, ge=0, le=1, description="upper clip of the adaptive threshold (ours)")
    margin: float = Field(0.05, ge=0, le=1, description="pixels whose two best scores are within this are "
                          "unreliable (255); 0 = off (ours; the paper marks CRF disagreement only)")
    crf: bool = Field(True, description="refine with a dense CRF (pydensecrf); off = no refinement, only margin")
    crf_iterations: int = Field(10, ge=1, description="mean-field iterations (DeepLab's 10)")
    crf_gt_prob: float = Field(0.7, gt=0, lt=1, description="trust in the raw label (unary), as WSSS label CRFs")
    crf_bilateral_sxy: float = Field(80.0, gt=0, description="bilateral kernel spatial std (DeepLab: 80)")
    crf_bilateral_srgb: float = Field(13.0, gt=0, description="bilateral kernel colour std (DeepLab: 13)")
    crf_bilateral_compat: float = Field(10.0, ge=0, description="bilateral kernel weight (DeepLab: 10)")
    crf_gaussian_sxy: float = Field(3.0, gt=0, description="smoothness kernel spatial std (DeepLab: 3)")
    crf_gaussian_compat: float = Field(3.0, ge=0, description="smoothness kernel weight (DeepLab: 3)")
    min_reliable_foreground: float = Field(0.0, ge=0, lt=1, description="a row needs more than this share of "
                                           "reliable object pixels, else no_reliable_foreground")


class Attn2MaskConfig(Strict):
    """attn2mask: text-to-image generation whose own cross-attention labels the image."""

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(family="sd15"), description="text-to-image weights "
                             "(the paper: Stable Diffusion 1.5)")
    lora_path: str | None = Field(None, description="DreamBooth-LoRA adapter (pytorch_lora_weights.safetensors or its "
                                  "folder, as `segfactory finetune` kind=lora writes), loaded with load_lora_weights")
    lora_scale: float = Field(1.0, ge=0, description="adapter weight")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    samples_per_source: int = Field(1, ge=1, description="samples generated per source row (caption or slot)")
    first_copy: int = Field(0, ge=0, description="index of the first copy (extends a dataset, same ids/seeds)")
    steps: int = Field(100, ge=1, description="sampling steps (attn2mask via OVAM: 100)")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance (SD's default; ours)")
    sampler: SamplerName = Field("edm", description=SAMPLER_DOC)
    resolution: int = Field(512, ge=8, description="generation side (SD1.5: 512; SDXL configs: 1024)")
    attention_factors: list[int] = Field(default_factory=lambda: [4], min_length=1, description="latent "
                                         "downsampling factors whose cross-attention is captured: 4 = SD1.5's "
                                         "16x16 level at 512 px (prompt-to-prompt/DAAM), SDXL's 32x32 at 1024")
    step_window: tuple[float, float] = Field((0.5, 0.51), description="fractions [start, stop) of the sampling steps "
                                             "captured; default = the middle step only (t=50 of 100, see above)")
    prompts: Attn2MaskPrompts = Field(default_factory=Attn2MaskPrompts, description="prompt generator")
    mask: Attn2MaskMasks = Field(default_factory=Attn2MaskMasks, description="pseudo-mask stage")
