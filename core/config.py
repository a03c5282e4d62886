"""The generic config loader: YAML + dotted ``key=value`` overrides → a pydantic model.

Unknown keys are an error (``extra="forbid"``), every field has a description, and a bad
value becomes one line naming the key (:class:`ConfigError`, exit code 2 in the CLI). Every
command's config (generation, training, fine-tuning, sweeps) is loaded through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

OMIT_DEFAULT = {"hash": "omit_default"}  # json_schema_extra: a field added after datasets existed
# stays out of the config hash while at its default (their hashes do not change)


class ConfigError(ValueError):
    """A bad command line or config; the message is one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray address; None starts or joins a local instance")
    no_progress_timeout_s: float | None = Field(600.0, ge=0, description="a stall longer than this becomes an error; 0 or null = off (Ray Data's -1)")
    show_progress: bool = Field(True, description="Ray Data progress bars")
    wait_for_gpus: bool = Field(False, description="start even when the cluster has fewer GPUs than the pools' "
                                "minimum sizes need (an autoscaling cluster adds GPU nodes on demand); "
                                "false = fail at once with exit 2 instead of waiting")


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
        if isinstance(value, dict) and isinstance(out.get(key), str) and "name" not in value:
            out[key] = {"name": out[key], **value}  # a catalogue name given sub-keys: model.variant=fp16
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def first_error_line(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming the key of the first validation error (an unknown key of ``model``
    with the nearest valid one: "did you mean ...?")."""
    err = exc.errors()[0]
    if not err["loc"]:  # a model-level check: its message names the key itself
        return str(err["msg"]).removeprefix("Value error, ")
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        near = nearest_key(model, [str(p) for p in err["loc"]]) if model else None
        return f"{key}: unknown key" + (f"; did you mean {near}?" if near else "")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}: {msg} (got {err.get('input')!r})"


def nearest_key(model: type[BaseModel], loc: list[str]) -> str | None:
    """The valid dotted key closest to ``loc`` (difflib), walking ``model``'s nested sections."""
    import difflib
    import typing

    for i, part in enumerate(loc):
        fields = getattr(model, "model_fields", None)
        if not fields:
            return None
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            return ".".join([*loc[:i], close[0]]) if close else None
        annotation = fields[part].annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)
                  and issubclass(a, BaseModel)]
        model = nested[0] if nested else None
    return None


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
        raise ConfigError(first_error_line(exc, model)) from None
