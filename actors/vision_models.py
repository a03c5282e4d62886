"""Shared helpers of the factory's transformers actors (captioner, grounding, CLIP).

- ``make_bert_tokenizer``: a BERT-style tokenizer made in memory (no files, offline) for the
  ``tiny`` preset. Grounding DINO hard-codes BERT's ids of ``[CLS]`` (101), ``[SEP]`` (102),
  ``.`` (1012) and ``?`` (1029) to split its text prompt into phrases, so those four keep their
  BERT ids; every other entry is a character or a character pair, so any text tokenises and
  every id decodes to text (no ``[unusedN]`` in generated captions).
- ``load_pretrained``: real weights by id + revision or a local path, safetensors only, never
  ``trust_remote_code`` (the same rules as ``diffusion_models._from_pretrained``).
- ``batch_images``: the RGB images of a batch, from the raw working column or encoded bytes.

Heavy imports happen inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import io
import logging
import string
from typing import Any

import numpy as np

from actors import diffusion_models as dm
from core.schema import HEIGHT, IMAGE, WIDTH, raw_to_array

log = logging.getLogger(__name__)

BERT_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
TINY_VOCAB_SIZE = 1100  # past 1029 so Grounding DINO's special ids exist


def make_bert_tokenizer(model_max_length: int = 256) -> Any:
    """A lower-casing WordPiece tokenizer over characters and character pairs, built in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = string.ascii_lowercase + string.digits
    pieces = [c for c in string.printable.strip() if c not in ".?" and not c.isupper()]
    pieces += ["##" + c for c in letters]
    pieces += [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    pieces += ["##" + a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    free = (i for i in range(TINY_VOCAB_SIZE) if i not in BERT_SPECIAL.values())
    vocab = dict(BERT_SPECIAL)
    for piece, i in zip(pieces, free):  # noqa: B905 - the vocabulary stops where ids run out
        vocab[piece] = i
    assert len(vocab) == TINY_VOCAB_SIZE, len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def load_pretrained(cls: Any, model_id: str | None, revision: str | None, local_path: str | None,
                    what: str, weights: bool = True, variant: str | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for real presets; a local path wins over a hub id.

    ``weights=False`` is for processors/tokenizers (no ``use_safetensors``); ``variant`` (e.g.
    "fp16") reads ``model.fp16.safetensors``. An unpinned id warns once: a moving ``main``
    silently changes the dataset.
    """
    extra: dict[str, Any] = {"use_safetensors": True} if weights else {}
    if weights and variant:
        extra["variant"] = variant
    if local_path:
        from core.storage import local_copy  # a URI: fetched once per node

        return cls.from_pretrained(local_copy(local_path), local_files_only=True, **extra, **kwargs)
    if not model_id:
        raise ValueError(f"{what}: give a model id or a local path (preset is not tiny)")
    if not revision or revision == "main":
        dm._warn_once(f"unpinned-{model_id}", "%s %s has no pinned revision: using 'main'", what, model_id)
    return cls.from_pretrained(model_id, revision=revision or "main", **extra, **kwargs)


def batch_images(batch: dict, column: str) -> list[np.ndarray]:
    """uint8 HxWx3 arrays: ``column`` as raw bytes with ``height``/``width`` (or already an N x H x
    W x 3 array), or encoded ``image``."""
    if column in batch and getattr(batch[column], "ndim", 1) == 4:  # decoded pictures, N x H x W x 3
        return [np.array(im, dtype=np.uint8) for im in batch[column]]
    if column in batch:
        hs, ws = batch[HEIGHT], batch[WIDTH]
        # copies: torch warns on (and must not write into) read-only buffers
        return [np.array(raw_to_array(raw, int(h), int(w), np.uint8, 3))
                for raw, h, w in zip(batch[column], hs, ws, strict=True)]
    if IMAGE in batch:
        from PIL import Image

        out = []
        for data in batch[IMAGE]:
            with Image.open(io.BytesIO(data)) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        return out
    raise KeyError(f"batch has neither {column!r} (+height/width) nor {IMAGE!r}; has {sorted(batch)}")


# The models the ``tiny`` preset builds in code instead of loading weights, one entry per model
# kind ("module:function", imported on use so this table pulls in no actor): the one place
# that knows which presets build in code. Real presets take the actor's own loader.
TINY_BUILDERS = {
    "captioner": "actors.captioner:tiny_captioner",
    "clip": "actors.clip_embedder:tiny_clip",
    "grounding": "actors.grounding:tiny_grounding",
    "sam": "actors.sam:tiny_sam",
    "fss": "actors.fss_prototype:tiny_backbone",
}
BUILT_IN_CODE = dm.FLOAT32_PRESETS  # presets whose models TINY_BUILDERS makes (tiny)


def build_or_load(preset: str, model: str, load: Any, **tiny_kwargs: Any) -> Any:
    """The ``tiny`` preset's ``model`` (a key of TINY_BUILDERS) built in code, else ``load()``
    (real weights); ``tiny_kwargs`` go to the builder."""
    if preset not in BUILT_IN_CODE:
        return load()
    import importlib

    module, _, name = TINY_BUILDERS[model].partition(":")
    return getattr(importlib.import_module(module), name)(**tiny_kwargs)


def device_and_dtype(preset: str, device: str | None, dtype: str) -> tuple[str, Any]:
    """Where a model runs and in what precision (tiny: always float32)."""
    dev = dm.pick_device(device)
    return dev, dm.resolve_dtype("float32" if preset in BUILT_IN_CODE else dtype, dev)


def floats_to_bytes(values: Any) -> bytes:
    """A flat little-endian float32 column value (embeddings, boxes, scores)."""
    return np.ascontiguousarray(np.asarray(values, dtype="<f4")).tobytes()


def bytes_to_floats(data: bytes, width: int = 1) -> np.ndarray:
    """Inverse of :func:`floats_to_bytes`; ``width`` > 1 reshapes to rows of that width."""
    arr = np.frombuffer(data, dtype="<f4")
    return arr.reshape(-1, width) if width > 1 else arr
