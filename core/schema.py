"""The dataset contract: column names, the Parquet schema, ids and seeds.

Every stage names columns through this module so a rename happens in one place.
Between stages, pixel data travels as raw little-endian bytes plus ``height``/``width``
(flat, cheap to move through the object store); the final encode stage turns them into
PNG/JPEG and drops the raw columns.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

IGNORE_INDEX = 255

# --- columns of the written dataset -------------------------------------------------------
SAMPLE_ID = "sample_id"
SOURCE_ID = "source_id"
METHOD = "method"
CAPTION = "caption"
PROMPT = "prompt"
IMAGE = "image"
MASK = "mask"
HEIGHT = "height"
WIDTH = "width"
SEED = "seed"
GENERATOR = "generator"
DROP_REASON = "drop_reason"
SCORE_PREFIX = "score_"

# --- working columns (never written to shards) --------------------------------------------
IMAGE_RAW = "image_raw"  # bytes, uint8 H*W*3
MASK_RAW = "mask_raw"  # bytes, H*W of mask_dtype()
COLOR_RAW = "color_raw"  # bytes, uint8 H*W*3 colour map
SOURCE_PATH = "source_path"  # where a source row came from, for error messages / rejected rows
SOURCE_MASK_PATH = "source_mask_path"
SHARD = "shard"  # index of the deterministic shard a row belongs to
COPY = "copy"  # k of the K copies made of one source row
# factory graph (Diffusion Synthesis) working columns
SOURCE_IMAGE_RAW = "source_image_raw"  # bytes, uint8 H*W*3: the real image a variant is made from
BOXES = "boxes"  # bytes, float32 N*4 pixel x0 y0 x1 y1 (Grounding DINO)
BOX_LABELS = "box_labels"  # bytes, int32 N class ids
BOX_SCORES = "box_scores"  # bytes, float32 N detection scores
BOX_COUNT = "box_count"  # int N
RESEG_PREFIX = "reseg_"  # prefix of the re-segmentation columns (boxes/mask found on the variant)
RESEG_MASK_RAW = RESEG_PREFIX + MASK_RAW
CLIP_EMBEDDING = "clip_embedding"  # bytes, float32 unit vector of image_raw
CLIP_SOURCE_EMBEDDING = "clip_source_embedding"  # bytes, float32 unit vector of source_image_raw
SCORE_CLIP_SIMILARITY = SCORE_PREFIX + "clip_similarity"
SCORE_RESEG_MIOU = SCORE_PREFIX + "reseg_miou"
PROMPT_TRUNCATED = "prompt_truncated"  # bool: the model cut the prompt to its tokenizer's limit
# attn2mask graph working columns
CLASS_SPANS = "class_spans"  # str, JSON [[class_id, start, end], ...]: character spans of class words in prompt
ATTN_RAW = "attn_raw"  # bytes, float32 G*h*w cross-attention maps, one per class of attn_class_ids
ATTN_HEIGHT = "attn_height"  # int, h of attn_raw
ATTN_WIDTH = "attn_width"  # int, w of attn_raw
ATTN_CLASS_IDS = "attn_class_ids"  # bytes, int32 G class ids of the maps
SCORE_RELIABLE_FRACTION = SCORE_PREFIX + "reliable_fraction"  # share of pixels not marked 255
SCORE_RELIABLE_FOREGROUND = SCORE_PREFIX + "reliable_foreground_fraction"  # share of reliable object pixels

# Drop reasons of quality filters: expected losses, counted apart from errors and bad input
# (they do not count towards validation.max_rejected_fraction).
LOW_SIMILARITY = "low_similarity"
LOW_RESEG_MIOU = "low_reseg_miou"
NO_RELIABLE_FOREGROUND = "no_reliable_foreground"  # attn2mask: no object pixel survived the reliability map
LOW_CONSENSUS_IOU = "low_consensus_iou"  # aligndiff with relabelling off
FILTER_REASONS = frozenset({LOW_SIMILARITY, LOW_RESEG_MIOU, NO_RELIABLE_FOREGROUND, LOW_CONSENSUS_IOU})

# Optional columns a graph writes when its rows carry them (besides score_*).
ALIGNDIFF_ROUND = "aligndiff_round"  # 1: coarse mask kept (consensus), 2: relabelled by the re-conditioned FSS
ALIGNDIFF_COARSE_MASK = "aligndiff_coarse_mask"  # PNG: the cross-attention mask (aligndiff.keep_masks)
ALIGNDIFF_FSS_MASK = "aligndiff_fss_mask"  # PNG: the round-1 FSS prediction (aligndiff.keep_masks)
EXTRA_COLUMNS: dict[str, pa.DataType] = {
    ALIGNDIFF_ROUND: pa.int32(), ALIGNDIFF_COARSE_MASK: pa.binary(), ALIGNDIFF_FSS_MASK: pa.binary(),
}

METHODS = ("imgsyn", "masksyn", "factory", "aligndiff", "attn2mask")

DATASET_SCHEMA = pa.schema(
    [
        (SAMPLE_ID, pa.string()),
        (SOURCE_ID, pa.string()),
        (METHOD, pa.string()),
        (CAPTION, pa.string()),
        (PROMPT, pa.string()),
        (IMAGE, pa.binary()),
        (MASK, pa.binary()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (SEED, pa.int64()),
        (GENERATOR, pa.string()),
        (DROP_REASON, pa.string()),
    ]
)

# Rejected rows keep where they came from so a user can find the bad file.
REJECTED_EXTRA = [(SOURCE_PATH, pa.string())]


def mask_dtype(num_classes: int) -> np.dtype:
    """uint8 masks while class ids and the ignore index fit, uint16 past that."""
    return np.dtype(np.uint8) if num_classes <= IGNORE_INDEX else np.dtype("<u2")


def make_sample_id(source_id: str, method: str, copy: int) -> str:
    """Deterministic id, e.g. ``2007_000032/imgsyn/3``."""
    return f"{source_id}/{method}/{copy}"


def derive_seed(global_seed: int, key: str) -> int:
    """A stable 63-bit seed from the run seed and a string key (never Python's ``hash()``)."""
    digest = hashlib.sha256(f"{global_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def raw_to_array(data: bytes, height: int, width: int, dtype=np.uint8, channels: int = 0) -> np.ndarray:
    """Decode a raw pixel column value back into an array (read-only view, no copy)."""
    shape = (height, width, channels) if channels else (height, width)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def require_columns(batch: dict, needed: tuple[str, ...] | list[str], who: str) -> None:
    """Fail early with the list of missing columns (checked by actors on their batches)."""
    missing = [c for c in needed if c not in batch]
    if missing:
        raise KeyError(f"{who}: batch lacks column(s) {missing}; has {sorted(batch)}")
