"""``mix.mode: variant`` — Diffusion Synthesis's mixing (Eq. 3): with probability α a real
training image is replaced by one of *its own* synthetic variants.

The driver reads only the ``source_id`` (and ``drop_reason``) columns of the synthetic shards
and attaches to each real index row the list of its variants (shard file, row in that file):
:func:`attach_variants`. The real stream carries those columns through
:mod:`training.epochs` untouched; :func:`training.transforms.transform_batch` draws per row
from the row's own augmentation key (run seed, sample id, epoch), so each epoch redraws and a
rerun draws the same, and decodes a chosen variant from its Parquet row. No independent
synthetic stream runs in this mode.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from core import schema as S
from core.config import ConfigError

log = logging.getLogger(__name__)

VARIANT_PATHS, VARIANT_ROWS = "variant_paths", "variant_rows"
SALT = 0x5EED_A1FA  # the α draw uses its own stream of the row's key, apart from the crop's


def variant_index(files: list[str]) -> dict[str, list[tuple[str, int]]]:
    """source_id -> [(shard file, row in file)] of the kept synthetic rows, in file order."""
    import pyarrow.parquet as pq

    from core import storage

    out: dict[str, list[tuple[str, int]]] = {}
    for f in files:
        loc = storage.resolve_file(f)
        names = pq.ParquetFile(loc.path, filesystem=loc.fs).schema_arrow.names
        cols = [c for c in (S.SOURCE_ID, S.DROP_REASON) if c in names]
        if S.SOURCE_ID not in cols:
            raise ConfigError(f"mix.mode: variant needs a {S.SOURCE_ID} column; {f} has none")
        table = pq.read_table(loc.path, filesystem=loc.fs, columns=cols).to_pydict()
        drops = table.get(S.DROP_REASON) or [""] * len(table[S.SOURCE_ID])
        for i, (sid, drop) in enumerate(zip(table[S.SOURCE_ID], drops, strict=True)):
            if not drop:
                out.setdefault(str(sid), []).append((f, i))
    return out


def attach_variants(columns: dict[str, np.ndarray], files: list[str]) -> dict[str, np.ndarray]:
    """``columns`` (the real index as column arrays) with each row's variants added; at least
    one real row must have a variant (else the mode would silently train on real data only)."""
    index = variant_index(files)
    ids = [str(s) for s in columns[S.SOURCE_ID]]
    found = [index.get(s, []) for s in ids]
    with_variants = sum(bool(v) for v in found)
    if not with_variants:
        raise ConfigError(f"mix.mode: variant: no synthetic sample's source_id matches a real training row "
                          f"(e.g. real {ids[:1]}, synthetic {list(index)[:1]})")
    if with_variants < len(ids):
        log.warning("mix.mode=variant: %d of %d real rows have no synthetic variant (always real)",
                    len(ids) - with_variants, len(ids))
    paths, rows = np.empty(len(ids), dtype=object), np.empty(len(ids), dtype=object)
    paths[:] = [[f for f, _ in v] for v in found]
    rows[:] = [[r for _, r in v] for v in found]
    return {**columns, VARIANT_PATHS: paths, VARIANT_ROWS: rows}


def pick_variant(row: dict[str, Any], key: int | None, alpha: float) -> dict[str, Any] | None:
    """The index row of the variant that replaces ``row`` (a Parquet row), or None to keep it:
    with probability ``alpha``, uniformly among its variants, drawn from ``key``."""
    paths = row.get(VARIANT_PATHS)
    if key is None or paths is None or len(paths) == 0:
        return None
    rng = np.random.default_rng([int(key), SALT])
    if rng.random() >= alpha:
        return None
    j = int(rng.integers(len(paths)))
    return {S.SOURCE_ID: row[S.SOURCE_ID], S.SOURCE_PATH: paths[j], S.SOURCE_MASK_PATH: paths[j],
            "source_row": int(row[VARIANT_ROWS][j])}
