"""AlignDiff's mask generation as semi-supervised learning (seed 000, Sec. 3.5, Algorithm 1),
at Ray Data scale.

    state0 = FSSCond(D_good = the given pairs)                         # an aggregate
    round 1: for every synthetic row, M_hat = f(I | state0);
             IoU(coarse M, M_hat) > alpha  ->  D_good (kept with its coarse mask), round 1
    state1 = state0 + FSSCond(round-1 rows with their coarse masks)   # an aggregate
    round 2: every other row gets M_hat = f(I | state1) as its mask, round 2
             (or is dropped as ``low_consensus_iou`` when relabelling is off)

Conditioning the prototype FSS (``actors.fss_prototype``) is a per-class sum of pooled
features, so both conditioning steps are sums computed by the workers: each round-1 row
carries its own small contribution (its classes, feature sums and weights under the coarse
mask), a CPU ``map_batches`` reduces each block to one dense partial, and the driver adds
the few partials (one per block) — never a loop over samples. The state passed to round 2
is (classes x feature dim) floats.

Round 2 needs *every* round-1 decision before it starts, so the round-1 output is
materialised (Ray's object store, which spills to disk on big runs) and read twice: once by
the aggregate, once by round 2. The images are generated once.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from core import schema as S
from pipelines.stages import kept, set_rows

log = logging.getLogger(__name__)

# working and output columns of the aligndiff graph
TARGET_CLASS = "aligndiff_class"  # int: the class the row's prompt names (the FSS episode's target)
ROUND = S.ALIGNDIFF_ROUND  # written: 1 = coarse mask kept, 2 = relabelled by the re-conditioned FSS
COARSE_MASK = S.ALIGNDIFF_COARSE_MASK  # PNG written with keep_masks: the attention mask
FSS_MASK = S.ALIGNDIFF_FSS_MASK  # PNG written with keep_masks: the round-1 FSS prediction
SCORE_CONSENSUS_IOU = S.SCORE_PREFIX + "consensus_iou"
LOW_CONSENSUS = S.LOW_CONSENSUS_IOU
_FSS_RAW = "aligndiff_fss_mask_raw"  # round-1 prediction between the rounds
_CONTRIB = "aligndiff_contrib"  # bytes: a round-1 row's share of the re-conditioning sums
_PARTIAL = "aligndiff_partial"  # bytes: a block's dense (sums, weights)


def consensus_iou(coarse: np.ndarray, predicted: np.ndarray, target: int) -> float:
    """IoU of the ``target`` class between the coarse and the predicted mask, over the pixels
    the coarse mask does not ignore (255); 0 when neither holds the class."""
    valid = coarse != S.IGNORE_INDEX
    a, b = (coarse == target) & valid, (predicted == target) & valid
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def round_of(score: float, alpha: float) -> int:
    """Algorithm 1's rule: round 1 (coarse mask kept) when IoU > alpha, else round 2."""
    return 1 if score > alpha else 2


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask if mask.dtype == np.uint8 else mask.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _pack(classes: np.ndarray, sums: np.ndarray, weights: np.ndarray) -> bytes:
    n = np.array([len(classes)], "<i8")
    return (n.tobytes() + classes.astype("<i8").tobytes() + weights.astype("<f8").tobytes()
            + sums.astype("<f4").tobytes())


def _unpack(data: bytes, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(np.frombuffer(data[:8], "<i8")[0])
    classes = np.frombuffer(data[8:8 + 8 * n], "<i8")
    weights = np.frombuffer(data[8 + 8 * n:8 + 16 * n], "<f8")
    sums = np.frombuffer(data[8 + 16 * n:], "<f4").reshape(n, dim)
    return classes, sums, weights


class _FssHost:
    """Builds the prototype FSS once per actor (kwargs of ``PrototypeFSS``)."""

    def __init__(self, fss_kwargs: dict[str, Any], num_classes: int, mask_dtype: str):
        from actors.fss_prototype import PrototypeFSS

        self.fss = PrototypeFSS(**fss_kwargs)
        self.num_classes, self.mask_dtype = num_classes, mask_dtype


class ConditionPool(_FssHost):
    """Given pairs (index rows) -> one row per batch holding the dense partial sums."""

    def __init__(self, fss_kwargs: dict[str, Any], num_classes: int, mask_dtype: str, source_format: str):
        super().__init__(fss_kwargs, num_classes, mask_dtype)
        self.source_format = source_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from actors.fss_prototype import PrototypeState
        from pipelines.sources import SourceError, load_pixels

        images, masks = [], []
        for i in range(len(batch[S.SOURCE_ID])):
            row = {k: v[i] for k, v in batch.items()}
            try:
                image, mask = load_pixels(row, self.source_format, self.num_classes)
            except SourceError as exc:  # the driver's index already sends bad files to rejected/
                log.warning("aligndiff: given pair %s not used for conditioning: %s", row[S.SOURCE_ID], exc)
                continue
            if mask is not None:
                images.append(image)
                masks.append(mask)
        state = PrototypeState.empty(self.num_classes, self.fss.dim)
        if images:
            self.fss.condition(images, masks, self.num_classes, state)
        return {_PARTIAL: np.array([_dense(state)], dtype=object), "pairs": np.array([len(images)])}


def _dense(state) -> bytes:
    return state.weights.astype("<f8").tobytes() + state.sums.astype("<f8").tobytes()


def _from_dense(data: bytes, num_classes: int):
    from actors.fss_prototype import PrototypeState

    arr = np.frombuffer(data, "<f8")
    return PrototypeState(arr[num_classes:].reshape(num_classes, -1).copy(), arr[:num_classes].copy())


class ConsensusRound1(_FssHost):
    """Round 1 (scoring): FSS conditioned on the given pairs predicts every kept row's mask.

    Reads ``image_raw`` and the coarse mask in ``mask_raw``; writes ``score_consensus_iou``,
    ``aligndiff_round`` and, for round-1 rows, their re-conditioning contribution.
    """

    def __init__(self, fss_kwargs: dict[str, Any], num_classes: int, mask_dtype: str,
                 state: dict[str, list], alpha: float):
        from actors.fss_prototype import PrototypeState

        super().__init__(fss_kwargs, num_classes, mask_dtype)
        self.state, self.alpha = PrototypeState.from_dict(state), alpha

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from actors.fss_prototype import batch_rgb

        batch = dict(batch)
        rows = np.flatnonzero(kept(batch))
        n = len(batch[S.SAMPLE_ID])
        # every block gets every column (Ray Data joins blocks of one schema)
        fills = {SCORE_CONSENSUS_IOU: np.full(n, np.nan), ROUND: np.zeros(n, np.int64),
                 _CONTRIB: np.array([b""] * n, dtype=object), _FSS_RAW: np.array([b""] * n, dtype=object)}
        for col, fill in fills.items():
            batch.setdefault(col, fill)
        if not len(rows):
            return batch
        sub = {k: batch[k][rows] for k in (S.IMAGE_RAW, S.HEIGHT, S.WIDTH)}
        sizes = [(int(h), int(w)) for h, w in zip(sub[S.HEIGHT], sub[S.WIDTH], strict=True)]
        coarse = [S.raw_to_array(batch[S.MASK_RAW][i], h, w, self.mask_dtype) for i, (h, w) in zip(rows, sizes, strict=True)]
        targets = [int(batch[TARGET_CLASS][i]) for i in rows]
        feats = self.fss.features(batch_rgb(sub))
        preds = self.fss.predict(feats, self.state, targets, sizes)
        scores = [consensus_iou(c, p, t) for c, p, t in zip(coarse, preds, targets, strict=True)]
        rounds = [round_of(s, self.alpha) for s in scores]
        pooled = self.fss.pooled(feats, coarse)
        contrib = [_pack(*pool) if r == 1 else b"" for pool, r in zip(pooled, rounds, strict=True)]
        set_rows(batch, rows, {
            SCORE_CONSENSUS_IOU: np.array(scores, np.float64), ROUND: np.array(rounds, np.int64),
            _CONTRIB: np.array(contrib, dtype=object),
            _FSS_RAW: np.array([p.astype(self.mask_dtype).tobytes() for p in preds], dtype=object)})
        return batch


def reduce_contributions(batch: dict[str, np.ndarray], *, num_classes: int, dim: int) -> dict[str, np.ndarray]:
    """A block's round-1 contributions summed into one dense partial (a CPU task)."""
    from actors.fss_prototype import PrototypeState

    state = PrototypeState.empty(num_classes, dim)
    count = 0
    for data in batch.get(_CONTRIB, []):
        if data is not None and len(data):
            state.add(*_unpack(data, dim))
            count += 1
    return {_PARTIAL: np.array([_dense(state)], dtype=object), "pairs": np.array([count])}


class ConsensusRound2(_FssHost):
    """Round 2 (re-estimation): the re-conditioned FSS relabels every round-2 row; round-1 rows
    keep their coarse mask. With ``relabel`` off, round-2 rows are dropped instead."""

    def __init__(self, fss_kwargs: dict[str, Any], num_classes: int, mask_dtype: str,
                 state: dict[str, list] | None, relabel: bool, keep_masks: bool):
        from actors.fss_prototype import PrototypeState

        self.relabel, self.keep_masks = relabel, keep_masks
        self.num_classes, self.mask_dtype = num_classes, mask_dtype
        self.state = PrototypeState.from_dict(state) if state is not None else None
        if relabel:
            super().__init__(fss_kwargs, num_classes, mask_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from actors.fss_prototype import batch_rgb

        batch = {k: v for k, v in batch.items() if k != _CONTRIB}
        n = len(batch[S.SAMPLE_ID])
        live = kept(batch)
        todo = np.flatnonzero(live & (np.asarray(batch[ROUND]) == 2))
        if self.keep_masks:
            coarse_png, fss_png = [b""] * n, [b""] * n
            for i in np.flatnonzero(live):
                h, w = int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i])
                coarse_png[i] = _png(S.raw_to_array(batch[S.MASK_RAW][i], h, w, self.mask_dtype))
                fss_png[i] = _png(S.raw_to_array(batch[_FSS_RAW][i], h, w, self.mask_dtype))
            batch[COARSE_MASK] = np.array(coarse_png, dtype=object)
            batch[FSS_MASK] = np.array(fss_png, dtype=object)
        batch.pop(_FSS_RAW, None)
        if not len(todo):
            return batch
        if not self.relabel:
            reasons = [f"{LOW_CONSENSUS}: IoU {batch[SCORE_CONSENSUS_IOU][i]:.3f} <= alpha" for i in todo]
            set_rows(batch, todo, {S.DROP_REASON: np.array(reasons, dtype=object)})
            return batch
        sub = {k: batch[k][todo] for k in (S.IMAGE_RAW, S.HEIGHT, S.WIDTH)}
        sizes = [(int(h), int(w)) for h, w in zip(sub[S.HEIGHT], sub[S.WIDTH], strict=True)]
        preds = self.fss.predict(self.fss.features(batch_rgb(sub)), self.state,
                                 [int(batch[TARGET_CLASS][i]) for i in todo], sizes)
        set_rows(batch, todo, {S.MASK_RAW: np.array([p.astype(self.mask_dtype).tobytes() for p in preds], dtype=object)})
        return batch


def _sum_partials(ds, num_classes: int):
    """Add the per-block partials (few rows) on the driver."""
    total = None
    pairs = 0
    for row in ds.take_all():
        part = _from_dense(row[_PARTIAL], num_classes)
        total = part if total is None else total.merged(part)
        pairs += int(row["pairs"])
    return total, pairs


def refine(ds, *, given_rows: Any = None, cfg: Any = None, source_format: str,
           num_classes: int, mask_dtype: str, fss_kwargs: dict[str, Any], cpu: dict[str, Any], alpha: float,
           relabel: bool, keep_masks: bool, **pool: Any):
    """Algorithm 1 on a Dataset of generated rows (image_raw, coarse mask_raw, aligndiff_class).

    ``given_rows`` are the source index rows (D_good; an Arrow table or a list of dicts); None
    re-reads them from ``cfg``'s source. ``pool``: map_batches arguments of the FSS actor pools
    (``compute``, ``batch_size``, ``num_gpus``...: the plan's dry run reads them like any
    pool's); ``cpu``: of CPU tasks.
    Returns the round-2 Dataset (lazy); conditioning and round 1 run here.
    """
    import pyarrow as pa
    import ray

    from pipelines.source_index import iter_slices

    if given_rows is None:  # the same rows, order and limit as the run's index
        from pipelines.source_index import index_source

        src = cfg.source
        table = index_source(src.path, src.format, split=src.split, classes=src.classes, require_masks=True).table
        given_rows = table.slice(0, src.limit) if src.limit else table
    if not isinstance(given_rows, pa.Table):
        given_rows = pa.Table.from_pylist(given_rows)
    host = {"fss_kwargs": fss_kwargs, "num_classes": num_classes, "mask_dtype": mask_dtype}
    given = ray.data.from_arrow(list(iter_slices(given_rows, max(1, -(-given_rows.num_rows // 8)))))
    cond = given.map_batches(ConditionPool, **pool, fn_constructor_kwargs={**host, "source_format": source_format})
    state0, pairs = _sum_partials(cond, num_classes)
    if state0 is None or pairs == 0:
        raise ValueError("aligndiff: no given image-mask pair could be read from the source to condition the FSS")
    log.info("aligndiff: FSS conditioned on %d given pair(s)", pairs)
    round1 = ds.map_batches(ConsensusRound1, **pool, fn_constructor_kwargs={
        **host, "state": state0.to_dict(), "alpha": alpha}).materialize()
    state1 = state0
    if relabel:
        dim = state0.sums.shape[1]
        partials = round1.map_batches(reduce_contributions, **{**cpu, "batch_size": None},
                                      fn_kwargs={"num_classes": num_classes, "dim": dim})
        delta, moved = _sum_partials(partials, num_classes)
        state1 = state0.merged(delta) if delta is not None else state0
        log.info("aligndiff: %d sample(s) moved to D_good in round 1; FSS re-conditioned", moved)
    return round1.map_batches(ConsensusRound2, **pool, fn_constructor_kwargs={
        **host, "state": state1.to_dict(), "relabel": relabel, "keep_masks": keep_masks})
