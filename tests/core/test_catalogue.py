"""core/catalogue.py: a named model resolves to the same spec (and config hash) as written out."""

from __future__ import annotations

import pytest

from core.config import ConfigError, load_config
from pipelines.config import GenerateConfig
from pipelines.specs import HfModelSpec, ModelSpec

SDXL = {"id": "stabilityai/stable-diffusion-xl-base-1.0", "revision": "462165984030d82259a11f4367a4eed129e94a7b"}


def test_a_name_gives_the_entry_and_local_keys_win():
    assert ModelSpec.model_validate("sdxl-base-1.0") == ModelSpec(**SDXL, family="sdxl")
    spec = ModelSpec.model_validate({"name": "sd-1.5", "local_path": "/m", "dtype": "bfloat16"})
    assert (spec.id, spec.family, spec.local_path, spec.dtype) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "/m", "bfloat16")
    assert HfModelSpec.model_validate("dinov2-small").id == "facebook/dinov2-small"  # no family key taken


def test_named_and_written_out_configs_hash_alike():
    named = load_config(GenerateConfig, None, ["preset=sdxl", "mask2img.model=sdxl-base-1.0"])
    spelled = load_config(GenerateConfig, None, ["preset=sdxl", f"mask2img.model.id={SDXL['id']}",
                                                 f"mask2img.model.revision={SDXL['revision']}"])
    assert named.config_hash() == spelled.config_hash()
    assert named.model_dump() == spelled.model_dump()


def test_an_unknown_name_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^mask2img\.model: unknown model 'sdxl-base-2'; the catalogue"):
        load_config(GenerateConfig, None, ["mask2img.model=sdxl-base-2"])


def test_an_override_of_a_sub_key_keeps_the_named_model(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: sdxl\nmask2img:\n  model: sdxl-base-1.0\n")
    cfg = load_config(GenerateConfig, tmp_path / "c.yaml", ["mask2img.model.variant=fp16"])
    assert (cfg.mask2img.model.id, cfg.mask2img.model.variant) == (SDXL["id"], "fp16")
