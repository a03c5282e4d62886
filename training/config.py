"""Typed configuration of a segmentation training run (``segfactory train``).

Loaded with :func:`core.config.load_config`: YAML + dotted ``key=value`` overrides,
unknown keys are an error, every field has a description.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import RayConfig, Strict

STRATEGIES = ("mix", "pretrain_finetune", "synthetic_only", "real_only", "co_training")


class RealData(Strict):
    """The human-annotated dataset: its train split for training, its val split for eval."""

    path: str = Field("", description="source dataset directory (any format pipelines.sources reads)")
    format: Literal["voc", "ade20k", "coco", "folder", "parquet"] = Field("voc", description="source layout (coco: COCO-Stuff 164k PNGs, or panoptic JSON + PNGs -> semantic)")
    split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for periodic and final evaluation")
    classes: list[str] | None = Field(None, description="class names (index = id) when the source has none")
    limit: int | None = Field(None, ge=1, description="use only the first N training rows (quick runs)")


class LiveSource(Strict):
    """A generation graph streamed straight into training (samples made while the model trains)."""

    config: str = Field("", description="generation YAML, e.g. pipelines/configs/seggen-toy.yaml")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of that config (applied last)")
    actor_cpus: float = Field(0.25, gt=0, description="CPUs per generation model actor while sharing the machine with training")
    task_cpus: float = Field(0.25, gt=0, description="CPUs per generation CPU task while sharing the machine with training")


class SyntheticData(Strict):
    """Synthetic datasets (our Parquet directories) and/or a live generation graph."""

    paths: list[str] = Field(default_factory=list, description="synthetic dataset directories (OUT/ with shards/)")
    live: LiveSource | None = Field(None, description="generate synthetic samples on the fly instead of reading paths")
    volume: int | None = Field(None, ge=1, description="use only this many samples: a nested subset by a stable hash of sample_id (scaling sweeps)")


class MixConfig(Strict):
    """How strategy=mix draws its synthetic samples."""

    mode: Literal["independent", "variant"] = Field("independent", description="independent = a slot holds a sample of the "
                                                     "synthetic stream with probability p_aug (SegGen); variant = a real image is "
                                                     "replaced by one of its own synthetic variants (same source_id) with "
                                                     "probability p_aug (Diffusion Synthesis, Eq. 3)")


class CoTrainingConfig(Strict):
    """strategy=co_training: BECO (Rong et al., CVPR 2023, "Boundary-enhanced Co-training for Weakly
    Supervised Semantic Segmentation"), as attn2mask trains on its pseudo-masks (255 = unreliable).
    Defaults are BECO's official code: github.com/ShenghaiRong/BECO main.py ``beco_config`` (the same
    values as configs/beco.json); training.cotrain says what is implemented."""

    mix_prob: float = Field(0.5, ge=0, le=1, description="probability an image gets the classes of its batch partner "
                            "pasted in (BECO mix_prob 0.5)")
    boundary_size: int = Field(1, ge=0, description="boundary of a pasted region = dilation - erosion with a "
                               "(2 x this + 1)^2 kernel (BECO bdry_size 1: 3x3)")
    boundary_weight_label: tuple[float, float] = Field((0.2, 0.2), description="networks A, B: extra weight of the "
                                                       "pseudo-label loss on boundary pixels, 1 + w (BECO bdry_whb, bdry_whi 0.2)")
    boundary_weight_cross: tuple[float, float] = Field((0.0, 0.0), description="networks A, B: the same for the "
                                                       "cross-supervision loss (BECO bdry_wlb, bdry_wli 0)")
    confidence: float = Field(0.95, gt=0, lt=1, description="after warm-up, a pixel of the two networks' mean "
                              "prediction is a reliable label when its top probability passes this (BECO highres_t 0.95)")
    warmup_fraction: float = Field(0.0125, ge=0, le=1, description="share of the iterations before the online labels "
                                   "are used: mixing pastes pseudo-mask regions, no boundary weights "
                                   "(BECO warm_up 1 epoch of max_epoch 80)")
    ignore_background: bool = Field(True, description="never paste class 0 (BECO ignore_bg true)")


class TinyModel(Strict):
    """Sizes of the randomly initialised tiny model (preset=tiny)."""

    hidden_sizes: list[int] = Field([16, 32, 64, 128], description="SegFormer stage widths / Swin embed dim = first")
    depths: list[int] = Field([1, 1, 1, 1], description="blocks per encoder stage")
    decoder_hidden_size: int = Field(64, ge=8, description="SegFormer decode-head width / Mask2Former hidden dim")
    num_queries: int = Field(12, ge=1, description="Mask2Former object queries")


ARCHS = ("segformer", "mask2former", "deeplabv3", "deeplabv3plus")


class BackboneConfig(Strict):
    """An ImageNet-pretrained backbone under a freshly initialised head (``model.preset=backbone``).

    Weights: ``model.safetensors`` of a hub repo at a pinned revision, or of a local directory
    (never pickle, never remote code). transformers backbones (SegFormer's MiT, Mask2Former's
    ResNet / Swin) take their architecture from the repo's ``config.json``; DeepLab's torchvision
    ResNet takes it from ``resnet`` and reads transformers- or timm-layout ResNet weights. A
    catalogue name (core/catalogue.py) stands for id + revision: ``backbone: resnet-50`` or
    ``{name: resnet-50, resnet: resnet50, output_stride: 8}``."""

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        from core.catalogue import resolve_model

        return resolve_model(value, set(cls.model_fields))

    id: str = Field("", description="hub repo id, e.g. nvidia/mit-b0, microsoft/resnet-50, "
                    "microsoft/swin-large-patch4-window12-384-in22k, timm/resnet50.a1_in1k")
    revision: str = Field("main", description="pinned revision (a commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with model.safetensors (+ config.json); wins over `id`")
    resnet: Literal["resnet50", "resnet101", "resnet-tiny"] = Field("resnet50", description="DeepLab: the torchvision ResNet "
                                                                     "to build (resnet-tiny: tests and the toy domain)")
    output_stride: Literal[8, 16] = Field(8, description="DeepLab: dilation past this stride (mmseg d8 configs: 8; DeepLabv3+ paper: 16)")


class DeepLabHead(Strict):
    aspp_channels: int = Field(256, ge=4, description="ASPP / decoder width (DeepLabv3(+) papers: 256)")


class Mask2FormerHead(Strict):
    """Mask2Former's pixel decoder and transformer decoder around a pretrained backbone
    (defaults: the published models' — transformers' Mask2FormerConfig defaults)."""

    num_queries: int = Field(100, ge=1, description="object queries (Mask2Former paper: 100)")
    hidden_dim: int = Field(256, ge=8, description="transformer / pixel decoder width (256)")
    encoder_layers: int = Field(6, ge=1, description="deformable-attention pixel decoder layers (6)")
    decoder_layers: int = Field(10, ge=1, description="transformer decoder layers (transformers' 10: 9 masked-attention layers + 1)")
    train_num_points: int = Field(12544, ge=16, description="points sampled per mask for the mask loss (112 x 112)")


class ModelConfig(Strict):
    arch: Literal["segformer", "mask2former", "deeplabv3", "deeplabv3plus"] = Field(
        "segformer", description="segmentation architecture: segformer / mask2former (transformers), deeplabv3 / deeplabv3plus (torchvision ResNet)")
    preset: Literal["tiny", "pretrained", "backbone"] = Field(
        "tiny", description="tiny = random weights from a config built in code; pretrained = a whole model from_pretrained(id, revision); "
        "backbone = pretrained backbone (model.backbone) under a fresh head for the dataset's classes")
    id: str = Field("nvidia/mit-b0", description="hub model id for preset=pretrained, e.g. nvidia/mit-b0 or facebook/mask2former-swin-tiny-ade-semantic")
    revision: str = Field("main", description="pinned revision (commit hash) of `id`")
    local_path: str | None = Field(None, description="local directory with safetensors weights; wins over `id`")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="preset=backbone: the pretrained backbone")
    deeplab: DeepLabHead = Field(default_factory=DeepLabHead, description="DeepLab head sizes")
    mask2former: Mask2FormerHead = Field(default_factory=Mask2FormerHead, description="Mask2Former head sizes (preset=backbone)")
    tiny: TinyModel = Field(default_factory=TinyModel, description="tiny preset sizes")
    init_from: str | None = Field(None, description="checkpoint (or run) directory whose weights initialise the model")

    @model_validator(mode="after")
    def _backbone_given(self) -> ModelConfig:
        if self.preset == "backbone" and not (self.backbone.id or self.backbone.local_path):
            raise ValueError("model.backbone: preset=backbone needs model.backbone.id (+ revision) or model.backbone.local_path")
        if self.preset == "pretrained" and self.arch.startswith("deeplab"):
            raise ValueError("model.preset: DeepLab has no whole pretrained checkpoint here; use preset=backbone")
        return self


class OptimConfig(Strict):
    name: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(6e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="weight decay")
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    poly_power: float = Field(1.0, ge=0, description="poly schedule: lr = peak * (1 - step/iterations) ** power")
    min_lr: float = Field(0.0, ge=0, description="floor of the poly schedule")
    warmup_iters: int = Field(0, ge=0, description="linear warm-up steps before the poly decay")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this")
    backbone_lr_mult: float | None = Field(None, gt=0, description="backbone lr = lr x this; None = 0.1 for model.preset=pretrained "
                                           "or backbone (mmseg's SegFormer/Mask2Former recipes), 1.0 for tiny (nothing pretrained)")
    no_decay_norm_embed: bool = Field(False, description="no weight decay on normalisation layers, position/query/level embeddings "
                                      "(mmseg's norm_decay_mult=0 and custom_keys decay_mult=0 of its Mask2Former/Swin recipes)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW eps")


class AugConfig(Strict):
    crop_size: int = Field(512, ge=8, description="square training crop side (pads with ignore when smaller)")
    scale_min: float = Field(0.5, gt=0, description="smallest random rescale factor")
    scale_max: float = Field(2.0, gt=0, description="largest random rescale factor")
    base_size: int | None = Field(None, ge=8, description="rescale the short side to this before the random factor; None = the image's own size "
                                  "(mmseg RandomResize scale=(max_long_side, base_size), keep_ratio=True)")
    max_long_side: int | None = Field(None, ge=8, description="...unless the long side would pass this (times the same factor); "
                                      "None = no limit (mmseg ADE20K/VOC: 2048)")
    cat_max_ratio: float = Field(1.0, gt=0, le=1, description="random crop: retry (up to 10 times) while one class covers more than "
                                 "this share of the crop's labelled pixels (mmseg RandomCrop; 1.0 = off)")
    flip: bool = Field(True, description="random horizontal flip")
    photometric: bool = Field(False, description="mmseg PhotoMetricDistortion: brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, "
                              "hue +-18 (of 180), each with probability 0.5")
    mean: list[float] = Field([0.485, 0.456, 0.406], description="normalisation mean (RGB, 0..1)")
    std: list[float] = Field([0.229, 0.224, 0.225], description="normalisation std (RGB, 0..1)")

    @model_validator(mode="after")
    def _order(self) -> AugConfig:
        if self.scale_max < self.scale_min:
            raise ValueError(f"scale_max ({self.scale_max}) < scale_min ({self.scale_min})")
        return self


class EvalConfig(Strict):
    """The test protocol (mmsegmentation's): keep-ratio resize, whole or sliding-window
    inference, logits resized back to the original label size, 255 ignored (training.inference)."""

    short_side: int | None = Field(512, ge=8, description="resize so the short side is this (mmseg ADE20K: 512); null = native size. "
                                   "In a training config left unset it is aug.base_size: the test scale is training's scale")
    max_long_side: int | None = Field(2048, ge=8, description="...unless the long side would pass this (mmseg: 2048); null = no limit. "
                                      "In a training config left unset it is aug.max_long_side")
    mode: Literal["whole", "slide"] = Field("whole", description="whole image in one pass, or sliding windows (crop_size, stride)")
    crop_size: int = Field(512, ge=8, description="slide: window side (mmseg ADE20K: 512)")
    stride: int = Field(341, ge=1, description="slide: window step (mmseg ADE20K: 341)")
    flip: bool = Field(False, description="test-time horizontal flip (probabilities averaged)")
    scales: list[float] = Field([1.0], min_length=1, description="test-time scales, ratios of the resized size "
                                "(mmseg multi-scale: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])")


class DataConfig(Strict):
    """Ray Data side of ingest: the CPU transform tasks and how far ahead they run."""

    transform_batch_size: int = Field(16, ge=1, description="rows per decode/augment map_batches task")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per decode/augment task")
    prefetch_batches: int = Field(2, ge=0, description="batches iter_torch_batches prefetches per stream")
    margin: float = Field(1.3, ge=1.0, description="streams are sized to needed rows * margin (a worker may take more than its share)")
    window_units: int = Field(16, ge=1, description="synthetic row groups read together and interleaved per map task, so a "
                              "batch's rows come from different row groups (source rows); a task holds this many row groups")
    row_group_cap: int = Field(1024, ge=1, description="most rows of a synthetic row group read as one unit; a larger group is "
                               "read once per piece of this many rows (warned: read amplification)")
    idle_sleep_s: float = Field(0.025, ge=0, le=1, description="a stream's Ray Data loop sleeps this long after a step with no task running, "
                                "instead of spinning a CPU while the trainer computes (training.ingest_idle); 0 = off")


class WorkersConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); false = CPU (gloo)")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker; leave room for Ray Data on small machines")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where Ray places the workers (Ray Train's ScalingConfig): PACK fills a node first; "
        "STRICT_SPREAD = one worker per node")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker; None = Ray's default")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU; "
                                                                "bf16 (CPU too); fp16 with a GradScaler; fp32")
    compile: bool = Field(False, description="torch.compile the model (first steps slower while it compiles)")


class PretrainConfig(Strict):
    """First stage of strategy=pretrain_finetune (synthetic only)."""

    iterations: int | None = Field(None, ge=1, description="pre-training steps; None = same as `iterations`")
    lr: float | None = Field(None, gt=0, description="pre-training peak lr; None = optim.lr")


class OutputConfig(Strict):
    path: str = Field("", description="run directory: config, metrics.csv, checkpoints, final.json")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (latest ones)")


class DebugConfig(Strict):
    fail_at_steps: list[int] = Field(default_factory=list, description="rank 0 raises once at each of these steps (tests restart/resume)")
    record_rows: bool = Field(False, description="each rank appends the rows every step consumed to rows-rank<r>.jsonl in "
                              "the (local) run directory (tests exact restarts)")


class TrainConfig(Strict):
    """One training run. ``strategy`` says how synthetic data is used."""

    strategy: Literal["mix", "pretrain_finetune", "synthetic_only", "real_only", "co_training"] = Field(
        "mix", description="mix | pretrain_finetune | synthetic_only | real_only | co_training (synthetic only, "
        "two networks co-trained on noisy pseudo-masks as BECO: `co_training`)")
    p_aug: float = Field(0.6, ge=0, le=1, description="mix: probability a real sample is replaced by a synthetic one (SegGen 0.6; Diffusion Synthesis alpha 0.4)")
    seed: int = Field(0, description="seed of model init, mixing draws and augmentation")
    iterations: int = Field(160000, ge=1, description="optimizer steps (iteration budget)")
    batch_size: int = Field(8, ge=1, description="samples per worker per micro-batch")
    total_batch_size: int | None = Field(None, ge=1, description="samples per optimizer step over all workers (papers quote this); "
                                         "when set, batch_size = total / (workers.num_workers x grad_accum), which must divide")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    eval_interval: int = Field(16000, ge=1, description="evaluate (and checkpoint) every N steps, and at the end")
    checkpoint_interval: int | None = Field(None, ge=1, description="checkpoint every N steps; None = at each eval")
    log_interval: int = Field(50, ge=1, description="report loss/lr/timings every N steps")
    eval_batch_size: int = Field(8, ge=1, description="eval samples per worker per batch")
    resume: bool = Field(False, description="continue from the latest checkpoint in output.path")
    mix: MixConfig = Field(default_factory=MixConfig, description="strategy=mix: independent stream or per-image variants")
    co_training: CoTrainingConfig = Field(default_factory=CoTrainingConfig, description="strategy=co_training: BECO's knobs")
    real: RealData = Field(default_factory=RealData, description="the real dataset")
    synthetic: SyntheticData = Field(default_factory=SyntheticData, description="synthetic data")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    aug: AugConfig = Field(default_factory=AugConfig, description="augmentation (runs in Ray Data)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation protocol (periodic, final, evaluate, predict)")
    data: DataConfig = Field(default_factory=DataConfig, description="Ray Data ingest")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Ray Train workers")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="pretrain_finetune's first stage")
    max_failures: int = Field(1, ge=-1, description="FailureConfig: restarts from the last checkpoint after a worker error (-1 = always)")
    output: OutputConfig = Field(default_factory=OutputConfig, description="run directory")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="testing hooks")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray runtime settings")

    @model_validator(mode="after")
    def _resolve(self) -> TrainConfig:
        """Derived values, so the resolved config (--print-config, config.yaml) says what runs."""
        if self.total_batch_size is not None:
            per = self.workers.num_workers * self.grad_accum
            if self.total_batch_size % per:
                raise ValueError(f"total_batch_size: {self.total_batch_size} is not divisible by workers.num_workers x grad_accum = {per}")
            if "batch_size" in self.model_fields_set and self.batch_size != self.total_batch_size // per:
                raise ValueError(f"batch_size: {self.batch_size} contradicts total_batch_size {self.total_batch_size} / {per}; give one")
            object.__setattr__(self, "batch_size", self.total_batch_size // per)
        if self.strategy == "co_training" and self.model.arch == "mask2former":
            raise ValueError("model.arch: strategy=co_training needs a per-pixel classifier (segformer, deeplabv3, "
                             "deeplabv3plus); Mask2Former has no per-pixel cross-entropy to co-train")
        # the test scale is the training scale unless the config says otherwise (mmseg: one `scale` for both)
        given = self.eval.model_fields_set
        if "short_side" not in given:
            object.__setattr__(self.eval, "short_side", self.aug.base_size)
        if "max_long_side" not in given:
            object.__setattr__(self.eval, "max_long_side", self.aug.max_long_side)
        return self

    @property
    def p_synthetic(self) -> float:
        """Probability that a training slot holds a synthetic sample."""
        if self.strategy == "mix" and self.mix.mode == "variant":
            return 0.0  # variants replace real rows inside the real stream (training.variants)
        return {"mix": self.p_aug, "synthetic_only": 1.0, "co_training": 1.0}.get(self.strategy, 0.0)

    def samples_needed(self, p: float) -> int:
        """Rows a stream with share ``p`` must supply over the whole budget (all workers)."""
        total = self.iterations * self.grad_accum * self.batch_size * self.workers.num_workers
        if p <= 0:
            return 0
        slack = 4 * self.batch_size * self.workers.num_workers  # prefetch + rounding per worker
        return int(math.ceil(total * p * self.data.margin)) + slack
