"""High-quality image selection (Diffusion Synthesis, "HIS"): the math and the two filter stages.

(a) Cosine similarity filtration (its Eq. 2): a variant is kept when cos(real, variant) of their
    image embeddings is *greater than* ε (paper default ε = 0.8, its Table 4; Table 5 compares
    0.7 / 0.8 / 0.9).
(b) Foundation-model matching: the variant is re-segmented by the same mask generator
    (Grounding DINO + SAM) and kept when the mIoU between that prediction and the mask it was
    generated from is *at least* τ. The paper gives no value for τ; 0.5 is our default.

mIoU here: pixels that are ignore (255) in either mask are left out; a class counts when it is
present in either mask (a class absent from both has no defined IoU and is left out of the
mean, as in the usual per-image mIoU); background counts like any class unless
``include_background`` is false. With no class left to score (everything ignored) the mIoU is
NaN and the row is dropped: there is no evidence that the variant matches its mask.

Each filter adds its ``score_*`` column to every row (NaN where the filter did not run: rows
already dropped) and a ``drop_reason`` (``low_similarity`` / ``low_reseg_miou``) to rows that
fail, which the writer sends to ``rejected/`` and the manifest counts. Pure numpy, Ray-free.
"""

from __future__ import annotations

import numpy as np

from core import schema as S

LOW_SIMILARITY = S.LOW_SIMILARITY
LOW_RESEG_MIOU = S.LOW_RESEG_MIOU


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays (or of two vectors); 0 where a norm is 0."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def iou_per_class(pred: np.ndarray, target: np.ndarray,
                  ignore_index: int = S.IGNORE_INDEX) -> dict[int, float]:
    """{class id: IoU} over the classes present in either mask, ignore pixels left out."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {target.shape}")
    valid = (pred != ignore_index) & (target != ignore_index)
    p, t = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    out = {}
    for c in np.union1d(np.unique(p), np.unique(t)).tolist():
        inter = np.count_nonzero((p == c) & (t == c))
        union = np.count_nonzero((p == c) | (t == c))
        out[int(c)] = inter / union
    return out


def mean_iou(pred: np.ndarray, target: np.ndarray, ignore_index: int = S.IGNORE_INDEX,
             background: int | None = None) -> float:
    """Mean of :func:`iou_per_class`, ``background`` (if given) left out; NaN when empty."""
    ious = {c: v for c, v in iou_per_class(pred, target, ignore_index).items() if c != background}
    return float(np.mean(list(ious.values()))) if ious else float("nan")


def keep_similar(score: float, threshold: float | None) -> bool:
    """Eq. 2: kept when similarity > ε (None disables the filter)."""
    return threshold is None or bool(score > threshold)


def keep_matching(miou: float, threshold: float | None) -> bool:
    """Kept when mIoU >= τ; NaN never passes (None disables the filter)."""
    return threshold is None or bool(miou >= threshold)


def _drop(batch: dict[str, np.ndarray], score_col: str, scores: np.ndarray, rows: np.ndarray,
          failed: list[bool], reason: str) -> dict[str, np.ndarray]:
    from pipelines.stages import set_rows

    full = np.full(len(batch[S.SAMPLE_ID]), np.nan, dtype=np.float64)
    full[rows] = scores
    batch[score_col] = full
    reasons = np.array([reason if f else "" for f in failed], dtype=object)
    set_rows(batch, rows, {S.DROP_REASON: reasons})
    return batch


def similarity_stage(batch: dict[str, np.ndarray], *, threshold: float | None) -> dict[str, np.ndarray]:
    """CPU stage: ``score_clip_similarity`` of variant vs real embedding; drop when <= ε."""
    from pipelines.stages import kept

    batch = dict(batch)
    rows = np.flatnonzero(kept(batch))
    scores = np.array([float(cosine_similarity(np.frombuffer(batch[S.CLIP_EMBEDDING][i], "<f4"),
                                               np.frombuffer(batch[S.CLIP_SOURCE_EMBEDDING][i], "<f4"))[0])
                       for i in rows], dtype=np.float64)
    failed = [not keep_similar(s, threshold) for s in scores]
    return _drop(batch, S.SCORE_CLIP_SIMILARITY, scores, rows, failed, LOW_SIMILARITY)


def reseg_stage(batch: dict[str, np.ndarray], *, threshold: float | None, mask_dtype: str,
                background: int | None, include_background: bool = True) -> dict[str, np.ndarray]:
    """CPU stage: ``score_reseg_miou`` of the variant's re-segmentation vs its conditioning
    mask; drop when < τ."""
    from pipelines.stages import kept

    batch = dict(batch)
    rows = np.flatnonzero(kept(batch))
    left_out = None if include_background else background
    scores = []
    for i in rows:
        h, w = int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i])
        target = S.raw_to_array(batch[S.MASK_RAW][i], h, w, mask_dtype)
        pred = S.raw_to_array(batch[S.RESEG_MASK_RAW][i], h, w, mask_dtype)
        scores.append(mean_iou(pred, target, S.IGNORE_INDEX, left_out))
    scores_arr = np.array(scores, dtype=np.float64)
    failed = [not keep_matching(s, threshold) for s in scores_arr]
    return _drop(batch, S.SCORE_RESEG_MIOU, scores_arr, rows, failed, LOW_RESEG_MIOU)
