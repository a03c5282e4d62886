"""SegGen's fan-out: each source row becomes K ImgSyn rows (its mask, new images) and M MaskSyn
rows (its caption, new masks), each with its own id and seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from core import schema as S
from pipelines.stages import SIBLINGS, _objects


def expand_sources(batch: dict[str, np.ndarray], *, copies: dict[str, int], seed: int, source_format: str,
                   classes: list[str], background: int | None, mask_dtype: str,
                   first_copy: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Decode each source row and fan it out to ``copies[method]`` sample rows, numbered from
    ``first_copy[method]`` (an extension of a dataset makes the ids a bigger run would have).

    ImgSyn copies carry the source mask; MaskSyn copies carry only the caption (Text2Mask
    draws their mask). A source row that cannot be read becomes one rejected row that
    names the file, so nothing is lost silently.
    """
    from pipelines.sources import SourceError, caption_from_mask, load_pixels

    out: dict[str, list] = {c: [] for c in _EXPANDED_COLUMNS}

    def emit(**row: Any) -> None:
        for col in _EXPANDED_COLUMNS:
            out[col].append(row.get(col, _EXPANDED_COLUMNS[col]))

    for i in range(len(batch[S.SOURCE_ID])):
        row = {k: v[i] for k, v in batch.items()}
        sid, shard = str(row[S.SOURCE_ID]), int(row[S.SHARD])
        common = {S.SOURCE_ID: sid, S.SHARD: shard, S.SOURCE_PATH: str(row.get(S.SOURCE_PATH) or "")}
        mask, caption = None, str(row.get(S.CAPTION) or "")
        if row.get(S.DROP_REASON):  # dropped upstream (an image the captioner could not read)
            emit(**common, **{S.SAMPLE_ID: f"{sid}/source", S.METHOD: "source", SIBLINGS: 1,
                              S.DROP_REASON: str(row[S.DROP_REASON])})
            continue
        try:
            if source_format != "captions":
                _, mask = load_pixels(row, source_format, len(classes))
            if not caption:
                if mask is None:
                    raise SourceError(f"{sid}: no caption and no mask to build one from")
                caption = caption_from_mask(mask, classes, background)
        except SourceError as exc:
            emit(**common, **{S.SAMPLE_ID: f"{sid}/source", S.METHOD: "source", SIBLINGS: 1,
                              S.DROP_REASON: f"{getattr(exc, 'reason', 'bad_source')}: {exc}"[:500]})
            continue
        first = first_copy or {}
        plan = [(m, k) for m in ("imgsyn", "masksyn")
                for k in range(first.get(m, 0), first.get(m, 0) + copies.get(m, 0))
                if not (m == "imgsyn" and mask is None)]
        h, w = mask.shape if mask is not None else (0, 0)
        mask_bytes = mask.astype(mask_dtype).tobytes() if mask is not None else b""
        for method, k in plan:
            sample_id = S.make_sample_id(sid, method, k)
            emit(**common, **{
                S.SAMPLE_ID: sample_id, S.METHOD: method, S.CAPTION: caption, S.PROMPT: caption,
                S.SEED: S.derive_seed(seed, sample_id), S.HEIGHT: h, S.WIDTH: w, SIBLINGS: len(plan),
                S.MASK_RAW: mask_bytes if method == "imgsyn" else b"",
            })
    return {col: (np.array(v, dtype=np.int64) if col in _INT_COLUMNS else _objects(v)) for col, v in out.items()}


_EXPANDED_COLUMNS: dict[str, Any] = {
    S.SAMPLE_ID: "", S.SOURCE_ID: "", S.METHOD: "", S.CAPTION: "", S.PROMPT: "", S.SEED: 0,
    S.HEIGHT: 0, S.WIDTH: 0, S.MASK_RAW: b"", S.IMAGE_RAW: b"", S.COLOR_RAW: b"", S.GENERATOR: "",
    S.DROP_REASON: "", S.SHARD: 0, SIBLINGS: 0, S.SOURCE_PATH: "", S.PROMPT_TRUNCATED: 0,
}
_INT_COLUMNS = {S.SEED, S.HEIGHT, S.WIDTH, S.SHARD, SIBLINGS, S.PROMPT_TRUNCATED}
