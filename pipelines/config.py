"""Typed, validated configuration: YAML + dotted ``key=value`` overrides → pydantic models.

Unknown keys are an error (``extra="forbid"``), every field has a description, and a bad
value becomes one line naming the key (:class:`ConfigError`, exit code 2 in the CLI).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

OMIT_DEFAULT = {"hash": "omit_default"}  # json_schema_extra: a field added after datasets existed
# stays out of the config hash while at its default (their hashes do not change)


class ConfigError(ValueError):
    """A bad command line or config; the message is one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ModelSpec(Strict):
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


class VaeSpec(Strict):
    """A VAE that replaces the pipeline's own (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 decoding)."""

    id: str = Field("", description="model id on the hub, e.g. madebyollin/sdxl-vae-fp16-fix")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    subfolder: str | None = Field(None, description="folder of the VAE inside the repo, e.g. 'vae' in a pipeline repo")
    variant: str | None = Field(None, description="weight file variant, e.g. 'fp16' (diffusers variant=)")


# Sampler names of actors.samplers.SAMPLERS (kept literal here: config must not import actors).
SamplerName = Literal["edm", "sgm-ddpm", "euler", "euler-karras-leading", "dpmpp-2m", "dpmpp-2m-karras", "ddim"]
_SAMPLER_DOC = ("diffusers scheduler by name (actors/samplers.py): edm = Euler over EDM's rho=7 sigmas from the "
                "model's sigma_max (SGM's EulerEDMSampler, SegGen's 'default EDM sampler'); sgm-ddpm = SGM's "
                "LegacyDDPMDiscretization; euler-karras-leading = this project's sampler before the key existed")


class Text2MaskStage(Strict):
    """SegGen Text2Mask: a text-to-image model fine-tuned to draw colour maps (App. A.4 defaults)."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the fine-tuned Text2Mask weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(200, ge=1, description="sampling steps (SegGen: 200 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance (SegGen does not say; SDXL's default)")
    resolution: int = Field(768, ge=8, description="generation side (SegGen trains at 768)")
    sampler: SamplerName = Field("edm", description=_SAMPLER_DOC)
    vae: VaeSpec | None = Field(None, description="VAE override (real presets); None = the model's own")


class Mask2ImgStage(Strict):
    """SegGen Mask2Img: ControlNet on SDXL (or SD 1.5) conditioned on the colour map."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the base text-to-image weights")
    controlnet: ModelSpec = Field(default_factory=ModelSpec, description="the segmentation ControlNet weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(40, ge=1, description="sampling steps (SegGen: 40 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance")
    controlnet_conditioning_scale: float = Field(1.0, ge=0, description="ControlNet residual scale")
    resolution: int = Field(768, ge=8, description="generation side; source aspect ratio kept, sides multiples of 8")
    sampler: SamplerName = Field("edm", description=_SAMPLER_DOC)
    vae: VaeSpec | None = Field(None, description="VAE override (real presets); None = the model's own")


class CpuStage(Strict):
    """Resources of the CPU tasks between model pools (decode, colour maps, checks, encode)."""

    batch_size: int = Field(16, ge=1, description="rows per CPU task")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per CPU task")


class SourceConfig(Strict):
    path: str = Field("", description="source dataset: a local directory or a URI (s3://, gs://, abfs://, hdfs://, file://); "
                      "a captions.jsonl for format=captions")
    format: Literal["voc", "ade20k", "folder", "parquet", "captions"] = Field("voc", description="source layout")
    split: str | None = Field(None, description="which split to read; None = the format's default (voc/ade20k: train, folder: all)")
    classes: list[str] | None = Field(None, description="class names (index = class id) when the source has none")
    limit: int | None = Field(None, ge=1, description="read only the first N source rows (quick runs)")


class OutputConfig(Strict):
    path: str = Field("", description="output dataset: a local directory or a URI (s3://, gs://, abfs://, hdfs://, file://)")
    image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the image column")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format=jpeg")
    rows_per_shard: int = Field(64, ge=1, description="source rows per output shard (a shard is a fixed range)")
    overwrite: bool = Field(False, description="allow writing over an output made with another config")
    writers: int = Field(2, ge=1, description="writer actors (spread over the nodes) that buffer and write the shards; "
                         "raise it with the number of nodes")
    writer_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per writer actor (0: they mostly wait on "
                                   "storage and must not starve the model pools of a small node)")
    progress_interval_s: float = Field(30.0, gt=0, description="seconds between progress log lines (shards done, "
                                       "samples/s, rejected, ETA)")


class ImgSynConfig(Strict):
    samples_per_source: int = Field(2, ge=0, description="K images generated per real mask")
    first_copy: int = Field(0, ge=0, json_schema_extra=OMIT_DEFAULT, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


class MaskSynConfig(Strict):
    samples_per_caption: int = Field(2, ge=0, description="M new masks (each with its image) per caption")
    first_copy: int = Field(0, ge=0, json_schema_extra=OMIT_DEFAULT, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


class ValidationConfig(Strict):
    max_rejected_fraction: float = Field(0.05, ge=0, le=1, description="exit 3 when more rows than this are rejected")
    min_image_std: float = Field(1.0, ge=0, description="an image whose pixel std is below this is 'constant'")
    min_foreground_fraction: float = Field(0.0, ge=0, le=1, description="MaskSyn: least share of non-background pixels")


class FaultConfig(Strict):
    """Fault injection, for tests of crash recovery; off by default."""

    stage: Literal["text2mask", "mask2img"] = Field("mask2img", description="which model stage misbehaves")
    die_after_batches: int | None = Field(None, ge=0, description="the actor process exits mid-batch after N batches (once per run)")
    raise_on_sample: str | None = Field(None, description="the model raises on the batch holding this sample_id")
    hang_after_shards: int | None = Field(None, ge=1, description="the driver stops consuming for good once N shards are written (a test kills it there)")


class ToyConfig(Strict):
    gap: float = Field(0.3, ge=0, le=1, description="toy Mask2Img's distance from the 'real' toy distribution")
    resolution: int = Field(128, ge=16, description="toy Text2Mask layout size")


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray address; None starts or joins a local instance")
    no_progress_timeout_s: float | None = Field(600.0, ge=0, description="a stall longer than this becomes an error; 0 or null = off (Ray Data's -1)")
    show_progress: bool = Field(True, description="Ray Data progress bars")
    wait_for_gpus: bool = Field(False, description="start even when the cluster has fewer GPUs than the pools' "
                                "minimum sizes need (an autoscaling cluster adds GPU nodes on demand); "
                                "false = fail at once with exit 2 instead of waiting")


# --- factory graph (Diffusion Synthesis) stages -------------------------------------------


class HfModelSpec(Strict):
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
    sampler: SamplerName = Field("edm", description=_SAMPLER_DOC)
    resolution: int = Field(512, ge=8, description="generation side (SD1.5: 512; SDXL configs: 1024)")
    attention_factors: list[int] = Field(default_factory=lambda: [4], min_length=1, description="latent "
                                         "downsampling factors whose cross-attention is captured: 4 = SD1.5's "
                                         "16x16 level at 512 px (prompt-to-prompt/DAAM), SDXL's 32x32 at 1024")
    step_window: tuple[float, float] = Field((0.5, 0.51), description="fractions [start, stop) of the sampling steps "
                                             "captured; default = the middle step only (t=50 of 100, see above)")
    prompts: Attn2MaskPrompts = Field(default_factory=Attn2MaskPrompts, description="prompt generator")
    mask: Attn2MaskMasks = Field(default_factory=Attn2MaskMasks, description="pseudo-mask stage")


# --- aligndiff graph (seed 000) ----------------------------------------------------------


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


class GenerateConfig(Strict):
    """One generation run. ``pipeline`` picks the graph, ``preset`` the weights."""

    pipeline: str = Field(
        "seggen", description="graph to run, a name in the registry (pipelines/graphs/): seggen = imgsyn + "
        "masksyn; factory = Diffusion Synthesis; attn2mask = cross-attention pseudo-masks; aligndiff = AlignDiff")
    preset: Literal["toy", "tiny", "sdxl", "sd15", "sdxl-random"] = Field("toy", description="which models are loaded")
    seed: int = Field(0, description="run seed; per-sample seeds derive from it and the sample_id")
    captions: Literal["captioner", "template"] | None = Field(
        None, description="what fills a caption the source lacks (a source's captions always win): captioner = "
        "the captioner pool (SegGen: BLIP-2 asked 'Question: What are shown in the photo? Answer:'), template = "
        "the class names in the mask; None = the graph's default (factory: captioner; seggen/imgsyn/masksyn: "
        "captioner under the sdxl/sd15 presets, template under toy/tiny/sdxl-random)")
    resources_profile: Literal["fit", "per-pool"] = Field(
        "fit", description="fit: when the pools' minimum sizes need more GPUs than the cluster has (counting "
        "a GPU-less machine as one GPU), every pool's num_gpus is scaled by one factor so they share the "
        "GPUs there are (one GPU runs every graph); per-pool: num_gpus as configured")
    palette: Literal["auto", "voc", "ade20k", "ade20k-distinct", "ade20k-by-name"] | None = Field(
        None, description="colour-map palette; None = the source's own, else auto. The standard ADE20K "
        "palette repeats one colour (road = skyscraper); 'ade20k-distinct' fixes that for Text2Mask decoding; "
        "'ade20k-by-name' colours each class like the ADE20K class of its name or synonym, for "
        "ADE20K-trained ControlNets (pipelines/palettes.py)")
    source: SourceConfig = Field(default_factory=SourceConfig, description="where real samples/captions come from")
    output: OutputConfig = Field(default_factory=OutputConfig, description="where the dataset goes")
    imgsyn: ImgSynConfig = Field(default_factory=ImgSynConfig, description="ImgSyn settings")
    masksyn: MaskSynConfig = Field(default_factory=MaskSynConfig, description="MaskSyn settings")
    text2mask: Text2MaskStage = Field(default_factory=Text2MaskStage, description="Text2Mask stage")
    mask2img: Mask2ImgStage = Field(default_factory=Mask2ImgStage, description="Mask2Img stage")
    captioner: CaptionerStage = Field(default_factory=CaptionerStage, description="captioner stage (factory)")
    grounding: GroundingStage = Field(default_factory=GroundingStage, description="Grounding DINO stage (factory)")
    sam: SamStage = Field(default_factory=SamStage, description="SAM stage (factory)")
    clip: ClipStage = Field(default_factory=ClipStage, description="CLIP embedding stage (factory)")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="prompt generator (factory)")
    factory: FactoryConfig = Field(default_factory=FactoryConfig, description="factory settings")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="image selection (factory)")
    attn2mask: Attn2MaskConfig = Field(default_factory=Attn2MaskConfig, description="attn2mask graph settings")
    cpu: CpuStage = Field(default_factory=CpuStage, description="CPU tasks between pools")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="checks on generated rows")
    toy: ToyConfig = Field(default_factory=ToyConfig, description="toy preset settings")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray runtime settings")
    faults: FaultConfig = Field(default_factory=FaultConfig, description="fault injection (tests only)")
    aligndiff: AlignDiffConfig = Field(default_factory=AlignDiffConfig, description="AlignDiff graph settings")
    fss: FssStage = Field(default_factory=FssStage, description="few-shot segmenter stage (aligndiff)")

    @field_validator("pipeline")
    @classmethod
    def _known_graph(cls, name: str) -> str:
        from pipelines.graphs import graph_names

        if name not in graph_names():
            raise ValueError(f"unknown graph {name!r}; known: {', '.join(graph_names())}")
        return name

    @field_validator("preset")
    @classmethod
    def _preset_runs_graph(cls, preset: str, info: ValidationInfo) -> str:
        from pipelines.graphs import get_graph

        pipeline = info.data.get("pipeline")  # absent when it failed its own check
        presets = get_graph(pipeline).presets if pipeline else (preset,)
        if preset not in presets:
            raise ValueError(f"the {pipeline} graph runs with presets {presets}")
        return preset

    def config_hash(self) -> str:
        """Hash of everything that changes the output bytes (paths and runtime knobs excluded).

        The common keys plus the sections the graph's registry entry lists (``hash_sections``);
        inside them, ``resources`` and fields marked ``hash: omit_default`` at their default
        are left out, so adding such a field keeps existing datasets' hashes.
        """
        from pipelines.graphs import get_graph

        keep = set(HASH_COMMON) | set(get_graph(self.pipeline).hash_sections)
        graph = get_graph(self.pipeline)
        data = {k: v for k, v in _hash_view(self).items() if k in keep}
        if graph.hash_extra is not None:
            data.update(graph.hash_extra(self, _hash_view(self)))
        data["output"].pop("path")
        data["output"].pop("overwrite")
        for knob in ("writers", "writer_num_cpus", "progress_interval_s"):  # runtime only: same bytes
            data["output"].pop(knob, None)
        data["source"].pop("path")
        data["cpu"] = None  # CPU task sizes never change bytes; the key stays for the old hashes
        _drop_unset_model_keys(data, toy=self.preset == "toy")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys of every graph's hash; each graph adds its own sections (pipelines.graphs.GraphSpec).
HASH_COMMON = ("pipeline", "preset", "seed", "palette", "source", "output", "validation", "cpu")


def _hash_view(model: BaseModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` less ``resources`` and omit-default fields at their default."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if name == "resources":
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("hash") == "omit_default" and value == info.get_default(call_default_factory=True):
            continue
        out[name] = _hash_view(value) if isinstance(value, BaseModel) else model.model_dump(
            mode="json", include={name})[name]
    return out


def _drop_unset_model_keys(data: dict[str, Any], toy: bool) -> None:
    """Keys added after datasets existed enter the hash only when they change the output:
    ``variant``/``vae`` when set, ``sampler`` when not the sampler used before it existed
    (the toy preset uses none of them)."""
    for stage in ("text2mask", "mask2img", "captioner", "grounding", "clip"):
        section = data.get(stage)
        if section is None:
            continue
        for key in ("model", "controlnet"):
            if key in section and section[key].get("variant") is None:
                section[key].pop("variant", None)
        if "vae" in section and (section["vae"] is None or toy):
            section.pop("vae")
        if "sampler" in section and (toy or section["sampler"] == "euler-karras-leading"):
            section.pop("sampler")


# --- loading ------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x]"]`` → nested dict; values parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}".splitlines()[0]) from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def first_error_line(exc: ValidationError) -> str:
    """One line naming the key of the first validation error."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def load_config(model: type[BaseModel], path: str | Path | None, overrides: list[str] = ()) -> BaseModel:
    """Read YAML (optional), merge overrides, validate into ``model``; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = merge(data, parse_overrides(list(overrides)))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(first_error_line(exc)) from None
