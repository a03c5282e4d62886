"""Class names as words, for prompts and grounding queries."""

from __future__ import annotations

_READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def readable(name: str) -> str:
    """A class name as words: "pottedplant" -> "potted plant", "traffic_light" -> "traffic light"."""
    name = str(name).strip()
    return _READABLE.get(name.lower(), name.replace("_", " "))
