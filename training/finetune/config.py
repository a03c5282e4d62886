"""Typed configuration of a generator fine-tuning run (``segfactory finetune``).

Loaded with :func:`core.config.load_config` (YAML + dotted ``key=value`` overrides, unknown
keys are an error, every field described). Defaults follow SegGen App. A.4 (AdamW, lr 1e-5,
resolution 768, random flips, 30k iterations); the LoRA recipes follow attn2mask Tab. 2
(AdamW lr 2e-5, polynomial power 1.0, weight decay 0.01, 40k iterations).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import RayConfig, Strict
from pipelines.config import SourceConfig
from pipelines.specs import CaptionerStage, NamedModel, Resources

KINDS = ("text2mask", "mask2img", "lora", "textual_inversion")


class BaseModelSpec(NamedModel):
    """The pretrained weights a recipe starts from (ignored by preset tiny / sdxl-random unless
    ``local_path`` is given)."""

    id: str = Field("", description="hub model id, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local diffusers pipeline folder (safetensors); wins over `id`, any preset")
    controlnet_local_path: str | None = Field(None, description="mask2img: start from this ControlNet folder instead of from_unet")


class CaptionConfig(Strict):
    """Where each pair's caption comes from (generation's rule: a source's caption wins under auto)."""

    source: Literal["auto", "file", "captioner", "template"] = Field(
        "auto", description="auto = the source's captions.jsonl where a row has one, else what generation fills a "
        "missing caption with: the captioner under the sdxl/sd15 presets, the class-name template under "
        "tiny/sdxl-random; file = captions.jsonl only (a row without one goes to rejected/); captioner = the "
        "`captioner` section's model for every row (SegGen: BLIP-2 asked 'Question: What are shown in the photo? "
        "Answer:'), the source's captions ignored; template = the class-name template for every row")
    template: str = Field("{caption}", description="caption text; '{caption}' becomes the class-name caption, e.g. 'a photo of a dog and grass'")


class FinetuneCaptioner(CaptionerStage):
    """``generate``'s captioner section with SegGen's defaults: BLIP-2, and no GPU unless asked
    (like the caching pass's encoders)."""

    kind: Literal["blip", "blip2"] = Field("blip2", description="blip2 = Blip2ForConditionalGeneration (SegGen); "
                                           "blip = BlipForConditionalGeneration")
    resources: Resources = Field(default_factory=lambda: Resources(num_gpus=0.0, num_cpus=0.5),
                                 description="pool and batch (num_gpus > 0 on a GPU cluster)")


class FinetuneData(Strict):
    """How [caption, colour map, image] pairs are built and fed."""

    resolution: int = Field(768, ge=8, description="square training side: short side resized to it, centre crop (SegGen: 768)")
    flip: bool = Field(True, description="random horizontal flips (cached: both orientations are encoded once)")
    cache_latents: bool = Field(True, description="encode VAE latents + text embeddings once (Ray Data pass, Parquet under "
                                "output.path/cache); false = encode from pixels at every step")
    cache_path: str | None = Field(None, description="where the latent cache is written: a local path or a URI "
                                   "(s3://bucket/prefix) every node reads; None = output.path/cache. A cache made for "
                                   "the same base, source and pairs (its key.json) is reused")
    val_count: int = Field(4, ge=1, description="held-out pairs (from source.val_split) for the validation loss and samples")
    val_split: str = Field("val", description="source split the held-out pairs come from")
    encode_batch_size: int = Field(4, ge=1, description="rows per encoder call in the caching pass")
    encode_actors: int = Field(1, ge=1, description="encoder actor pool size in the caching pass")
    encode_num_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor (fractional shares one)")
    encode_num_cpus: float = Field(0.5, gt=0, description="CPUs per encoder actor / decode task")
    in_memory: bool = Field(False, description="keep each worker's share of the (cached) training rows in memory after "
                            "the first epoch instead of re-reading it every epoch; for small datasets only")
    shuffle_buffer: int = Field(64, ge=0, description="local shuffle buffer (rows) of the training stream; 0 = off")


class OptimConfig(Strict):
    lr: float = Field(1e-5, gt=0, description="peak learning rate (SegGen: 1e-5; attn2mask LoRA: 2e-5)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (attn2mask: 0.01; diffusers' default 1e-2)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    schedule: Literal["constant", "polynomial"] = Field("constant", description="lr schedule after warm-up "
                                                        "(SegGen does not say: constant, as diffusers' scripts; attn2mask: polynomial)")
    poly_power: float = Field(1.0, ge=0, description="polynomial schedule power (attn2mask: 1.0, i.e. linear decay)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global grad norm (diffusers' max_grad_norm 1.0); None = off")
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (an error if bitsandbytes is not importable)")


class LoraConfig(Strict):
    rank: int = Field(4, ge=1, description="LoRA rank (diffusers' DreamBooth-LoRA default 4)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None = rank (scale 1)")
    target_modules: list[str] = Field(["to_k", "to_q", "to_v", "to_out.0"], description="UNet attention projections that get adapters")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")


class TextualInversionConfig(Strict):
    """AlignDiff's normalized masked textual inversion (seed 000, Sec. 3.4): one adjective
    embedding per given instance (a source row x a class in its mask)."""

    bg_weight: float = Field(0.6, ge=0, description="lambda of Eq. 3: weight of the background-averaged loss "
                             "(the authors' code default 0.6)")
    template: str = Field("a photo of a {}", description="prompt; '{}' becomes '<v*> <class name>' (the paper's)")
    ids: list[str] | None = Field(None, description="train only these source ids (the few given pairs); None = all "
                                  "rows (after source.limit)")
    classes: list[str] | None = Field(None, description="only instances of these class names; None = every "
                                      "non-background class present")
    min_fraction: float = Field(0.001, ge=0, le=1, description="least share of the image a class must cover to "
                                "become an instance")
    bank_name: str = Field("bank.safetensors", description="file name of the embedding bank in output.path")
    shots_per_class: int | None = Field(None, ge=1, description="k-shot: keep the first k source rows (by id) of each class "
                                        "as its instances (AlignDiff's k given pairs per class); None = every instance")
    steps_per_instance: int | None = Field(None, ge=1, description="optimisation budget of each instance's embedding "
                                           "(AlignDiff: 3000 per instance); sets iterations = ceil(steps x instances / "
                                           "(batch_size x workers)); None = `iterations` shared by all instances")


class EmaConfig(Strict):
    enabled: bool = Field(False, description="keep an EMA of the trained weights (diffusers EMAModel); the output is the EMA")
    decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay")


class WorkersConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); false = CPU (gloo)")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per worker; leave room for Ray Data on small machines")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker; None = Ray's default")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp = DistributedDataParallel; fsdp = torch FSDP via Ray "
                                            "Train's prepare_model (shards the trained module for SDXL on small GPUs)")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (trained module)")
    frozen_bf16: bool = Field(True, description="with bf16 autocast on CUDA, store the weights that do not train "
                              "(the UNet under a ControlNet or LoRA, the VAE, the text encoders) in bf16, as "
                              "diffusers' example training scripts do: autocast re-casts float32 weights that "
                              "do not require grad at every use (no cast cache for them), twice with "
                              "checkpointing; the trained parameters stay float32")


class ValidationConfig(Strict):
    interval: int = Field(1000, ge=1, description="held-out loss, sample grid and checkpoint every N steps (and at the end)")
    samples: int = Field(4, ge=0, description="held-out captions sampled into the PNG grid; 0 = no samples")
    steps: int = Field(20, ge=1, description="sampling steps of the validation samples")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance of the validation samples")
    timesteps: int = Field(8, ge=1, description="fixed timesteps (evenly spaced) the held-out loss averages over")


class OutputConfig(Strict):
    path: str = Field("", description="run directory: config.yaml, metrics.csv, cache/, checkpoint_*/, samples/, model/, final.json")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (latest ones)")


class DebugConfig(Strict):
    fail_at_steps: list[int] = Field(default_factory=list, description="rank 0 raises once at each of these steps (tests restart)")


class FinetuneConfig(Strict):
    """One fine-tuning run: which generator (``kind``) from which weights (``preset``)."""

    kind: Literal["text2mask", "mask2img", "lora", "textual_inversion"] = Field(
        "text2mask", description="text2mask = UNet on [caption -> colour map]; mask2img = ControlNet on [caption, colour map "
        "-> image]; lora = peft LoRA on the UNet; textual_inversion = AlignDiff instance embeddings (an embedding bank)")
    preset: Literal["tiny", "sdxl", "sd15", "sdxl-random"] = Field("tiny", description="which weights the base is built from")
    family: Literal["sdxl", "sd15"] | None = Field(None, description="architecture family; None = the preset's (tiny: sdxl)")
    model: BaseModelSpec = Field(default_factory=BaseModelSpec, description="base weights")
    palette: Literal["auto", "voc", "ade20k", "ade20k-distinct"] | None = Field(
        None, description="colour-map palette; None = the source's own, else auto (as `generate` resolves it); recorded in the output")
    source: SourceConfig = Field(default_factory=SourceConfig, description="training pairs: any source `generate` reads")
    captions: CaptionConfig = Field(default_factory=CaptionConfig, description="captions")
    captioner: FinetuneCaptioner = Field(
        default_factory=FinetuneCaptioner,
        description="the captioner pool (the same keys and actor as `generate`'s captioner section) when captions "
        "come from it; set model.id/revision (or local_path) for the sdxl/sd15 presets")
    data: FinetuneData = Field(default_factory=FinetuneData, description="pairs, resolution, flips, latent cache")
    seed: int = Field(0, description="seed of noise, timesteps, flips and init")
    iterations: int = Field(30000, ge=1, description="optimizer steps (SegGen: 30,000)")
    batch_size: int = Field(1, ge=1, description="pairs per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    log_interval: int = Field(50, ge=1, description="report loss/lr/timings every N steps")
    checkpoint_interval: int | None = Field(None, ge=1, description="checkpoint every N steps; None = at each validation")
    resume: bool = Field(False, description="continue from the latest checkpoint in output.path (step count continues)")
    max_failures: int = Field(1, ge=-1, description="FailureConfig: restarts from the last checkpoint after a worker error")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter (kind=lora)")
    ema: EmaConfig = Field(default_factory=EmaConfig, description="EMA of the trained weights")
    textual_inversion: TextualInversionConfig = Field(default_factory=TextualInversionConfig,
                                                      description="AlignDiff textual inversion (kind=textual_inversion)")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Ray Train workers")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="periodic validation")
    output: OutputConfig = Field(default_factory=OutputConfig, description="run directory")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="testing hooks")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray runtime settings")

    @model_validator(mode="after")
    def _family(self) -> FinetuneConfig:
        fixed = {"sd15": "sd15", "sdxl": "sdxl", "sdxl-random": "sdxl"}.get(self.preset)
        if fixed and self.family not in (None, fixed):
            raise ValueError(f"family: preset {self.preset} is {fixed}, got {self.family}")
        if self.kind == "text2mask" and self.resolved_family != "sdxl":
            raise ValueError("family: Text2Mask is an SDXL model (SegGen); use preset tiny/sdxl/sdxl-random")
        return self

    @property
    def resolved_family(self) -> str:
        return self.family or {"sd15": "sd15"}.get(self.preset, "sdxl")
