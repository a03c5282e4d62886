"""attn2mask pseudo-masks: cross-attention maps -> class ids, dense CRF, reliability (255).

Per image (seed 002 and its Fig. 2):

1. each class's attention map is upsampled bilinearly to the image size and normalised to
   [0, 1] (min-max by default, as attention pseudo-mask works do — a map's scale depends on the
   number of prompt tokens and on the layer, its shape does not; ``max`` divides by the peak);
2. the background score is a threshold: ``fixed`` (one value for every image) or ``adaptive``
   (Otsu's threshold of the image's strongest-class map, clipped to ``[adaptive_min,
   adaptive_max]``; per image, because attention strength varies from image to image — see
   the config comment on what the paper does and does not say);
3. argmax over [background, class_1..class_G] gives the raw labels;
4. a fully connected CRF (Krähenbühl & Koltun, via pydensecrf's maintained build) refines them
   on the image's colours;
5. reliability: a pixel whose refined and raw labels disagree, or whose two best scores are
   within ``margin``, becomes 255 (ignored by training). Fig. 2 of the supplement: unreliable
   pixels sit where the CRF failed to propagate and where upsampling blurred object edges.

The written mask is the refined labels with unreliable pixels set to 255; a row with no
reliable object pixel is dropped (``no_reliable_foreground``, a quality-filter reason).
Pure numpy/PIL apart from the CRF; no Ray, so tests call it directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core import schema as S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskParams:
    """Settings of the mask stage (``attn2mask.mask`` in the config)."""

    normalize: str = "minmax"  # "minmax" | "max"
    threshold: str = "adaptive"  # "adaptive" | "fixed"
    fixed_threshold: float = 0.5
    adaptive_min: float = 0.2
    adaptive_max: float = 0.8
    margin: float = 0.05
    crf: bool = True
    crf_iterations: int = 10
    crf_gt_prob: float = 0.7
    crf_bilateral_sxy: float = 80.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0


def normalize_and_upsample(maps: np.ndarray, height: int, width: int, how: str = "minmax") -> np.ndarray:
    """[G, h, w] maps -> [G, height, width] in [0, 1]: bilinear upsampling, then per map
    ``minmax`` ((x - min) / (max - min)) or ``max`` (x / max). A flat map becomes 0."""
    if how not in ("minmax", "max"):
        raise ValueError(f"attn2mask.mask.normalize: unknown {how!r} (minmax or max)")
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for g, m in enumerate(maps.astype(np.float32)):
        up = np.asarray(Image.fromarray(m).resize((width, height), Image.Resampling.BILINEAR))
        low = float(up.min()) if how == "minmax" else 0.0
        span = float(up.max()) - low
        out[g] = np.clip((up - low) / span, 0.0, 1.0) if span > 0 else 0.0
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (the cut maximising between-class variance).

    Written here because none of the project's libraries (numpy, scipy, PIL, torch) has it and
    scikit-image would be a heavy dependency for one function.
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    m1 = m0[-1] - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    if between.max() <= 0:
        return 0.5
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau: take its middle
    return float((edges[1:][best[0]] + edges[1:][best[-1]]) / 2)


def background_threshold(scores: np.ndarray, params: MaskParams) -> float:
    """The background score of one image, from its normalised class maps [G, H, W]."""
    if params.threshold == "fixed":
        return params.fixed_threshold
    if params.threshold != "adaptive":
        raise ValueError(f"attn2mask.mask.threshold: unknown {params.threshold!r} (adaptive or fixed)")
    t = otsu_threshold(scores.max(axis=0)) if scores.size else params.fixed_threshold
    return float(np.clip(t, params.adaptive_min, params.adaptive_max))


def dense_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, params: MaskParams) -> np.ndarray:
    """Labels [H, W] (0..n_labels-1) refined by a dense CRF on the RGB image (uint8 [H, W, 3]).

    The unary term trusts each raw label with probability ``crf_gt_prob`` (the usual WSSS
    pseudo-label refinement, e.g. IRN/BECO's ``crf_inference_label``); the pairwise terms are
    DeepLab's appearance (bilateral) and smoothness (Gaussian) kernels.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = labels.shape
    if n_labels < 2:
        return labels.copy()
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=params.crf_gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(params.crf_gaussian_sxy, params.crf_gaussian_compat)
    crf.addPairwiseBilateral(params.crf_bilateral_sxy, params.crf_bilateral_srgb,
                             np.array(image, dtype=np.uint8, order="C"),  # a writable copy: Cython wants one
                             params.crf_bilateral_compat)
    q = np.asarray(crf.inference(params.crf_iterations), dtype=np.float32).reshape(n_labels, h, w)
    return q.argmax(axis=0).astype(labels.dtype)


@dataclass
class PseudoMask:
    mask: np.ndarray  # class ids, 255 = unreliable
    raw: np.ndarray  # label index before CRF (0 = background, g+1 = class group g)
    refined: np.ndarray  # label index after CRF
    threshold: float
    reliable_fraction: float
    reliable_foreground_fraction: float


def pseudo_mask(maps: np.ndarray, class_ids: Sequence[int], image: np.ndarray, background: int | None,
                params: MaskParams, mask_dtype: str = "|u1") -> PseudoMask:
    """One image's pseudo-mask from its class attention maps [G, h, w] (see the module doc).

    Background pixels get class id ``background``; with no background class (e.g. ADE20K)
    they become 255 (ignore).
    """
    h, w = image.shape[:2]
    scores = normalize_and_upsample(maps, h, w, params.normalize)
    thr = background_threshold(scores, params)
    full = np.concatenate([np.full((1, h, w), thr, dtype=np.float32), scores], axis=0)
    raw = full.argmax(axis=0).astype(np.uint8 if len(full) < 256 else np.uint16)
    refined = dense_crf(image, raw, len(full), params) if params.crf else raw
    unreliable = refined != raw
    if params.margin > 0 and len(full) > 1:
        top2 = np.sort(full, axis=0)[-2:]
        unreliable |= (top2[1] - top2[0]) < params.margin
    lut = np.array([S.IGNORE_INDEX if background is None else background, *class_ids], dtype=np.int64)
    mask = lut[refined]
    mask[unreliable] = S.IGNORE_INDEX
    foreground = (refined > 0) & ~unreliable
    return PseudoMask(mask.astype(mask_dtype), raw, refined, thr, float(1.0 - unreliable.mean()),
                      float(foreground.mean()))


def attn_mask_stage(batch: dict[str, np.ndarray], *, background: int | None, mask_dtype: str,
                    params: dict, min_reliable_foreground: float = 0.0) -> dict[str, np.ndarray]:
    """CPU stage: ``mask_raw`` and the reliability scores from ``attn_raw`` and ``image_raw``."""
    from pipelines.stages import _objects, kept, set_rows

    batch = dict(batch)
    p = MaskParams(**params)
    rows = np.flatnonzero(kept(batch))
    masks, reasons = [], []
    reliable, reliable_fg = np.zeros(len(rows)), np.zeros(len(rows))
    for j, i in enumerate(rows):
        h, w = int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i])
        raw_image, raw_attn = batch[S.IMAGE_RAW][i], batch[S.ATTN_RAW][i]
        class_ids = np.frombuffer(batch[S.ATTN_CLASS_IDS][i], dtype=np.int32)
        if len(raw_image) != h * w * 3:  # finalize names the image problem
            masks.append(b"")
            reasons.append("")
            continue
        if len(raw_attn) == 0 or len(class_ids) == 0:
            masks.append(b"")
            reasons.append("no_class_tokens: no class word of the prompt survived tokenization")
            continue
        ah, aw = int(batch[S.ATTN_HEIGHT][i]), int(batch[S.ATTN_WIDTH][i])
        maps = np.frombuffer(raw_attn, dtype=np.float32).reshape(len(class_ids), ah, aw)
        try:
            out = pseudo_mask(maps, class_ids.tolist(), S.raw_to_array(raw_image, h, w, np.uint8, 3),
                              background, p, mask_dtype)
        except Exception as exc:  # noqa: BLE001 - one bad row goes to rejected/, the run goes on
            log.warning("attn_masks: %s failed: %s", batch[S.SAMPLE_ID][i], exc)
            masks.append(b"")
            reasons.append(f"attn_mask_error: {type(exc).__name__}: {exc}"[:500])
            continue
        reliable[j], reliable_fg[j] = out.reliable_fraction, out.reliable_foreground_fraction
        ok = out.reliable_foreground_fraction > min_reliable_foreground
        masks.append(out.mask.tobytes())
        reasons.append("" if ok else S.NO_RELIABLE_FOREGROUND)
    set_rows(batch, rows, {S.MASK_RAW: _objects(masks), S.DROP_REASON: _objects(reasons),
                           S.SCORE_RELIABLE_FRACTION: reliable, S.SCORE_RELIABLE_FOREGROUND: reliable_fg})
    for col in (S.ATTN_RAW, S.ATTN_CLASS_IDS):  # the maps are not part of the dataset
        batch.pop(col, None)
    return batch
