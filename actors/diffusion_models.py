"""Build the diffusers pipelines behind Text2Mask and Mask2Img, per model preset.

- ``tiny``: the real diffusers/transformers classes from tiny configs, random weights seeded
  deterministically, a CLIP tokenizer made in memory — real code paths, offline, on a CPU.
- ``sdxl-random``: full-size SDXL (+ ControlNet) built on the meta device (no memory), made
  real on the target device only when a pipeline is built — timing without downloads.
- ``sdxl`` / ``sd15``: ``from_pretrained`` by id + revision or local path, safetensors only,
  never ``trust_remote_code``.

Sampler: chosen by name (``sampler``), see ``actors/samplers.py``; SegGen's default is ``edm``
(Euler over EDM's rho=7 sigmas from the model's own sigma_max, as SGM's ``EulerEDMSampler``).

Heavy imports (torch, diffusers, transformers) happen inside functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from actors import diffusion_configs as cfg
from actors.samplers import DEFAULT_SAMPLER, make_scheduler

log = logging.getLogger(__name__)

PRESETS = ("tiny", "sdxl", "sd15", "sdxl-random")
FAMILIES = ("sdxl", "sd15")
TASKS = ("text2img", "controlnet")
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when available, else ``cpu``; a GPU we were given but cannot use warns once."""
    import torch

    want = (requested or "auto").lower()
    if want == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda" if want == "auto" else want
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if want.startswith("cuda") or visible not in ("", "-1", "NoDevFiles"):
        _warn_once("cpu-fallback", "a GPU was requested (device=%s, CUDA_VISIBLE_DEVICES=%r) "
                   "but CUDA is unavailable: running on CPU", want, visible)
    return "cpu"


def resolve_dtype(name: str, device: str) -> Any:
    """torch dtype from its name; half precision on CPU is slow or unsupported, so float32."""
    import torch

    dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[name]
    if device == "cpu" and dtype != torch.float32:
        _warn_once("cpu-dtype", "dtype %s on CPU: using float32 instead", name)
        return torch.float32
    return dtype


def resolve_family(preset: str, family: str | None = None) -> str:
    """The preset fixes the family except for ``tiny``, which exists in both (default sdxl)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    fixed = {"sd15": "sd15", "sdxl": "sdxl", "sdxl-random": "sdxl"}.get(preset, family or "sdxl")
    if fixed not in FAMILIES or family not in (None, fixed):
        raise ValueError(f"preset {preset!r} cannot use family {family!r}")
    return fixed


def make_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A byte-level CLIP tokenizer built in memory: 256 bytes (+ end-of-word forms), no merges.

    Every text tokenises (one token per character) and the special tokens take the last ids
    like in the real CLIP vocabulary, so the ids fit any CLIP text encoder config.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def fit_prompts(tokenizer: Any, prompts: list[str]) -> tuple[list[str], np.ndarray]:
    """Cut prompts to what the text encoder reads (``model_max_length`` with start/end tokens).

    The pipeline would truncate silently; cutting here lets the ``prompt`` column record the
    text actually used and lets the run count how many were cut.
    """
    limit = tokenizer.model_max_length - 2
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    fitted, cut = [], []
    for prompt, ids, offsets in zip(prompts, enc.input_ids, enc.offset_mapping, strict=True):
        cut.append(len(ids) > limit)
        # cut the original text where the last kept token ends (decoding would re-space it)
        fitted.append(prompt[: offsets[limit - 1][1]].rstrip() if cut[-1] else prompt)
    return fitted, np.array(cut, dtype=bool)


def _text_encoders(family: str, tiny: bool, tokenizer: Any) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny:  # use the tokenizer's real ids so pooling finds the end-of-text token
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        conf_1 = conf_2 = cfg.TINY_CLIP_TEXT | ids
    else:
        conf_1, conf_2 = cfg.CLIP_L_TEXT, cfg.CLIP_BIGG_TEXT
    out = {"text_encoder": CLIPTextModel(CLIPTextConfig(**conf_1)), "tokenizer": tokenizer}
    if family == "sdxl":
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**conf_2))
        out["tokenizer_2"] = tokenizer
    return out


def tiny_components(family: str = "sdxl", controlnet: bool = False, seed: int = 0) -> dict:
    """Tiny random components (diffusers' ``get_dummy_components`` shapes), deterministic."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    sdxl = family == "sdxl"
    torch.manual_seed(seed)
    comps = {"unet": UNet2DConditionModel(**(cfg.TINY_SDXL_UNET if sdxl else cfg.TINY_SD15_UNET))}
    torch.manual_seed(seed)
    comps["vae"] = AutoencoderKL(**(cfg.TINY_VAE if sdxl else cfg.TINY_SD15_VAE))
    torch.manual_seed(seed)
    comps |= _text_encoders(family, tiny=True, tokenizer=make_clip_tokenizer())
    if controlnet:
        torch.manual_seed(seed)
        net = ControlNetModel(**(cfg.TINY_SDXL_CONTROLNET if sdxl else cfg.TINY_SD15_CONTROLNET))
        # ControlNet starts with zero convolutions (no effect until trained); give them small
        # random weights so tests can see the colour map steer the output.
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                    "controlnet_cond_embedding.conv_out")):
                    p.normal_(0.0, 0.1)
        comps["controlnet"] = net
    comps["scheduler"] = make_scheduler(DEFAULT_SAMPLER, cfg.LDM_SCHEDULER)
    return comps


def sdxl_random_components(controlnet: bool = False) -> dict:
    """Full-size SDXL models on the meta device: exact architectures, no memory allocated.

    Buffers stay real (small: e.g. CLIP position ids); ``materialize`` makes the parameters.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    with init_empty_weights():
        comps = {"unet": UNet2DConditionModel(**cfg.SDXL_UNET), "vae": AutoencoderKL(**cfg.SDXL_VAE)}
        comps |= _text_encoders("sdxl", tiny=False, tokenizer=make_clip_tokenizer())
        if controlnet:
            comps["controlnet"] = ControlNetModel(**cfg.SDXL_CONTROLNET)
    comps["scheduler"] = make_scheduler(DEFAULT_SAMPLER, cfg.LDM_SCHEDULER)
    return comps


def materialize(module: Any, device: str, dtype: Any, seed: int = 0) -> Any:
    """Allocate a meta-device module on ``device`` and fill it with cheap random values in place.

    Each layer's own ``reset_parameters`` (PyTorch default init; norms to 1/0) runs on the
    device, so a 2.6 B UNet initialises in about a second on a GPU and never passes through
    host memory; parameters of layers without one get N(0, 0.02).
    """
    import torch

    # free on meta; casts the real (floating) buffers. nn.Module.to, not diffusers' override,
    # which warns about fp32-kept modules (none in these architectures).
    torch.nn.Module.to(module, dtype)
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
    module.to_empty(device=device)
    torch.manual_seed(seed)
    done: set[int] = set()
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            if own and callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                done.update(id(p) for p in own)
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.02)
    return module.eval()


# Presets whose diffusion components are built in code with random weights (no download):
# (family, with a ControlNet, seed) -> components. The one place that knows which those are.
RANDOM_COMPONENTS = {
    "tiny": lambda family, controlnet, seed: tiny_components(family, controlnet=controlnet, seed=seed),
    "sdxl-random": lambda family, controlnet, seed: sdxl_random_components(controlnet=controlnet),
}
FLOAT32_PRESETS = ("tiny",)  # CPU-sized models: float32 whatever dtype the config asks


def _pipeline_class(task: str, family: str) -> Any:
    import diffusers

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    name = {("text2img", "sdxl"): "StableDiffusionXLPipeline",
            ("controlnet", "sdxl"): "StableDiffusionXLControlNetPipeline",
            ("text2img", "sd15"): "StableDiffusionPipeline",
            ("controlnet", "sd15"): "StableDiffusionControlNetPipeline"}[(task, family)]
    return getattr(diffusers, name)


def _extras(family: str) -> dict:
    # SDXL: no invisible watermark (it would change pixels depending on what is installed).
    # SD1.5: no safety checker — it blacks out images, which would silently corrupt mask/image
    # pairs; use the filters stage to drop unwanted content instead.
    if family == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _from_pretrained(cls: Any, model_id: str | None, revision: str | None,
                     local_path: str | None, dtype: Any, what: str, variant: str | None = None,
                     **kwargs: Any) -> Any:
    """Load real weights; a local path wins over a hub id. Safetensors only, no remote code.

    ``variant`` (e.g. "fp16") picks the ``*.fp16.safetensors`` files of every component, as
    diffusers' ``variant=``; the hub layout is the same in a local copy.
    """
    if variant:
        kwargs["variant"] = variant
    if local_path:
        from core.storage import local_copy  # a URI: fetched once per node

        return cls.from_pretrained(local_copy(local_path), use_safetensors=True, torch_dtype=dtype,
                                   local_files_only=True, **kwargs)
    if not model_id:
        raise ValueError(f"{what}: give a model id or a local path")
    if not revision:
        _warn_once(f"unpinned-{model_id}", "%s %s has no pinned revision: using 'main'", what, model_id)
    return cls.from_pretrained(model_id, revision=revision or "main", use_safetensors=True,
                               torch_dtype=dtype, **kwargs)


def load_vae(spec: Mapping[str, Any], dtype: Any) -> Any:
    """A VAE override (e.g. ``madebyollin/sdxl-vae-fp16-fix``, which decodes in fp16 without
    NaNs): ``spec`` holds ``id``, ``revision``, ``local_path`` and optionally ``subfolder`` and
    ``variant``; loaded like every other component."""
    from diffusers import AutoencoderKL

    extra = {"subfolder": spec["subfolder"]} if spec.get("subfolder") else {}
    return _from_pretrained(AutoencoderKL, spec.get("id"), spec.get("revision"), spec.get("local_path"),
                            dtype, "vae", variant=spec.get("variant"), **extra)


def _load_real(task: str, preset: str, family: str, cls: Any, torch_dtype: Any, model_id: str | None,
               revision: str | None, local_path: str | None, variant: str | None,
               controlnet_id: str | None, controlnet_revision: str | None,
               controlnet_local_path: str | None, controlnet_variant: str | None,
               vae: Mapping[str, Any] | None) -> Any:
    """The sdxl/sd15 pipeline from real weights (hub id + revision, or local path)."""
    kwargs = _extras(family)
    if task == "controlnet":
        from diffusers import ControlNetModel

        kwargs["controlnet"] = _from_pretrained(ControlNetModel, controlnet_id, controlnet_revision,
                                                controlnet_local_path, torch_dtype, "controlnet",
                                                variant=controlnet_variant)
    if vae:
        kwargs["vae"] = load_vae(vae, torch_dtype)
    return _from_pretrained(cls, model_id, revision, local_path, torch_dtype, preset, variant=variant,
                            **kwargs)


def build_pipeline(task: str, preset: str, family: str | None = None, model_id: str | None = None,
                   revision: str | None = None, local_path: str | None = None,
                   dtype: str = "float16", controlnet_id: str | None = None,
                   controlnet_revision: str | None = None,
                   controlnet_local_path: str | None = None, device: str | None = None,
                   sampler: str = DEFAULT_SAMPLER, seed: int = 0, variant: str | None = None,
                   controlnet_variant: str | None = None,
                   vae: Mapping[str, Any] | None = None, lora_path: str | None = None) -> Any:
    """A ready pipeline for ``task`` (``text2img`` or ``controlnet``) on the chosen device.

    ``sampler``: a name of ``actors.samplers.SAMPLERS``; ``variant``/``controlnet_variant``:
    weight file variants (real presets); ``vae``: a VAE override (see :func:`load_vae`).
    ``local_path`` / ``controlnet_local_path`` load those folders with every preset (with
    ``tiny``/``sdxl-random`` they replace the random components); ``lora_path`` loads LoRA
    adapter weights (``segfactory finetune`` kind=lora) into the UNet.
    """
    family = resolve_family(preset, family)
    dev = pick_device(device)
    torch_dtype = resolve_dtype("float32" if preset in FLOAT32_PRESETS else dtype, dev)
    cls = _pipeline_class(task, family)
    if preset in RANDOM_COMPONENTS:
        comps = RANDOM_COMPONENTS[preset](family, task == "controlnet", seed)
        comps = local_overrides(comps, task, family, local_path, controlnet_local_path, torch_dtype)
        for name, comp in comps.items():
            if _is_meta(comp):
                comps[name] = materialize(comp, dev, torch_dtype, seed=seed)
        pipe = cls(**comps, **_extras(family))
    else:
        pipe = _load_real(task, preset, family, cls, torch_dtype, model_id, revision, local_path,
                          variant, controlnet_id, controlnet_revision, controlnet_local_path,
                          controlnet_variant, vae)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe = pipe.to(dev)  # dtypes were set at construction or load time
    if lora_path:
        load_lora(pipe, lora_path)
    pipe.set_progress_bar_config(disable=True)
    log.info("built %s %s pipeline (%s, sampler %s) on %s/%s", preset, task, cls.__name__, sampler,
             dev, torch_dtype)
    return pipe


def _is_meta(comp: Any) -> bool:
    params = getattr(comp, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first is not None and first.is_meta


def local_overrides(comps: dict, task: str, family: str, local_path: str | None,
                    controlnet_local_path: str | None, dtype: Any) -> dict:
    """Random (tiny / sdxl-random) components with the given local folders loaded in their
    place: a pipeline folder replaces the base models (UNet, VAE, text encoders, tokenizers,
    scheduler), a ControlNet folder the ControlNet. Safetensors only, offline."""
    if local_path:
        base = _from_pretrained(_pipeline_class("text2img", family), None, None, local_path, dtype,
                                "local_path", **_extras(family))
        comps = dict(comps)
        comps.update({k: v for k, v in base.components.items() if k in comps and v is not None})
        comps["scheduler"] = base.scheduler  # build_pipeline sets the configured sampler on its config
    if controlnet_local_path and task == "controlnet":
        from diffusers import ControlNetModel

        comps = dict(comps)
        comps["controlnet"] = _from_pretrained(ControlNetModel, None, None, controlnet_local_path, dtype, "controlnet")
    return comps


def load_lora(pipe: Any, lora_path: str) -> None:
    """LoRA adapter weights (a folder or file, safetensors) into the pipeline's UNet."""
    import os

    from core.storage import local_copy  # a URI: fetched once per node

    local = local_copy(lora_path, "lora_path")
    if not os.path.exists(local):
        raise FileNotFoundError(f"lora_path: {lora_path} not found")
    pipe.load_lora_weights(local, adapter_name="segfactory")
    log.info("loaded LoRA adapter %s", lora_path)


def check_palette(local_path: str | None, palette: Any) -> None:
    """Refuse a fine-tuned Text2Mask whose recorded palette (``segfactory.json``, written by
    ``segfactory finetune``) differs from this run's: its colours would decode to wrong classes."""
    import json

    from core import storage  # the folder may be on object storage: read only this file

    if not local_path:
        return
    record = storage.resolve(local_path, "text2mask.model.local_path") / "segfactory.json"
    if not storage.is_file(record):
        return
    recorded = json.loads(storage.read_text(record)).get("palette")
    ours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if recorded is not None and (np.asarray(recorded).shape != ours.shape or (np.asarray(recorded) != ours).any()):
        raise ValueError(f"text2mask.model.local_path: {local_path} was trained with another palette "
                         f"({len(recorded)} colours, first {recorded[:2]}) than this run's ({len(ours)} colours, "
                         f"first {ours[:2].tolist()}); set `palette` to match the fine-tuning run")


def generator_name(preset: str, model_id: str | None = None, revision: str | None = None,
                   local_path: str | None = None, controlnet_id: str | None = None,
                   controlnet_revision: str | None = None,
                   controlnet_local_path: str | None = None,
                   vae: Mapping[str, Any] | None = None, lora_path: str | None = None) -> str:
    """Provenance for the ``generator`` column: ``id@revision`` (``+controlnet@rev`` if any,
    ``+vae:id@rev`` with a VAE override, ``+lora:path`` with an adapter)."""
    if preset in RANDOM_COMPONENTS and not (local_path or controlnet_local_path or lora_path):
        return {"tiny": "tiny-random"}.get(preset, preset)

    def one(mid: str | None, rev: str | None, path: str | None) -> str:
        return f"{mid}@{rev or 'main'}" if mid else f"local:{path}"

    random_base = {"tiny": "tiny-random", "sdxl-random": "sdxl-random"}.get(preset)
    name = random_base if random_base and not local_path else one(model_id, revision, local_path)
    if lora_path:
        name += f"+lora:{lora_path}"
    if controlnet_id or controlnet_local_path:
        name += "+" + one(controlnet_id, controlnet_revision, controlnet_local_path)
    if vae:
        name += "+vae:" + one(vae.get("id"), vae.get("revision"), vae.get("local_path"))
    return name


def size_multiple(pipe: Any) -> int:
    """Generation sides are multiples of the whole downsampling factor (VAE x UNet levels, and
    of 8, which diffusers' SDXL checks): 32 for SDXL, 64 for SD1.5, 8 for the tiny models —
    so no UNet level meets an odd size."""
    unet_levels = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return int(np.lcm(8, pipe.vae_scale_factor * unet_levels))


def generation_size(height: int | None, width: int | None, resolution: int,
                    multiple: int, max_aspect: float = 4.0) -> tuple[int, int]:
    """(height, width) to generate at: about ``resolution**2`` pixels with the target's aspect.

    Area rule, not a side rule: SDXL was trained on aspect buckets of constant pixel count
    (SegGen at 768), so a constant area keeps quality and cost flat across aspect ratios.
    Aspect is clamped to ``max_aspect``; sides are rounded to ``multiple``.
    """
    aspect = 1.0 if not height or not width else float(width) / float(height)
    aspect = min(max(aspect, 1.0 / max_aspect), max_aspect)
    gh, gw = resolution / np.sqrt(aspect), resolution * np.sqrt(aspect)
    return (max(multiple, int(round(gh / multiple)) * multiple),
            max(multiple, int(round(gw / multiple)) * multiple))


def buckets(sizes: Iterable[tuple[int, int]], max_rows: int | None = None) -> list[tuple[tuple[int, int], list[int]]]:
    """Row indices grouped by generation size (first-seen order), split to ``max_rows``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    step = max_rows or max((len(v) for v in groups.values()), default=1)
    return [(size, idx[k:k + step]) for size, idx in groups.items() for k in range(0, len(idx), step)]


def seeded_generators(seeds: Iterable[int]) -> list:
    """One CPU ``torch.Generator`` per row: a row's noise depends on its seed only (not on its
    batch or device), and CPU generators give the same noise on any machine."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline ``output_type="np"`` floats in [0, 1] (B, H, W, 3) to uint8 (NaN → 0)."""
    images = np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
