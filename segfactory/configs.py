"""Shipped configs by name: ``--config seggen-toy`` and ``segfactory configs``.

The YAML files ship inside the installed packages (``pipelines/configs``, ``training/configs``,
package data in pyproject.toml), so a name works from any directory and from a wheel install.
A value that is an existing file is used as it is; a path that does not exist is an error
naming both ways to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.config import ConfigError

# Packages whose configs/ folder ships YAML, in the order `segfactory configs` lists them.
CONFIG_PACKAGES = ("pipelines", "training")


@dataclass(frozen=True)
class ShippedConfig:
    name: str  # file stem: what --config accepts
    path: Path
    command: str  # the YAML's first line: the exact command that runs it
    purpose: str  # the first comment line after the command


def shipped_configs() -> list[ShippedConfig]:
    """Every YAML in the packages' ``configs/`` folders, by package then name."""
    found = []
    for package in CONFIG_PACKAGES:
        folder = resources.files(package) / "configs"
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith((".yaml", ".yml")):
                path = Path(str(entry))
                command, purpose = _header(path)
                found.append(ShippedConfig(path.stem, path, command, purpose))
    return found


def _header(path: Path) -> tuple[str, str]:
    comments = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    command = comments[0] if comments else ""
    return command, first_sentence(" ".join(comments[1:]))


def first_sentence(text: str) -> str:
    """Up to the first full stop followed by a space or the end (``SD 1.5`` is not one): a
    description that runs over several comment lines is never cut mid-sentence."""
    import re

    for match in re.finditer(r"[.!?](?=\s|$)", text):
        word = text[: match.start()].rsplit(" ", 1)[-1].lstrip("(")
        if word not in ABBREVIATIONS:
            return text[: match.end()]
    return text


ABBREVIATIONS = {"App", "Tab", "Sec", "Fig", "Eq", "e.g", "i.e", "cf", "vs", "al", "Alg"}


def resolve_config(value: str) -> Path:
    """An existing file as given, else the shipped config of that name (``seggen-toy`` or
    ``seggen-toy.yaml``, also ``pipelines/configs/seggen-toy.yaml`` from any directory)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = Path(value).name.removesuffix(".yaml").removesuffix(".yml")
    matches = [c for c in shipped_configs() if c.name == name]
    if len(matches) == 1:
        return matches[0].path
    if len(matches) > 1:
        raise ConfigError(f"--config {value}: several shipped configs have that name "
                          f"({', '.join(str(c.path) for c in matches)}); give the path")
    names = ", ".join(c.name for c in shipped_configs())
    raise ConfigError(f"--config {value}: no such file, and no shipped config of that name "
                      f"(shipped: {names}; `segfactory configs` says what each is for)")


def format_configs(configs: list[ShippedConfig]) -> str:
    """One line per shipped config: name, package, purpose."""
    width = max((len(c.name) for c in configs), default=0)
    lines = [f"{c.name:<{width}}  {c.path.parent.parent.name + '/':<10} {c.purpose}" for c in configs]
    lines.append("use: segfactory <command> --config NAME [key=value ...]   (the YAML's first line is "
                 "the full command; `segfactory configs --show NAME` prints the file)")
    return "\n".join(lines)
