"""Config sections of the factory graph (Diffusion Synthesis): grounding, SAM, CLIP, prompts, selection."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import Strict
from pipelines.specs import HfModelSpec, Resources


class GroundingStage(Strict):
    """Grounding DINO: boxes of the target classes (used twice: masks, then re-segmentation)."""

    model: HfModelSpec = Field(default_factory=HfModelSpec, description="Grounding DINO weights")
    box_threshold: float = Field(0.3, ge=0, le=1, description="least query score (Grounded-SAM demo default 0.3)")
    text_threshold: float = Field(0.25, ge=0, le=1, description="least score of the class's tokens (Grounded-SAM: 0.25)")
    nms_threshold: float = Field(0.8, ge=0, le=1, description="per-class NMS IoU (Grounded-SAM simple demo: 0.8)")
    max_boxes: int = Field(32, ge=1, description="most boxes kept per image, best first")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")


class SamStage(Strict):
    """SAM (segment-anything): a mask per box, merged into one class-id map."""

    model_type: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="SAM architecture (the paper: ViT-H)")
    checkpoint: str = Field("", description="SAM checkpoint file (.pth read as tensors only, or .safetensors)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="SAM dtype on GPU")
    uncertain_band: float = Field(0.0, ge=0, le=0.5, description="pixels whose best mask probability is within this "
                                  "of 0.5 become 255 (ignore); 0 = off")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")


class ClipStage(Strict):
    """CLIP vision embeddings of the real image and each variant, for the similarity filter."""

    model: HfModelSpec = Field(default_factory=HfModelSpec, description="CLIP weights (vision tower + projection)")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")


class PromptsConfig(Strict):
    """Multi-way prompt generator: which ways, their mix, synonym/hyponym replacement."""

    ways: dict[Literal["caption", "caption_classes", "classes"], float] = Field(
        default_factory=lambda: {"caption_classes": 1.0},
        description="weight per way: caption only, caption + '; ' + class names (the paper's best), class names only")
    synonym_probability: float = Field(0.5, ge=0, le=1, description="chance each base class word of the caption is "
                                       "replaced by a synonym/hyponym (attn2mask: 0.5); 0 = off")
    synonyms: str | None = Field(None, description="synonym table JSON; None = the shipped VOC table (attn2mask Table 5)")


class FactoryConfig(Strict):
    """Diffusion Synthesis: variants per image."""

    samples_per_image: int = Field(5, ge=1, description="K variants generated per real image (the paper: 5)")
    drop_empty_masks: bool = Field(True, description="an image where no target class was found gives no variants")


class SelectionConfig(Strict):
    """High-quality image selection: keep thresholds of the two filters (None = filter off)."""

    similarity_threshold: float | None = Field(0.8, ge=-1, le=1, description="ε: keep a variant whose CLIP cosine "
                                               "similarity to the real image is > ε (the paper: 0.8)")
    reseg_miou_threshold: float | None = Field(0.5, ge=0, le=1, description="τ: keep a variant whose re-segmentation "
                                               "mIoU vs its mask is >= τ (not given in the paper; 0.5)")
    include_background: bool = Field(True, description="count the background class in the re-segmentation mIoU")
