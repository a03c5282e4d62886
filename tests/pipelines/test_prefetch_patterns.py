"""Prefetch fetches exactly the files each model stage loads (no download here: the patterns are
applied to a hub repo's file list with huggingface_hub's own filter, as snapshot_download does)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from core.config import load_config
from pipelines import prefetch as pf
from pipelines.config import GenerateConfig
from pipelines.graphs import ModelRef

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"

# stabilityai/stable-diffusion-xl-base-1.0's layout: single-file checkpoints at the top, fp32 +
# fp16 copies of each component, ONNX / OpenVINO / Flax exports
SDXL_FILES = [
    "model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors", "scheduler/scheduler_config.json",
    *[f"{c}/{f}" for c in ("text_encoder", "text_encoder_2") for f in (
        "config.json", "model.safetensors", "model.fp16.safetensors", "model.onnx", "openvino_model.bin",
        "openvino_model.xml", "flax_model.msgpack")],
    *[f"{c}/{f}" for c in ("tokenizer", "tokenizer_2") for f in (
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")],
    *[f"{c}/{f}" for c in ("unet", "vae", "vae_1_0") for f in (
        "config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_flax_model.msgpack")],
    "unet/model.onnx", "unet/model.onnx_data", "vae_decoder/config.json", "vae_decoder/model.onnx",
]


def _fetched(patterns, files=SDXL_FILES) -> set[str]:
    return set(filter_repo_objects(files, allow_patterns=list(patterns)))


def _pipeline_ref(variant):
    comps = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
    return ModelRef("mask2img.model", "diffusers-pipeline", "sdxl", "r", None, variant, "float16", comps)


def test_fp16_variant_fetches_only_the_fp16_component_weights():
    got = _fetched(pf.allow_patterns(_pipeline_ref("fp16")))
    weights = sorted(f for f in got if f.endswith(".safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    configs = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
               "text_encoder/config.json", "text_encoder_2/config.json",
               *[f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in (
                   "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")]}
    assert got == set(weights) | configs  # no single-file checkpoints, ONNX, OpenVINO, Flax, vae_1_0


def test_no_variant_fetches_the_plain_weights_only():
    weights = sorted(f for f in _fetched(pf.allow_patterns(_pipeline_ref(None))) if f.endswith(".safetensors"))
    assert weights == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                       "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]


def test_sharded_and_single_model_folders():
    files = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "model.safetensors", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "tokenizer.json", "vocab.txt", "preprocessor_config.json", "onnx/model.onnx", "tf_model.h5"]
    cn = ModelRef("mask2img.controlnet", "diffusers-model", "cn", "r", variant="fp16")
    assert _fetched(pf.allow_patterns(cn), files) == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}
    hf = ModelRef("captioner.model", "transformers", "blip", "r")
    assert _fetched(pf.allow_patterns(hf), files) == {
        "config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "vocab.txt", "preprocessor_config.json"}


def _cfg(name, *overrides) -> GenerateConfig:
    return load_config(GenerateConfig, CONFIGS / name, ["source.path=/x", "output.path=/y", *overrides])


def test_factory_prefetches_every_hub_model_of_its_stages():
    cfg = _cfg("factory-sdxl.yaml", "mask2img.model.variant=fp16")
    targets = {t.repo_id: t for t in pf.fetch_targets(cfg)}
    # the ControlNet and SAM come from local files; BLIP, Grounding DINO, CLIP and SDXL from the hub
    assert set(targets) == {cfg.captioner.model.id, cfg.grounding.model.id, cfg.clip.model.id, cfg.mask2img.model.id}
    assert targets[cfg.grounding.model.id].num_gpus == cfg.grounding.resources.num_gpus
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in _fetched(targets[cfg.mask2img.model.id].allow_patterns)
    assert targets[cfg.captioner.model.id].revision == cfg.captioner.model.revision
    # the captioner pool is left out of a plan whose rows all have captions: not fetched then
    without = {t.repo_id for t in pf.fetch_targets(cfg, stage_names={"grounding", "sam", "mask2img", "clip"})}
    assert cfg.captioner.model.id not in without and cfg.clip.model.id in without


def test_variant_default_keeps_the_hash_and_a_set_variant_changes_it():
    cfg = _cfg("seggen-sdxl.yaml")
    assert cfg.mask2img.model.variant is None
    assert _cfg("seggen-sdxl.yaml", "mask2img.model.variant=fp16").config_hash() != cfg.config_hash()
