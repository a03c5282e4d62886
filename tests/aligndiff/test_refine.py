"""Algorithm 1 stage by stage (as ``refine`` wires them on Ray Data): round assignment, consensus
scores and the re-conditioning aggregate recomputed independently from the rows that come out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.fss_prototype import PrototypeFSS
from core import schema as S
from pipelines.graphs.aligndiff import refine as R

SIZE, ALPHA = 64, 0.6


def _sample(rng, y0, x0, side=24):
    image = rng.normal(90, 20, (SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    image[..., 2] = 160
    mask = np.zeros((SIZE, SIZE), np.uint8)
    image[y0:y0 + side, x0:x0 + side] = (rng.normal(0, 15, (side, side, 3)) + [200, 40, 40]).clip(0, 255)
    mask[y0:y0 + side, x0:x0 + side] = 1
    return image, mask


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """Two given pairs on disk, as source index rows (folder layout)."""
    root = tmp_path_factory.mktemp("given")
    rng = np.random.default_rng(7)
    rows = []
    for k, (y, x) in enumerate([(4, 4), (30, 36)]):
        image, mask = _sample(rng, y, x)
        Image.fromarray(image).save(root / f"g{k}.png")
        Image.fromarray(mask).save(root / f"g{k}_mask.png")
        rows.append({S.SOURCE_ID: f"g{k}", S.SOURCE_PATH: str(root / f"g{k}.png"),
                     S.SOURCE_MASK_PATH: str(root / f"g{k}_mask.png"), "source_row": -1,
                     S.CAPTION: "", S.SHARD: 0})
    return rows


def _synthetic_rows():
    """12 generated rows: coarse masks on the object (rows 0-5) or shifted off it (6-11); one
    row already dropped upstream."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        y, x = rng.integers(0, SIZE - 24, 2)
        image, mask = _sample(rng, y, x)
        coarse = mask if i < 6 else np.roll(mask, (20, 20), axis=(0, 1))
        if i == 3:
            coarse = coarse.copy()
            coarse[:4] = S.IGNORE_INDEX   # ignored pixels do not count in the IoU
        rows.append({S.SAMPLE_ID: f"g0/aligndiff/{i}", S.SOURCE_ID: "g0", S.IMAGE_RAW: image.tobytes(),
                     S.MASK_RAW: coarse.tobytes(), S.HEIGHT: SIZE, S.WIDTH: SIZE, R.TARGET_CLASS: 1,
                     S.DROP_REASON: "mask2img_error: boom" if i == 11 else ""})
    return rows


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if isinstance(values[0], (int, np.integer)):
            out[k] = np.array(values, np.int64)
        else:
            out[k] = np.empty(len(values), dtype=object)
            out[k][:] = values
    return out


def _run(given):
    """The stages of ``refine`` in order, in process (the Ray wiring runs in test_graph)."""
    import torch

    torch.set_num_threads(1)
    host = {"fss_kwargs": {"preset": "tiny", "background": 0, "device": "cpu", "image_size": 32},
            "num_classes": 2, "mask_dtype": "|u1"}
    cond = R.ConditionPool(**host, source_format="folder")(_batch(given))
    state0 = R._from_dense(cond[R._PARTIAL][0], 2)
    assert int(cond["pairs"][0]) == 2
    rows = _synthetic_rows()
    first = [R.ConsensusRound1(**host, state=state0.to_dict(), alpha=ALPHA)(_batch(rows[i:i + 4]))
             for i in range(0, len(rows), 4)]                      # three blocks, as Ray would split
    delta = None
    for block in first:                                           # per-block partials, then their sum
        part = R._from_dense(R.reduce_contributions(block, num_classes=2, dim=state0.sums.shape[1])[R._PARTIAL][0], 2)
        delta = part if delta is None else delta.merged(part)
    state1 = state0.merged(delta)
    out = []
    for block in first:
        done = R.ConsensusRound2(**host, state=state1.to_dict(), relabel=True, keep_masks=True)(block)
        out += [{k: v[i] for k, v in done.items()} for i in range(len(done[S.SAMPLE_ID]))]
    return out


def test_two_rounds_match_algorithm_1(given):
    rows = _run(given)
    assert len(rows) == 12
    dropped, live = rows[11], rows[:11]
    assert dropped[R.ROUND] == 0 and np.isnan(dropped[R.SCORE_CONSENSUS_IOU])
    for r in live:
        coarse, fss1 = _decode(r[R.COARSE_MASK]), _decode(r[R.FSS_MASK])
        score = R.consensus_iou(coarse, fss1, 1)
        assert r[R.SCORE_CONSENSUS_IOU] == pytest.approx(score)
        assert r[R.ROUND] == (1 if score > ALPHA else 2)
    rounds = [r[R.ROUND] for r in live]
    assert rounds[:6] == [1] * 6 and rounds[6:] == [2] * 5   # on-object coarse masks agree, shifted ones do not

    # round 2 = the FSS conditioned on the given pairs + the round-1 rows with their coarse masks
    fss = PrototypeFSS("tiny", background=0, device="cpu", image_size=32)
    images, masks = [], []
    for g in given:
        images.append(np.array(Image.open(g[S.SOURCE_PATH]).convert("RGB")))
        masks.append(np.array(Image.open(g[S.SOURCE_MASK_PATH])))
    state1 = fss.condition(images, masks, num_classes=2)
    good = [r for r in live if r[R.ROUND] == 1]
    fss.condition([np.frombuffer(r[S.IMAGE_RAW], np.uint8).reshape(SIZE, SIZE, 3) for r in good],
                  [_decode(r[R.COARSE_MASK]) for r in good], num_classes=2, state=state1)
    for r in live:
        mask = np.frombuffer(r[S.MASK_RAW], np.uint8).reshape(SIZE, SIZE)
        if r[R.ROUND] == 1:
            assert np.array_equal(mask, _decode(r[R.COARSE_MASK]))
        else:
            image = np.frombuffer(r[S.IMAGE_RAW], np.uint8).reshape(SIZE, SIZE, 3).copy()
            expected, = fss.predict(fss.features([image]), state1, [1], [(SIZE, SIZE)])
            assert np.array_equal(mask, expected)
            assert not np.array_equal(mask, _decode(r[R.COARSE_MASK]))


def test_without_relabelling_round_2_rows_are_dropped():
    """Round 2 with relabelling off (no model needed): round-2 rows get the filter's reason."""
    n = 3
    coarse = np.zeros((SIZE, SIZE), np.uint8)
    batch = {S.SAMPLE_ID: np.array(["a", "b", "c"], dtype=object), S.DROP_REASON: np.array(["", "", "x: y"], dtype=object),
             R.ROUND: np.array([1, 2, 0]), R.SCORE_CONSENSUS_IOU: np.array([0.9, 0.25, np.nan]),
             S.MASK_RAW: np.array([coarse.tobytes()] * n, dtype=object), S.HEIGHT: np.full(n, SIZE),
             S.WIDTH: np.full(n, SIZE), R._FSS_RAW: np.array([coarse.tobytes()] * n, dtype=object),
             R._CONTRIB: np.array([b""] * n, dtype=object)}
    out = R.ConsensusRound2({}, 2, "|u1", None, relabel=False, keep_masks=False)(batch)
    assert list(out[S.DROP_REASON]) == ["", f"{S.LOW_CONSENSUS_IOU}: IoU 0.250 <= alpha", "x: y"]
    assert R._CONTRIB not in out and R._FSS_RAW not in out and R.COARSE_MASK not in out
