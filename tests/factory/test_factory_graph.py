"""The factory graph (Diffusion Synthesis) end to end with tiny models on a local Ray, from a
folder of images with no masks: SAM masks, K variants per image, scores, drop reasons."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from actors.captioner import Captioner
from actors.grounding import Grounding
from actors.sam import SamMasks
from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "factory-tiny.yaml"
CLASSES = ["background", "cat", "dog"]
K = 2
# Random tiny weights: thresholds picked (clear of every score of this fixed run) so that kept
# rows and both drop reasons occur. Recalibrated for the `edm` sampler (mask2img.sampler's
# default): similarity 0.883 / 0.935 (img1) < ε < 0.958..0.973; re-seg mIoU 0.334 / 0.335 (img0)
# < τ < 0.359 / 0.368 (img2).
EPS, TAU = 0.95, 0.35


def make_image_folder(root: Path, n: int = 3, size: tuple[int, int] = (48, 64)) -> Path:
    """images/ (no masks) + classes.txt; one image comes with its own caption."""
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((*size, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        a[10:30, 12 + 8 * i:44 + 4 * i] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(a).save(root / "images" / f"img{i}.png")
    (root / "captions.jsonl").write_text(json.dumps({"source_id": "img1", "caption": "a cat on a mat"}) + "\n")
    return root


def _png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def factory_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("factory")
    src = make_image_folder(root / "src")
    cfg = load_config(GenerateConfig, CONFIG, [
        f"source.path={src}", f"output.path={root / 'out'}", "ray.show_progress=false",
        f"factory.samples_per_image={K}", f"selection.similarity_threshold={EPS}",
        f"selection.reseg_miou_threshold={TAU}"])
    result = run_generate(cfg)
    kept = pd.read_parquet(root / "out" / "shards")
    rejected = pd.read_parquet(root / "out" / "rejected")
    return src, result.manifest, kept, rejected


def test_every_image_gives_k_rows_kept_or_dropped_with_counts(factory_run):
    src, manifest, kept, rejected = factory_run
    ids = sorted(kept[S.SAMPLE_ID]) + sorted(rejected[S.SAMPLE_ID])
    assert sorted(ids) == [f"img{i}/factory/{k}" for i in range(3) for k in range(K)]
    assert manifest["rows"] == len(kept) and manifest["rejected_rows"] == len(rejected)
    assert manifest["rows_per_method"] == ({"factory": len(kept)} if len(kept) else {})
    reasons = rejected[S.DROP_REASON].value_counts().to_dict()
    assert manifest["drops_per_reason"] == reasons
    assert set(reasons) == {"low_similarity", "low_reseg_miou"} and len(kept) >= 1  # all outcomes occur
    both = pd.concat([kept, rejected])
    assert all(both[S.SEED] == [S.derive_seed(0, sid) for sid in both[S.SAMPLE_ID]])
    assert (both[S.METHOD] == "factory").all() and (both[S.GENERATOR] == "tiny-random").all()


def test_scores_and_drop_reasons_follow_epsilon_and_tau(factory_run):
    _, _, kept, rejected = factory_run
    assert {S.SCORE_CLIP_SIMILARITY, S.SCORE_RESEG_MIOU} <= set(kept.columns) & set(rejected.columns)
    assert (kept[S.SCORE_CLIP_SIMILARITY] > EPS).all() and (kept[S.SCORE_RESEG_MIOU] >= TAU).all()
    low_sim = rejected[rejected[S.DROP_REASON] == "low_similarity"]
    assert (low_sim[S.SCORE_CLIP_SIMILARITY] <= EPS).all()
    assert low_sim[S.SCORE_RESEG_MIOU].isna().all()  # never re-segmented: null, not a number
    low_miou = rejected[rejected[S.DROP_REASON] == "low_reseg_miou"]
    assert (low_miou[S.SCORE_CLIP_SIMILARITY] > EPS).all() and (low_miou[S.SCORE_RESEG_MIOU] < TAU).all()
    scores = pd.concat([kept, rejected])[[S.SCORE_CLIP_SIMILARITY, S.SCORE_RESEG_MIOU]].to_numpy().ravel()
    scores = scores[~np.isnan(scores)]
    assert ((scores >= -1) & (scores <= 1)).all()
    assert np.abs(scores - EPS).min() > 1e-3 and np.abs(scores - TAU).min() > 1e-3  # margins hold


def test_masks_come_from_grounding_and_sam_and_variants_match_them(factory_run):
    src, _, kept, rejected = factory_run
    rows = pd.concat([kept, rejected]).sort_values(S.SAMPLE_ID)
    grounding, sam = Grounding(CLASSES, background=0, device="cpu"), SamMasks(background=0, device="cpu")
    for i in range(3):
        image = np.array(Image.open(src / "images" / f"img{i}.png").convert("RGB"))
        batch = {S.IMAGE_RAW: np.array([image.tobytes()], dtype=object), S.HEIGHT: np.array([48]),
                 S.WIDTH: np.array([64])}
        batch.update(grounding(batch))
        expected = np.frombuffer(sam(batch)[S.MASK_RAW][0], dtype=np.uint8).reshape(48, 64)
        assert expected.any()  # SAM found objects
        ids, counts = np.unique(expected[expected > 0], return_counts=True)
        present = ", ".join(CLASSES[c] for c in ids[np.argsort(-counts, kind="stable")])
        for _, row in rows[rows[S.SOURCE_ID] == f"img{i}"].iterrows():
            assert row[S.PROMPT].endswith("; " + present)  # caption + the mask's classes, largest first
            if row[S.DROP_REASON]:
                continue  # rejected rows keep ids, scores and reasons, not pixels
            mask = _png(row[S.MASK])
            assert mask.shape == (row[S.HEIGHT], row[S.WIDTH]) == (48, 64)
            assert (mask == expected).mean() > 0.99  # the written mask is SAM's (float noise aside)
            assert _png(row[S.IMAGE]).shape == (48, 64, 3)
    image1 = rows[rows[S.SOURCE_ID] == "img1"]
    assert (image1[S.CAPTION] == "a cat on a mat").all()  # a source caption skips the captioner
    image0 = np.array(Image.open(src / "images" / "img0.png").convert("RGB"))
    cap = Captioner("blip", device="cpu", max_new_tokens=8, min_new_tokens=3)
    caption = cap({S.IMAGE_RAW: np.array([image0.tobytes()], dtype=object), S.HEIGHT: np.array([48]),
                   S.WIDTH: np.array([64])})[S.CAPTION][0]
    assert caption and (rows[rows[S.SOURCE_ID] == "img0"][S.CAPTION] == caption).all()
