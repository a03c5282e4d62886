"""Few-shot segmentation episodes: ``segfactory evaluate --protocol fss`` (PASCAL-5ⁱ, COCO-20ⁱ).

The folds are the literature's: PASCAL-5ⁱ (Shaban et al. 2017) tests fold i on VOC classes
5i+1 .. 5i+5; COCO-20ⁱ (Nguyen & Todorovic 2019, as BAM / HDMNet / HSNet use it) tests fold i
on the 80 COCO object classes i+1, i+5, ..., i+77 (every fourth, 1-based). An episode draws a
test class c of the fold, a query image containing c and ``shots`` other support images
containing c, all from the evaluation split, seeded; masks are binary (c = 1, everything else
0, 255 kept as ignore). Scores: mIoU = mean over the fold's classes of foreground IoU summed
over that class's episodes; FB-IoU = mean of foreground and background IoU summed over all
episodes (HSNet's definitions).

A model is anything with :meth:`FewShotModel.predict`; the built-in baseline is the DINOv2
prototype matcher (:class:`actors.fss_prototype.PrototypeFSS`); a trained FSS model plugs in
as ``--fss-model package.module:factory`` (``factory(classes)`` returns the model). Episodes
run in this process, one at a time (1,000 episodes of a few images each).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.config import ConfigError
from core.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

BENCHMARKS = {"pascal-5i": (20, 5), "coco-20i": (80, 20)}  # object classes, classes per fold


def fold_classes(benchmark: str, fold: int) -> list[int]:
    """The fold's test classes as 1-based ids among the benchmark's object classes."""
    if benchmark not in BENCHMARKS or fold not in range(4):
        raise ConfigError(f"--benchmark/--folds: {benchmark} fold {fold} (benchmarks {sorted(BENCHMARKS)}, folds 0-3)")
    if benchmark == "pascal-5i":
        return list(range(5 * fold + 1, 5 * fold + 6))
    return [fold + 1 + 4 * k for k in range(20)]


class FewShotModel(Protocol):
    """What an FSS model provides: a binary mask (1 = the support's class) of the query."""

    def predict(self, support_images: list[np.ndarray], support_masks: list[np.ndarray],
                query_image: np.ndarray) -> np.ndarray: ...


class PrototypeBaseline:
    """The DINOv2 prototype matcher as an episode model (training-free)."""

    def __init__(self, fss: Any):
        self.fss = fss  # actors.fss_prototype.PrototypeFSS with background = 0

    def predict(self, support_images, support_masks, query_image):
        state = self.fss.condition(support_images, support_masks, num_classes=2)
        mask = self.fss.predict(self.fss.features([query_image]), state, [1], [query_image.shape[:2]])[0]
        return (mask == 1).astype(np.uint8)


def load_model(spec: str, classes: list[str], backbone: dict[str, Any] | None = None) -> FewShotModel:
    """``tiny`` (random tiny DINOv2, tests), ``prototype`` (DINOv2 from ``backbone``: id +
    revision or local_path), or ``package.module:factory`` (a trained model's factory)."""
    if spec in ("tiny", "prototype"):
        from actors.fss_prototype import PrototypeFSS

        b = backbone or {}
        if spec == "prototype" and not (b.get("local_path") or b.get("model_id")):
            raise ConfigError("--fss-backbone: the prototype baseline needs DINOv2 weights (a local path or id@revision)")
        return PrototypeBaseline(PrototypeFSS("tiny" if spec == "tiny" else "real", 0, **b))
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"--fss-model {spec}: cannot import ({exc}); give tiny, prototype or package.module:factory") from None
    return factory(classes)


@dataclass
class Episode:
    cls: int
    query: int  # row index
    support: list[int]


def class_presence(masks: list[np.ndarray], ids: list[int]) -> dict[int, list[int]]:
    """Class id -> rows whose mask contains it (ignore excluded)."""
    out: dict[int, list[int]] = {c: [] for c in ids}
    for i, m in enumerate(masks):
        for c in np.unique(m):
            if int(c) in out:
                out[int(c)].append(i)
    return out


def draw_episodes(presence: dict[int, list[int]], shots: int, n: int, seed: int) -> list[Episode]:
    """``n`` episodes: a class uniformly among those with at least shots + 1 images, then a
    query and ``shots`` distinct supports among its images."""
    usable = sorted(c for c, rows in presence.items() if len(rows) > shots)
    if not usable:
        raise ConfigError(f"--data: no test class of this fold has {shots + 1} images in the split")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = usable[int(rng.integers(len(usable)))]
        picked = rng.choice(presence[c], size=shots + 1, replace=False)
        out.append(Episode(c, int(picked[0]), [int(i) for i in picked[1:]]))
    return out


def binary(mask: np.ndarray, cls: int) -> np.ndarray:
    """1 where ``cls``, 0 elsewhere, 255 where ignored."""
    return np.where(mask == IGNORE_INDEX, IGNORE_INDEX, (mask == cls).astype(np.uint8)).astype(np.uint8)


def score(results: list[tuple[int, np.ndarray, np.ndarray]], classes: list[int]) -> dict[str, Any]:
    """(class, predicted binary, true binary with 255) per episode -> mIoU, FB-IoU, per-class IoU."""
    inter = {c: 0 for c in classes}
    union = {c: 0 for c in classes}
    fb = np.zeros((2, 2), np.int64)  # [bg, fg] x [intersection, union]
    for c, pred, true in results:
        valid = true != IGNORE_INDEX
        for k in (0, 1):
            p, t = (pred == k) & valid, (true == k) & valid
            fb[k] += [int((p & t).sum()), int((p | t).sum())]
        inter[c] += int(((pred == 1) & (true == 1) & valid).sum())
        union[c] += int((((pred == 1) | (true == 1)) & valid).sum())
    seen = [c for c in classes if union[c] > 0]
    per_class = {c: inter[c] / union[c] for c in seen}
    fg_bg = [fb[k, 0] / fb[k, 1] for k in (0, 1) if fb[k, 1] > 0]
    return {"miou": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "fb_iou": float(np.mean(fg_bg)) if fg_bg else 0.0, "per_class_iou": {str(c): v for c, v in per_class.items()},
            "episodes": len(results)}


def run_fold(model: FewShotModel, images: list[np.ndarray], masks: list[np.ndarray], benchmark: str, fold: int,
             shots: int, n: int, seed: int) -> dict[str, Any]:
    """One fold: draw the episodes, run the model on each, score."""
    ids = fold_classes(benchmark, fold)
    episodes = draw_episodes(class_presence(masks, ids), shots, n, seed + fold)
    results = []
    for ep in episodes:
        pred = model.predict([images[i] for i in ep.support], [binary(masks[i], ep.cls) for i in ep.support], images[ep.query])
        results.append((ep.cls, np.asarray(pred), binary(masks[ep.query], ep.cls)))
    return {"fold": fold, "classes": ids, **score(results, ids)}


def run_fss(data: str, format: str, split: str, benchmark: str, folds: list[int], shots: int, episodes: int, seed: int,
            model_spec: str, backbone: dict[str, Any] | None = None, out: str | None = None) -> dict[str, Any]:
    """``segfactory evaluate --protocol fss``: every fold, mean over folds, written as JSON."""
    from core import storage
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError

    try:
        index = index_source(data, format, split=split)
    except SourceError as e:
        raise ConfigError(f"--data: {e}") from None
    want = BENCHMARKS[benchmark][0] + 1 if benchmark in BENCHMARKS else None
    if want and len(index.classes) != want:
        raise ConfigError(f"--data: {benchmark} needs {want} classes (background + {want - 1} objects in the benchmark's "
                          f"order); {data} has {len(index.classes)}")
    rows = sorted(index.rows, key=lambda r: r["source_id"])
    pairs = [index.load(r) for r in rows]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    model = load_model(model_spec, index.classes, backbone)
    per_fold = [run_fold(model, images, masks, benchmark, f, shots, episodes, seed) for f in folds]
    result = {"protocol": "fss", "benchmark": benchmark, "shots": shots, "episodes_per_fold": episodes, "seed": seed,
              "model": model_spec, "data": str(data), "split": split, "folds": per_fold,
              "miou": float(np.mean([f["miou"] for f in per_fold])), "fb_iou": float(np.mean([f["fb_iou"] for f in per_fold]))}
    dest = out or f"fss-{benchmark}-{shots}shot.json"
    storage.write_text(storage.resolve(dest, "--out"), json.dumps(result, indent=1))
    result["json"] = str(dest)
    return result
