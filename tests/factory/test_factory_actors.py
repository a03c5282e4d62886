"""Factory actors on tiny models: one model call per batch, injected components, merge math."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from actors import vision_models as vm
from actors.captioner import Captioner, tiny_captioner
from actors.clip_embedder import ClipEmbedder
from actors.grounding import Grounding, phrase_prompt
from actors.sam import SamMasks, merge_masks
from core import schema as S

CLASSES = ["background", "cat", "dog", "diningtable"]


def _batch(shapes, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    return {S.IMAGE_RAW: np.array([im.tobytes() for im in images], dtype=object),
            S.HEIGHT: np.array([s[0] for s in shapes]), S.WIDTH: np.array([s[1] for s in shapes])}


def _spy(obj, name):
    """Count calls of ``obj.name`` (an instance attribute shadows the method)."""
    calls = []
    original = getattr(obj, name)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


@pytest.fixture(scope="module")
def grounding():
    return Grounding(CLASSES, background=0, device="cpu")


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_captioner_one_generate_call_per_batch(kind):
    model, processor = tiny_captioner(kind)
    cap = Captioner(kind, model=model, processor=processor, device="cpu", min_new_tokens=3, max_new_tokens=6)
    assert cap.model is model  # injected components are used as given (convention 2)
    generate = _spy(cap.model, "generate")
    out = cap(_batch([(40, 56), (64, 48), (40, 56), (30, 30)]))
    assert len(generate) == 1 and cap.calls == 1
    captions = list(out[S.CAPTION])
    assert len(captions) == 4 and all(isinstance(c, str) and c for c in captions)
    assert not any(c.lower().startswith("question") for c in captions)  # BLIP-2's echo cut off
    again = Captioner(kind, device="cpu", min_new_tokens=3, max_new_tokens=6)(_batch([(40, 56)]))
    assert again[S.CAPTION][0] == captions[0]  # deterministic tiny weights, batch-independent


def test_grounding_prompt_and_token_spans(grounding):
    text, spans = phrase_prompt(["cat", "dog", "dining table"])
    assert text == "cat . dog . dining table ." and [text[a:b] for a, b in spans] == ["cat", "dog", "dining table"]
    chunk_text, token_target, ids = grounding.chunks[0]
    assert chunk_text == text and ids == [1, 2, 3]
    enc = grounding.processor.tokenizer(text)
    assert enc["input_ids"][0] == 101 and enc["input_ids"][-1] == 102  # BERT ids Grounding DINO expects
    for k in range(3):  # every class owns tokens; the separators "." own none
        assert (token_target == k).any()
    dots = [i for i, t in enumerate(enc["input_ids"]) if t == 1012]
    assert len(dots) == 3 and all(token_target[i] == -1 for i in dots)


def test_grounding_one_call_per_batch_and_batch_independent(grounding):
    forward = _spy(grounding.model, "forward")
    batch = _batch([(48, 64)] * 4)
    out = grounding(batch)
    assert len(forward) == 1  # four images of one size: one model call
    counts = out[S.BOX_COUNT]
    assert counts.dtype == np.int64 and (counts >= 1).all() and (counts <= grounding.max_boxes).all()
    for i in range(4):
        boxes = vm.bytes_to_floats(out[S.BOXES][i], 4)
        labels = np.frombuffer(out[S.BOX_LABELS][i], dtype="<i4")
        scores = vm.bytes_to_floats(out[S.BOX_SCORES][i])
        assert boxes.shape == (counts[i], 4) and len(labels) == len(scores) == counts[i]
        assert set(labels.tolist()) <= {1, 2, 3}  # never the background
        assert (scores > grounding.box_threshold).all() and (np.diff(scores) <= 0).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes >= 0).all() and (boxes[:, 2] <= 64).all()
    single = grounding({k: v[2:3] for k, v in batch.items()})
    np.testing.assert_allclose(vm.bytes_to_floats(single[S.BOXES][0], 4),
                               vm.bytes_to_floats(out[S.BOXES][2], 4), atol=1e-3)
    mixed = _spy(grounding.model, "forward")
    grounding(_batch([(48, 64), (64, 48), (48, 64)]))
    assert len(mixed) == 2  # one call per image size (no padding between rows)


def test_merge_masks_overlaps_by_score_background_and_ignore():
    probs = np.zeros((2, 2, 3), dtype=np.float32)
    probs[0] = [[0.9, 0.9, 0.2], [0.1, 0.1, 0.1]]  # class 5, score 0.4
    probs[1] = [[0.2, 0.8, 0.8], [0.1, 0.55, 0.1]]  # class 7, score 0.9
    merged = merge_masks(probs, np.array([5, 7]), np.array([0.4, 0.9]), background=0)
    assert merged.tolist() == [[5, 7, 7], [0, 7, 0]]  # the overlap at (0, 1) goes to the higher score
    banded = merge_masks(probs, np.array([5, 7]), np.array([0.4, 0.9]), background=0, uncertain_band=0.1)
    assert banded.tolist() == [[5, 7, 7], [0, 255, 0]]  # best probability 0.55: unsure -> ignore
    assert merge_masks(probs[:0], np.array([]), np.array([]), background=None).tolist() == [[255] * 3] * 2
    assert merge_masks(probs, np.array([300, 7]), np.array([0.4, 0.9]), 0, dtype="<u2")[0, 0] == 300


def test_sam_encoder_runs_once_per_batch(grounding):
    sam = SamMasks(background=0, device="cpu")
    encoder = _spy(sam.sam.image_encoder, "forward")
    decoder = _spy(sam.sam.mask_decoder, "forward")
    batch = _batch([(48, 64), (64, 48), (48, 64)])
    batch.update(grounding(batch))
    empty = {S.BOXES: b"", S.BOX_LABELS: b"", S.BOX_SCORES: b""}
    for col, value in empty.items():  # the third image has no boxes
        batch[col] = batch[col].copy()
        batch[col][2] = value
    out = sam(batch)
    assert len(encoder) == 1 and sam.calls == 1  # the image encoder: one call for the batch
    assert len(decoder) == 2  # the light decoder: once per image that has boxes
    for i, (h, w) in enumerate([(48, 64), (64, 48), (48, 64)]):
        mask = np.frombuffer(out[S.MASK_RAW][i], dtype=np.uint8).reshape(h, w)
        labels = set(np.frombuffer(batch[S.BOX_LABELS][i], dtype="<i4").tolist())
        assert set(np.unique(mask).tolist()) <= labels | {0}
    assert not np.frombuffer(out[S.MASK_RAW][2], dtype=np.uint8).any()  # no boxes: all background
    assert np.frombuffer(out[S.MASK_RAW][0], dtype=np.uint8).any()  # boxes: some object pixels


def test_clip_embeds_variants_and_sources_in_one_call_deduplicated():
    clip = ClipEmbedder(device="cpu")
    forward = _spy(clip.model, "forward")
    variants = _batch([(48, 64)] * 4, seed=1)
    real = _batch([(48, 64)] * 2, seed=2)[S.IMAGE_RAW]
    batch = dict(variants, **{S.SOURCE_IMAGE_RAW: np.array([real[0], real[0], real[1], real[1]], dtype=object)})
    out = clip(batch)
    assert len(forward) == 1
    emb = np.stack([np.frombuffer(e, "<f4") for e in out[S.CLIP_EMBEDDING]])
    src = np.stack([np.frombuffer(e, "<f4") for e in out[S.CLIP_SOURCE_EMBEDDING]])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(src[0], src[1]) and not np.array_equal(src[1], src[2])
    same = clip({S.IMAGE_RAW: batch[S.SOURCE_IMAGE_RAW][:1], S.HEIGHT: batch[S.HEIGHT][:1],
                 S.WIDTH: batch[S.WIDTH][:1]})
    np.testing.assert_allclose(np.frombuffer(same[S.CLIP_EMBEDDING][0], "<f4"), src[0], atol=1e-5)
