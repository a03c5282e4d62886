"""What we load is safe: pinned revisions, safetensors, no remote code, no unpickling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines" / "configs").glob("*.yaml")) + sorted((ROOT / "training" / "configs").glob("*.yaml"))
CODE = [p for d in ("pipelines", "actors", "training", "cluster") for p in (ROOT / d).rglob("*.py")]


def calls(text: str, opening: str):
    """The full text of each call starting with ``opening`` (balanced parentheses)."""
    start = text.find(opening)
    while start != -1:
        depth, end = 0, start + len(opening) - 1
        while end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
            end += 1
        yield text[start:end + 1]
        start = text.find(opening, end)


MODEL_KEYS = ("model", "controlnet", "vae", "backbone")  # keys whose value is a weights spec (or a catalogue name)


def model_specs(node, path=""):
    """Every model spec in a config tree: a mapping with an ``id``, or a catalogue name, resolved."""
    from core.catalogue import MODELS, resolve_model

    if isinstance(node, dict):
        if "id" in node and isinstance(node["id"], str):
            yield path, node
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key in MODEL_KEYS and (isinstance(value, str) or (isinstance(value, dict) and "name" in value)):
                yield where, resolve_model(value, {"id", "revision", "local_path"})
                assert (value if isinstance(value, str) else value["name"]) in MODELS
            else:
                yield from model_specs(value, where)


def test_every_catalogue_model_is_pinned():
    from core.catalogue import MODELS

    for name, entry in MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{40}", entry["revision"]), f"{name}: revision must be a commit hash"


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_hub_model_in_a_shipped_config_is_pinned(config):
    for where, spec in model_specs(yaml.safe_load(config.read_text())):
        if spec["id"] and not spec.get("local_path"):
            assert re.fullmatch(r"[0-9a-f]{40}", str(spec.get("revision", ""))), \
                f"{config.name}: {where}.revision must be a commit hash, got {spec.get('revision')!r}"


def test_sdxl_base_is_named_once():
    """The SDXL id + commit live in the catalogue, not copied into the YAML files."""
    copies = [p.name for p in SHIPPED if "stabilityai/stable-diffusion-xl-base-1.0" in p.read_text()]
    assert copies == []


def test_no_remote_code_no_pickles_safetensors_only():
    for path in CODE:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        for call in re.findall(r"torch\.load\(.*", text):  # the call's line
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in calls(text, ".from_pretrained("):
            if "use_safetensors" not in call and "**" not in call:
                pytest.fail(f"{path}: from_pretrained without use_safetensors: {call[:120]}")
        assert "pickle.load" not in text, path
