"""Typed, validated configuration: YAML + dotted ``key=value`` overrides → pydantic models.

Unknown keys are an error (``extra="forbid"``), every field has a description, and a bad
value becomes one line naming the key (:class:`ConfigError`, exit code 2 in the CLI).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from core.config import OMIT_DEFAULT, RayConfig, Strict
from pipelines.graphs.aligndiff.config import AlignDiffConfig, FssStage
from pipelines.graphs.attn2mask.config import Attn2MaskConfig
from pipelines.graphs.factory.config import (
    ClipStage,
    FactoryConfig,
    GroundingStage,
    PromptsConfig,
    SamStage,
    SelectionConfig,
)
from pipelines.graphs.seggen.config import ImgSynConfig, MaskSynConfig, Text2MaskStage
from pipelines.specs import CaptionerStage, Mask2ImgStage


class CpuStage(Strict):
    """Resources of the CPU tasks between model pools (decode, colour maps, checks, encode)."""

    batch_size: int = Field(16, ge=1, description="rows per CPU task")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per CPU task")


class SourceConfig(Strict):
    path: str = Field("", description="source dataset: a local directory or a URI (s3://, gs://, abfs://, hdfs://, file://); "
                      "a captions.jsonl for format=captions")
    format: Literal["voc", "ade20k", "coco", "folder", "parquet", "captions"] = Field("voc", description="source layout (coco: COCO-Stuff 164k PNGs, or panoptic JSON + PNGs -> semantic)")
    split: str | None = Field(None, description="which split to read; None = the format's default (voc/ade20k: train, folder: all)")
    classes: list[str] | None = Field(None, description="class names (index = class id) when the source has none")
    limit: int | None = Field(None, ge=1, description="read only the first N source rows (quick runs)")


class OutputConfig(Strict):
    path: str = Field("", description="output dataset: a local directory or a URI (s3://, gs://, abfs://, hdfs://, file://)")
    image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the image column")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format=jpeg")
    rows_per_shard: int = Field(64, ge=1, description="source rows per output shard (a shard is a fixed range); "
                                "with samples_per_shard, the most source rows a shard takes")
    samples_per_shard: int | None = Field(None, ge=1, json_schema_extra=OMIT_DEFAULT, description="size a shard by "
                                          "samples: a shard takes samples_per_shard // (samples per source row) "
                                          "source rows (at least 1, at most rows_per_shard); None = rows_per_shard")
    row_group_rows: int = Field(128, ge=1, description="most rows per Parquet row group (what a reader reads at "
                                "least; a writer holds about one row group per shard it writes)")
    row_group_bytes: int = Field(128 << 20, ge=1, description="most image + mask bytes per row group (a row "
                                 "group ends at whichever of row_group_rows and this comes first)")
    lease_ttl_s: float = Field(120.0, gt=0, description="the output's lease expires this long after the running "
                               "generate's last renewal (it renews every ttl/4); a second run waits out no lease, "
                               "it stops with exit 2")
    overwrite: bool = Field(False, description="allow writing over an output made with another config")
    writers: int = Field(2, ge=1, description="writer actors (spread over the nodes) that buffer and write the shards; "
                         "raise it with the number of nodes")
    writer_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per writer actor (0: they mostly wait on "
                                   "storage and must not starve the model pools of a small node)")
    progress_interval_s: float = Field(30.0, gt=0, description="seconds between progress log lines (shards done, "
                                       "samples/s, rejected, ETA)")


class ValidationConfig(Strict):
    max_rejected_fraction: float = Field(0.05, ge=0, le=1, description="exit 3 when more rows than this are rejected")
    min_image_std: float = Field(1.0, ge=0, description="an image whose pixel std is below this is 'constant'")
    min_foreground_fraction: float = Field(0.0, ge=0, le=1, description="MaskSyn: least share of non-background pixels")


class FaultConfig(Strict):
    """Fault injection, for tests of crash recovery; off by default."""

    stage: Literal["text2mask", "mask2img"] = Field("mask2img", description="which model stage misbehaves")
    die_after_batches: int | None = Field(None, ge=0, description="the actor process exits mid-batch after N batches (once per run)")
    raise_on_sample: str | None = Field(None, description="the model raises on the batch holding this sample_id")
    batch_delay_s: float | None = Field(None, ge=0, description="the model stage sleeps this long per batch (a slow "
                                        "model: lets a test kill a node while shards are in flight)")
    device_error_after_batches: int | None = Field(None, ge=0, description="the model raises a CUDA error (a broken "
                                                   "device) on the batch after N batches (once per run)")
    hang_after_shards: int | None = Field(None, ge=1, description="the driver stops consuming for good once N shards are written (a test kills it there)")
    hold_after_shards: int | None = Field(None, ge=1, description="each writer, once it has written N shards, waits "
                                          "until <output>/.faults/release exists (local output; a test loses a node "
                                          "while shards are certainly unwritten)")


class ToyConfig(Strict):
    gap: float = Field(0.3, ge=0, le=1, description="toy Mask2Img's distance from the 'real' toy distribution")
    resolution: int = Field(128, ge=16, description="toy Text2Mask layout size")


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
    colocate: bool = Field(
        False, description="run the graph's diffusion pools (seggen: Text2Mask, colour coding and Mask2Img) as one "
        "actor per GPU instead of one pool per model: no two processes time-slicing a GPU; the merged pool takes "
        "the resources of the last one (mask2img.resources) and the batch size of the first. Same rows and "
        "seeds, so it stays out of the config hash")
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

    @model_validator(mode="after")
    def _only_sections_the_graph_reads(self) -> GenerateConfig:
        """A section of another graph that differs from its defaults would be silently ignored (and
        left out of the hash): refuse it, naming the first key that differs."""
        from pipelines.graphs import get_graph

        graph = get_graph(self.pipeline)
        for name in GRAPH_SECTIONS:
            if name in graph.sections:
                continue
            value = getattr(self, name)
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if value != default:
                key = _first_difference(name, value.model_dump(), default.model_dump())
                raise ValueError(f"{key}: the {graph.name} graph does not read the {name} section "
                                 f"(it reads {', '.join(graph.sections)})")
        return self

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
        # runtime only, or the same samples in another file layout (row groups): same dataset
        for knob in ("writers", "writer_num_cpus", "progress_interval_s", "row_group_rows", "row_group_bytes",
                     "lease_ttl_s"):
            data["output"].pop(knob, None)
        data["source"].pop("path")
        data["cpu"] = None  # CPU task sizes never change bytes; the key stays for the old hashes
        _drop_unset_model_keys(data, toy=self.preset == "toy")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


    def shard_rows(self) -> int:
        """Source rows per shard: ``output.rows_per_shard``, or what ``output.samples_per_shard``
        allows at this graph's samples per source row (at least one row, at most rows_per_shard)."""
        from pipelines.graphs import get_graph

        o = self.output
        if o.samples_per_shard is None:
            return o.rows_per_shard
        per_row = max(1, get_graph(self.pipeline).samples_per_row(self))
        return max(1, min(o.rows_per_shard, o.samples_per_shard // per_row))


# Sections that belong to one graph or another (the rest are common to every graph).
GRAPH_SECTIONS = ("imgsyn", "masksyn", "text2mask", "mask2img", "captioner", "grounding", "sam", "clip", "prompts",
                  "factory", "selection", "attn2mask", "aligndiff", "fss")


def _first_difference(prefix: str, value: Any, default: Any) -> str:
    """Dotted key of the first leaf where ``value`` differs from ``default``."""
    if isinstance(value, dict) and isinstance(default, dict):
        for key in value:
            if value[key] != default.get(key):
                return _first_difference(f"{prefix}.{key}", value[key], default.get(key))
    return prefix


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


