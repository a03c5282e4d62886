"""The real presets' loading code, verified without the hub.

Tiny models are written to disk in the hub's layout — ``model_index.json``, a folder per
component, fp32 weights plus ``*.fp16.safetensors`` variant files, safetensors only, tokenizers
and processors beside them — and loaded by the ``sdxl``/``sd15`` code paths through
``local_path`` (``from_pretrained(..., use_safetensors=True, variant=...)``, the same call as for
a hub id but for ``revision``), then used to generate. The fp32 files hold other weights (seed 1)
than the fp16 variant files (seed 0), so a test can tell which file was read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors import diffusion_models as dm
from actors.mask2img import Mask2Img
from actors.text2mask import Text2Mask
from core import schema as S

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


@pytest.fixture(scope="module", autouse=True)
def offline_one_thread() -> Any:
    """No hub: any attempt to reach it fails; one thread (tiny models, busy shared box)."""
    import os

    import torch

    before, env = torch.get_num_threads(), os.environ.get("HF_HUB_OFFLINE")
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = env


def _save_both(save: Any, fp32: Any, fp16: Any, path: Path) -> None:
    """The hub's layout: fp32 files and, beside them, the fp16 variant of (other) weights."""
    import torch

    save(fp32, path)
    save(fp16.to(torch.float16), path, variant="fp16")


def _write_diffusers(root: Path, family: str) -> dict[str, Path]:
    """A pipeline repo (no ControlNet), a ControlNet repo and a standalone VAE repo."""
    import torch
    from diffusers import AutoencoderKL

    cls = dm._pipeline_class("text2img", family)
    seeds = {s: dm.tiny_components(family, controlnet=True, seed=s) for s in (0, 1)}
    nets = {s: comps.pop("controlnet") for s, comps in seeds.items()}
    pipes = {s: cls(**comps, **dm._extras(family)) for s, comps in seeds.items()}
    paths = {"pipe": root / f"{family}-base", "controlnet": root / f"{family}-controlnet",
             "vae": root / f"{family}-vae"}
    _save_both(lambda m, p, **kw: m.save_pretrained(p, **kw), pipes[1], pipes[0], paths["pipe"])
    _save_both(lambda m, p, **kw: m.save_pretrained(p, **kw), nets[1], nets[0], paths["controlnet"])
    torch.manual_seed(2)
    vae_config = dict(pipes[0].vae.config)
    AutoencoderKL.from_config(vae_config).save_pretrained(paths["vae"])  # fp16-fix style: root, no variant
    return paths


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("hub")
    return {family: _write_diffusers(root, family) for family in ("sdxl", "sd15")}


def _weights_like(module: Any, family: str, seed: int, half: bool, part: str) -> bool:
    """Whether ``module`` holds the tiny ``part`` of ``seed`` (rounded to fp16 if ``half``)."""
    import torch

    ref = dm.tiny_components(family, controlnet=part == "controlnet", seed=seed)[part].state_dict()
    got = module.state_dict()
    assert set(got) == set(ref)
    return all(torch.equal(got[k].float(), ref[k].half().float() if half else ref[k].float()) for k in ref)


def test_files_are_in_the_hubs_layout(hub: dict[str, dict[str, Path]]) -> None:
    import json

    from safetensors import safe_open

    base = hub["sdxl"]["pipe"]
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert index[part][0] in ("diffusers", "transformers")
        names = sorted(p.name for p in (base / part).iterdir())
        weights = [n for n in names if n.endswith(".safetensors")]
        assert len(weights) == 2 and any(".fp16." in n for n in weights), names
        fp16 = next(base / part / n for n in weights if ".fp16." in n)
        with safe_open(str(fp16), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
            assert {str(f.get_tensor(k).dtype) for k in f.keys() if "position_ids" not in k} == {"torch.float16"}
    every = [p for family in hub.values() for d in family.values() for p in d.rglob("*") if p.is_file()]
    assert not [p for p in every if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_real_preset_loads_local_copy_with_variant_and_generates(hub: dict, family: str) -> None:
    paths = hub[family]
    t2m = Text2Mask(family, PALETTE, steps=2, resolution=32, family=family,
                    local_path=str(paths["pipe"]), variant="fp16", device="cpu")
    assert _weights_like(t2m.pipe.unet, family, seed=0, half=True, part="unet")  # the fp16 files
    assert _weights_like(t2m.pipe.text_encoder, family, seed=0, half=True, part="text_encoder")
    assert t2m.pipe.unet.dtype.is_floating_point and str(t2m.pipe.unet.dtype) == "torch.float32"  # CPU
    batch = {S.SAMPLE_ID: np.array(["a/masksyn/0", "a/masksyn/1"], dtype=object),
             S.PROMPT: np.array(["a cat on a sofa", "a dog"], dtype=object),
             S.SEED: np.array([1, 2], dtype=np.int64)}
    out = t2m(batch)
    assert [len(m) for m in out[S.MASK_RAW]] == [32 * 32] * 2
    assert set(np.unique(np.frombuffer(out[S.MASK_RAW][0], np.uint8)).tolist()) <= {0, 1, 2, 3, 255}

    vae = {"id": "", "revision": "main", "local_path": str(paths["vae"])}
    m2i = Mask2Img(family, family=family, steps=2, resolution=32, local_path=str(paths["pipe"]),
                   variant="fp16", controlnet_local_path=str(paths["controlnet"]),
                   controlnet_variant="fp16", vae=vae, device="cpu")
    assert _weights_like(m2i.pipe.controlnet, family, seed=0, half=True, part="controlnet")
    assert not _weights_like(m2i.pipe.vae, family, seed=0, half=True, part="vae")  # the override
    assert m2i.generator_name == (f"local:{paths['pipe']}+local:{paths['controlnet']}"
                                  f"+vae:local:{paths['vae']}")
    color = np.zeros((24, 40, 3), np.uint8)
    color[:, 20:] = PALETTE[1]
    res = m2i({S.SAMPLE_ID: np.array(["a/imgsyn/0"], dtype=object), S.PROMPT: np.array(["a cat"], dtype=object),
               S.SEED: np.array([3], dtype=np.int64), S.COLOR_RAW: np.array([color.tobytes()], dtype=object),
               S.HEIGHT: np.array([24], dtype=np.int32), S.WIDTH: np.array([40], dtype=np.int32)})
    image = np.frombuffer(res[S.IMAGE_RAW][0], np.uint8)
    assert image.size == 24 * 40 * 3 and image.std() > 0


def test_without_variant_the_fp32_files_load(hub: dict) -> None:
    pipe = dm.build_pipeline("text2img", "sdxl", local_path=str(hub["sdxl"]["pipe"]), device="cpu")
    assert _weights_like(pipe.unet, "sdxl", seed=1, half=False, part="unet")
    assert not _weights_like(pipe.unet, "sdxl", seed=0, half=True, part="unet")
    assert pipe.scheduler.config.timestep_spacing == "linspace"  # the sampler replaced the saved one


# --- the factory's transformers models (BLIP, BLIP-2, Grounding DINO, CLIP) ---------------


def _tiny_factory_model(name: str, seed: int) -> tuple[Any, Any]:
    from actors.captioner import tiny_captioner
    from actors.clip_embedder import tiny_clip
    from actors.grounding import tiny_grounding

    if name in ("blip", "blip2"):
        return tiny_captioner(name, seed=seed)
    return tiny_grounding(seed=seed) if name == "grounding" else tiny_clip(seed=seed)


@pytest.mark.parametrize("name", ["blip", "blip2", "grounding", "clip"])
def test_factory_models_load_local_copy_with_variant(tmp_path: Path, name: str) -> None:
    import torch

    from actors.captioner import Captioner
    from actors.clip_embedder import ClipEmbedder
    from actors.grounding import Grounding

    ref, processor = _tiny_factory_model(name, seed=0)
    other, _ = _tiny_factory_model(name, seed=1)
    _save_both(lambda m, p, **kw: m.save_pretrained(p, **kw), other, ref, tmp_path)
    processor.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert {"model.safetensors", "model.fp16.safetensors", "config.json"} <= set(files), files
    # what the factory passes for preset sd15/sdxl: local_path + variant, safetensors only
    where = {"preset": "sd15", "local_path": str(tmp_path), "variant": "fp16", "device": "cpu"}
    if name in ("blip", "blip2"):
        actor = Captioner(name, max_new_tokens=4, min_new_tokens=2, **where)
    elif name == "grounding":
        actor = Grounding(["background", "cat", "dog"], **where)
    else:
        actor = ClipEmbedder(columns={S.IMAGE_RAW: S.CLIP_EMBEDDING}, **where)
    got, want = actor.model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k].half().float() if want[k].is_floating_point() else want[k])
               for k in want)  # the fp16 variant file, not model.safetensors (seed 1)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    out = actor({S.IMAGE_RAW: np.array([image.tobytes()], dtype=object), S.HEIGHT: np.array([40]),
                 S.WIDTH: np.array([56])})
    if name in ("blip", "blip2"):
        assert isinstance(out[S.CAPTION][0], str) and out[S.CAPTION][0]
    elif name == "grounding":
        assert int(out[S.BOX_COUNT][0]) >= 0 and len(out[S.BOXES][0]) == 16 * int(out[S.BOX_COUNT][0])
    else:
        assert np.linalg.norm(np.frombuffer(out[S.CLIP_EMBEDDING][0], "<f4")) == pytest.approx(1.0, abs=1e-5)


def test_a_local_path_on_object_storage_is_fetched_once_per_node(hub: dict, s3_bucket: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``local_path=s3://...``: the folder is copied into the node's model cache once (marker
    file), then loaded like a local folder; a second load uses the copy (the bucket is empty
    by then)."""
    import pyarrow.fs as pafs

    from core import storage

    monkeypatch.setenv("SEGFACTORY_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/sdxl-pipe"
    dest = storage.resolve(uri)
    pafs.copy_files(str(hub["sdxl"]["pipe"]), dest.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.fs)
    pipe = dm.build_pipeline("text2img", "sdxl", local_path=uri, device="cpu")
    assert _weights_like(pipe.unet, "sdxl", seed=1, half=False, part="unet")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 3 and cached[0].endswith("sdxl-pipe") and cached[1].endswith(".complete"), cached
    storage.remove_tree(dest)
    again = dm.build_pipeline("text2img", "sdxl", local_path=uri, device="cpu")
    assert _weights_like(again.unet, "sdxl", seed=1, half=False, part="unet")
    with pytest.raises(storage.StorageError, match=f"local_path={s3_bucket}/models/missing: not found"):
        storage.local_copy(f"{s3_bucket}/models/missing")
