"""Class-id masks <-> RGB colour maps through a palette (SegGen, appendix A.2).

Text2Mask draws masks as colour maps and Mask2Img is conditioned on them, so every mask crosses
this boundary twice: ``mask_to_color`` is a table lookup, ``color_to_mask`` assigns each pixel
the class of its nearest palette colour (Euclidean, RGB), which absorbs the small colour drift
of a VAE round trip.

Ignore pixels (``IGNORE_INDEX``) get an ignore colour that is *not* a class colour (see
``default_ignore_color``); decoding treats it as one more table entry, so ignore round-trips.
Palettes with repeated colours cannot round-trip: a repeated colour decodes to its lowest id.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from core.schema import IGNORE_INDEX, mask_dtype

# mmseg / ControlNet-seg ADE20K palette, 150 classes, flattened RGB. Note that it repeats one
# colour: class 6 (road) and class 48 (skyscraper) are both (140, 140, 140).
# fmt: off
_ADE20K = (
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140,
    204, 5, 255, 230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8,
    255, 51, 255, 6, 82, 143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230,
    250, 255, 6, 51, 11, 102, 255, 255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92,
    112, 9, 255, 8, 255, 214, 7, 255, 224, 255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255,
    224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7, 255, 122, 8, 0, 255, 20, 255, 8, 41, 255,
    5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255, 140, 140, 140, 250, 10, 15, 20,
    255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255, 255, 71, 0, 0, 235, 255,
    0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255, 0, 255, 112, 0,
    255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0, 0, 82,
    255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255,
    255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0,
    71, 255, 255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194,
    255, 0, 122, 255, 0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255,
    163, 255, 0, 255, 235, 0, 8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0,
    184, 255, 0, 214, 255, 255, 0, 112, 92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163,
    0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163, 255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255,
    0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0, 10, 190, 212, 214, 255, 0, 0, 204, 255,
    20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204, 41, 0, 255, 41, 255, 0, 173, 0,
    255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255, 184, 255, 0, 0, 133, 255,
    255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
)
# fmt: on
_ADE20K_DUPLICATE = 48  # the later of the two ids sharing (140, 140, 140)
_IGNORE_CANDIDATES = ((0, 0, 0), (224, 224, 192))  # ADE20K's 'unlabelled' black; VOC's 255
_LEVELS = np.arange(0, 256, 5, dtype=np.uint8)  # 52 levels per channel, 0 and 255 included
# Rows per distance block: small enough that OpenBLAS runs each (rows x 4 x N) product on one
# thread (rows*4*N <= 2**18); threaded tiny products thrash on a busy machine (measured 10x).
_BLOCK_ELEMS = 1 << 18


def _as_palette(palette: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    p = np.asarray(palette)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0 or p.min() < 0 or p.max() > 255:
        raise ValueError(f"palette must be a non-empty (N, 3) array of 0..255, got {p.shape}")
    return p.astype(np.uint8)


@functools.cache
def _lattice() -> np.ndarray:
    """The candidate colours for automatic palettes and ignore colours."""
    grid = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), -1).reshape(-1, 3)
    grid.flags.writeable = False
    return grid


def _nearest(points: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and squared distance to, the nearest ``table`` row for each of ``points``.

    argmin |x - t|^2 = argmax [x, 1] . [t, -|t|^2 / 2]: one small matmul per block of rows, so
    memory stays bounded. float32 is exact here (all terms are multiples of 1/2 below 2**22),
    so ties go to the lowest index, deterministically.
    """
    t = table.astype(np.float32)
    ta = np.hstack([t, -0.5 * (t * t).sum(1, keepdims=True)]).T.copy()
    idx = np.empty(len(points), np.intp)
    d2 = np.empty(len(points), np.float32)
    rows = int(np.clip(_BLOCK_ELEMS // (4 * len(t)), 64, 8192))
    xa = np.ones((min(rows, len(points)), 4), np.float32)
    for s in range(0, len(points), rows):
        n = len(points[s : s + rows])
        x = xa[:n]
        x[:, :3] = points[s : s + n]
        score = x @ ta
        i = score.argmax(1)
        idx[s : s + n] = i
        best = np.take_along_axis(score, i[:, None], 1)[:, 0]
        d2[s : s + n] = np.square(x[:, :3]).sum(1) - 2.0 * best
    return idx, d2


def min_pairwise_distance(palette: np.ndarray | Sequence[Sequence[int]]) -> float:
    """Smallest Euclidean distance between two entries (0.0 if a colour repeats): the noise
    margin of nearest-colour decoding is half of it."""
    p = _as_palette(palette).astype(np.float32)
    if len(p) < 2:
        return float("inf")
    best, rows_per_block = np.inf, max(1, (1 << 21) // len(p))
    for s in range(0, len(p), rows_per_block):
        d2 = ((p[s : s + rows_per_block, None, :] - p[None, :, :]) ** 2).sum(-1)
        rows = np.arange(d2.shape[0])
        d2[rows, rows + s] = np.inf  # not against itself
        best = min(best, float(d2.min()))
    return float(np.sqrt(best))


def _farthest_lattice_colour(palette: np.ndarray) -> np.ndarray:
    _, d2 = _nearest(_lattice(), palette)
    return _lattice()[int(d2.argmax())]


@functools.lru_cache(maxsize=64)
def _default_ignore(key: bytes) -> tuple[int, int, int]:
    p = np.frombuffer(key, np.uint8).reshape(-1, 3)
    margin = min_pairwise_distance(np.unique(p, axis=0))
    for cand in _IGNORE_CANDIDATES:
        if np.sqrt(((p.astype(np.float32) - cand) ** 2).sum(1).min()) >= margin:
            return cand
    return tuple(int(v) for v in _farthest_lattice_colour(p))


def default_ignore_color(palette: np.ndarray | Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The colour painted for ignore pixels, deterministic for a palette: black (ADE20K's
    'unlabelled') or else VOC's (224, 224, 192), if it is at least as far from every class
    colour as the two closest classes are from each other (so ignore is no easier to confuse
    than two classes); otherwise the lattice colour farthest from the palette."""
    return _default_ignore(_as_palette(palette).tobytes())


def _ignore_rgb(palette: np.ndarray, ignore_color: Sequence[int] | None) -> np.ndarray:
    rgb = np.asarray(default_ignore_color(palette) if ignore_color is None else ignore_color)
    if rgb.shape != (3,) or rgb.min() < 0 or rgb.max() > 255:
        raise ValueError(f"ignore_color must be 3 values in 0..255, got {ignore_color!r}")
    if (palette == rgb).all(1).any():
        raise ValueError(f"ignore_color {tuple(rgb.tolist())} is also a class colour")
    return rgb.astype(np.uint8)


def mask_to_color(
    mask: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    ignore_color: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ``ignore_index`` pixels get ``ignore_color``
    (default: ``default_ignore_color(palette)``). With more than ``ignore_index`` classes, that
    id means ignore, not a class. Raises ValueError naming ids the palette lacks."""
    m = np.asarray(mask)
    if m.dtype.kind not in "ui":
        raise TypeError(f"mask must hold integer class ids, got dtype {m.dtype}")
    p = _as_palette(palette)
    n = len(p)
    if m.size and (int(m.min()) < 0 or int(m.max()) >= n):
        bad = np.unique(m[((m < 0) | (m >= n)) & (m != ignore_index)])
        if bad.size:
            raise ValueError(
                f"mask has class ids {bad[:20].tolist()}{' ...' if bad.size > 20 else ''} "
                f"outside the palette's 0..{n - 1} (ignore index {ignore_index} is allowed)"
            )
    lut = np.zeros((max(n, ignore_index + 1), 3), np.uint8)
    lut[:n] = p
    lut[ignore_index] = _ignore_rgb(p, ignore_color)
    return lut[m]


def color_to_mask(
    color: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    ignore_color: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
    decode_ignore: bool = True,
    max_distance: float | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) class ids of the nearest palette colour.

    The ignore colour is one more candidate (unless ``decode_ignore`` is False) decoding to
    ``ignore_index``; pixels farther than ``max_distance`` from every candidate become ignore
    too (for generated maps with off-palette blobs). Distances are computed once per distinct
    colour, so clean maps cost little and noisy ones stay bounded. dtype: ``mask_dtype``.
    """
    c = np.asarray(color)
    if c.dtype != np.uint8 or c.ndim != 3 or c.shape[2] != 3:
        raise ValueError(f"color must be an (H, W, 3) uint8 array, got {c.dtype} {c.shape}")
    p = _as_palette(palette)
    table = np.vstack([p, _ignore_rgb(p, ignore_color)]) if decode_ignore else p
    packed = (c[..., 0].astype(np.uint32) << 16) | (c[..., 1].astype(np.uint32) << 8) | c[..., 2]
    uniq, inverse = np.unique(packed.ravel(), return_inverse=True)
    rgb = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], 1)
    idx, d2 = _nearest(rgb, table)
    labels = idx.astype(mask_dtype(max(len(p), ignore_index)))
    labels[idx == len(p)] = ignore_index
    if max_distance is not None:
        labels[d2 > max_distance**2] = ignore_index
    return labels[inverse.ravel()].reshape(c.shape[:2])


def ade20k_palette(distinct: bool = False) -> np.ndarray:
    """The standard ADE20K palette, (150, 3) uint8. ``distinct=True`` gives class 48 the lattice
    colour farthest from the others (and from black) so that every class round-trips — at the
    cost of differing from what pretrained ADE20K seg-ControlNets saw."""
    p = np.array(_ADE20K, np.uint8).reshape(150, 3)
    if distinct:
        others = np.vstack([np.delete(p, _ADE20K_DUPLICATE, 0), [[0, 0, 0]]])
        p[_ADE20K_DUPLICATE] = _farthest_lattice_colour(others)
    return p


def voc_palette(n: int = 21) -> np.ndarray:
    """The PASCAL VOC palette: bits 0, 1, 2 of the id fill the high bits of R, G, B in turn."""
    ids = np.arange(n)
    p = np.zeros((n, 3), np.uint8)
    for j in range(8):
        for ch in range(3):
            p[:, ch] |= (((ids >> (3 * j + ch)) & 1) << (7 - j)).astype(np.uint8)
    return p


@functools.lru_cache(maxsize=32)
def _auto(n: int, seed: int) -> np.ndarray:
    lattice = _lattice()
    cols = [np.ascontiguousarray(lattice[:, ch], dtype=np.float32) for ch in range(3)]
    d2 = np.full(len(lattice), np.inf, np.float32)
    acc, tmp = np.empty_like(d2), np.empty_like(d2)
    k = 0 if seed == 0 else int(np.random.default_rng(seed).integers(len(lattice)))
    chosen = []
    for _ in range(n):  # greedy farthest-point sampling: a 2-approximation of max-min distance
        chosen.append(k)
        acc.fill(0.0)
        for col in cols:  # in place: this loop runs n times over 140k colours
            np.subtract(col, col[k], out=tmp)
            acc += np.square(tmp, out=tmp)
        np.minimum(d2, acc, out=d2)
        k = int(d2.argmax())
    out = lattice[chosen]
    out.flags.writeable = False
    return out


def auto_palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` colours spread to keep the smallest pairwise distance large (farthest-point
    sampling over a 52^3 RGB lattice), so nearest-colour decoding tolerates the most noise.
    Deterministic: seed 0 starts from black, other seeds from a seeded lattice point."""
    if not 1 <= n <= len(_lattice()):
        raise ValueError(f"auto_palette supports 1..{len(_lattice())} colours, got {n}")
    return _auto(int(n), int(seed)).copy()


PALETTE_NAMES = ("ade20k", "ade20k-distinct", "voc", "auto")


def palette_by_name(name: str, num_classes: int) -> np.ndarray:
    """Palette for a config value: ``ade20k`` (at most 150 classes), ``ade20k-distinct``,
    ``voc``, ``auto``."""
    if name in ("ade20k", "ade20k-distinct"):
        if not 1 <= num_classes <= 150:
            raise ValueError(f"palette {name!r} has 150 colours, asked for {num_classes}")
        return ade20k_palette(distinct=name == "ade20k-distinct")[:num_classes]
    if name == "voc":
        return voc_palette(num_classes)
    if name == "auto":
        return auto_palette(num_classes)
    raise ValueError(f"unknown palette {name!r}; choose one of {PALETTE_NAMES}")
