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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


class Text2MaskStage(Strict):
    """SegGen Text2Mask: a text-to-image model fine-tuned to draw colour maps (App. A.4 defaults)."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the fine-tuned Text2Mask weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(200, ge=1, description="sampling steps (SegGen: 200 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance (SegGen does not say; SDXL's default)")
    resolution: int = Field(768, ge=8, description="generation side (SegGen trains at 768)")


class Mask2ImgStage(Strict):
    """SegGen Mask2Img: ControlNet on SDXL (or SD 1.5) conditioned on the colour map."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="the base text-to-image weights")
    controlnet: ModelSpec = Field(default_factory=ModelSpec, description="the segmentation ControlNet weights")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=1), description="pool and batch")
    steps: int = Field(40, ge=1, description="sampling steps (SegGen: 40 with the EDM sampler)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance")
    controlnet_conditioning_scale: float = Field(1.0, ge=0, description="ControlNet residual scale")
    resolution: int = Field(768, ge=8, description="generation side; source aspect ratio kept, sides multiples of 8")


class CpuStage(Strict):
    """Resources of the CPU tasks between model pools (decode, colour maps, checks, encode)."""

    batch_size: int = Field(16, ge=1, description="rows per CPU task")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per CPU task")


class SourceConfig(Strict):
    path: str = Field("", description="source dataset directory (or a captions.jsonl for format=captions)")
    format: Literal["voc", "ade20k", "folder", "parquet", "captions"] = Field("voc", description="source layout")
    split: str | None = Field(None, description="which split to read; None = the format's default (voc/ade20k: train, folder: all)")
    classes: list[str] | None = Field(None, description="class names (index = class id) when the source has none")
    limit: int | None = Field(None, ge=1, description="read only the first N source rows (quick runs)")


class OutputConfig(Strict):
    path: str = Field("", description="output dataset directory")
    image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the image column")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format=jpeg")
    rows_per_shard: int = Field(64, ge=1, description="source rows per output shard (a shard is a fixed range)")
    overwrite: bool = Field(False, description="allow writing over an output made with another config")


class ImgSynConfig(Strict):
    samples_per_source: int = Field(2, ge=0, description="K images generated per real mask")
    first_copy: int = Field(0, ge=0, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


class MaskSynConfig(Strict):
    samples_per_caption: int = Field(2, ge=0, description="M new masks (each with its image) per caption")
    first_copy: int = Field(0, ge=0, description="index of the first copy: extends a dataset with copies first_copy.. (same ids, same seeds as one bigger run)")


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


# --- factory graph (Diffusion Synthesis) stages -------------------------------------------


class HfModelSpec(Strict):
    """Which transformers weights a factory stage loads (real presets; ignored by tiny)."""

    id: str = Field("", description="model id on the hub, e.g. IDEA-Research/grounding-dino-tiny")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="weights dtype on GPU (CPU always float32)")


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


class GenerateConfig(Strict):
    """One generation run. ``pipeline`` picks the graph, ``preset`` the weights."""

    pipeline: Literal["imgsyn", "masksyn", "seggen", "factory"] = Field(
        "seggen", description="graph to run; seggen = imgsyn + masksyn; factory = Diffusion Synthesis")
    preset: Literal["toy", "tiny", "sdxl", "sd15", "sdxl-random"] = Field("toy", description="which models are loaded")
    seed: int = Field(0, description="run seed; per-sample seeds derive from it and the sample_id")
    palette: Literal["auto", "voc", "ade20k", "ade20k-distinct"] | None = Field(
        None, description="colour-map palette; None = the source's own, else auto. The standard ADE20K "
        "palette repeats one colour (road = skyscraper); 'ade20k-distinct' fixes that for Text2Mask decoding")
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
    cpu: CpuStage = Field(default_factory=CpuStage, description="CPU tasks between pools")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="checks on generated rows")
    toy: ToyConfig = Field(default_factory=ToyConfig, description="toy preset settings")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray runtime settings")
    faults: FaultConfig = Field(default_factory=FaultConfig, description="fault injection (tests only)")

    def config_hash(self) -> str:
        """Hash of everything that changes the output bytes (paths and runtime knobs excluded)."""
        data = self.model_dump(mode="json")
        data["output"].pop("path")
        data["output"].pop("overwrite")
        data.pop("ray")
        data.pop("faults")
        data["source"].pop("path")
        factory_only = ("captioner", "grounding", "sam", "clip", "prompts", "factory", "selection")
        if self.pipeline != "factory":  # other graphs ignore them: keep their hashes as they were
            for key in factory_only:
                data.pop(key)
        for stage in ("text2mask", "mask2img", "captioner", "grounding", "sam", "clip"):
            if stage in data:
                data[stage].pop("resources")
        data["cpu"] = None
        for branch in ("imgsyn", "masksyn"):  # keep the hashes of datasets made before first_copy existed
            if data[branch]["first_copy"] == 0:
                data[branch].pop("first_copy")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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
