"""Config sections of the aligndiff graph (seed 000): the AlignDiff generator and the few-shot segmenter."""

from __future__ import annotations

from pydantic import Field

from core.config import Strict
from pipelines.specs import HfModelSpec, ModelSpec, Resources


class FssStage(Strict):
    """AlignDiff's few-shot segmenter: prototype matching on frozen DINOv2 patch features."""

    model: HfModelSpec = Field(default_factory=HfModelSpec, description="backbone weights (transformers Dinov2Model)")
    image_size: int = Field(448, ge=8, description="side the image is resized to for the backbone (DINOv2 patch 14: "
                            "448 = 32x32 patches)")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=0.25), description="pool and batch")


class AlignDiffConfig(Strict):
    """AlignDiff: bank embeddings as adjectives, coarse attention masks, two-round FSS refinement."""

    bank: str = Field("", description="embedding bank (path or URI) written by `segfactory finetune` "
                      "kind=textual_inversion; its instances are the source's given pairs")
    samples_per_source: int = Field(20, ge=1, description="synthetic samples per given pair (the paper's FSS-1000 "
                                    "runs add 20 per real sample, 1R+20S)")
    plain_prompt_ratio: float = Field(0.5, ge=0, le=1, description="share of samples with the plain class prompt "
                                      "instead of a bank embedding (the paper mixes both, 'T.Inv. + Text'; no ratio given)")
    template: str = Field("a photo of a {}", description="prompt; '{}' becomes '<v*> <class>' or '<class>'")
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(family="sd15"), description="text-to-image weights "
                             "(the bank must have been trained on the same text encoder)")
    steps: int = Field(50, ge=1, description="sampling steps")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance (SD 1.x default)")
    resolution: int = Field(512, ge=8, description="square generation side (SD 1.x: 512)")
    attention_factors: list[int] = Field([4], description="latent downsampling factors whose cross-attention makes "
                                         "the coarse mask (4 = SD1.5's 16x16 level at 512 px, prompt-to-prompt's)")
    attention_steps: tuple[int, int] | None = Field(None, description="(start, stop) sampling steps captured; None = all")
    coarse_threshold: float = Field(0.5, ge=0, le=1, description="the min-max scaled attention map above this is "
                                    "the class (the paper does not say)")
    alpha: float = Field(0.8, ge=0, le=1, description="IoU consensus threshold of Algorithm 1 (authors' default 0.8)")
    relabel: bool = Field(True, description="round 2 relabels samples below alpha with the re-conditioned FSS (the "
                          "paper); false drops them as low_consensus_iou")
    keep_masks: bool = Field(False, description="also write the coarse and round-1 FSS masks (aligndiff_coarse_mask, "
                             "aligndiff_fss_mask PNG columns) for audit")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="generator pool and batch")
