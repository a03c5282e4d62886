"""The values a graph is made of: a stage (one ``map_batches`` call), the run context the driver
passes to a plan, and a reference to the weights a model stage loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import schema as S


@dataclass
class Stage:
    """One ``map_batches`` call: the callable and its keyword arguments.

    ``kind="dataset"``: ``fn(ds, **kwargs)`` returns the next Dataset — for a step that needs
    the whole stream, such as AlignDiff's two rounds with an aggregate between them.
    """

    name: str
    fn: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "map_batches"


@dataclass
class RunContext:
    """What the driver learned from the source and passes to the stages."""

    classes: list[str]
    palette: np.ndarray
    background: int | None  # class id that does not count as an object (None: every class does)
    uncaptioned: int | None = None  # source rows without a caption (None: not counted; assume some)

    @property
    def mask_dtype(self) -> str:
        return S.mask_dtype(len(self.classes)).str


@dataclass(frozen=True)
class ModelRef:
    """One set of weights a model stage loads: what prefetch fetches and the dry run shows.

    ``kind``: ``diffusers-pipeline`` (a pipeline folder; ``components`` are the sub-folders it
    loads, others are passed in), ``diffusers-model`` (one model folder, e.g. a ControlNet),
    ``transformers`` (model + processor files) or ``file`` (one checkpoint file, ``local_path``).
    """

    key: str  # config key of the spec, e.g. "mask2img.controlnet" (problems name it)
    kind: str
    id: str = ""
    revision: str = "main"
    local_path: str | None = None
    variant: str | None = None
    dtype: str | None = None
    components: tuple[str, ...] = ()
