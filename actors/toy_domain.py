"""The toy domain: textured shapes on textured backgrounds, drawn procedurally.

It stands in for the real world so the whole factory (generation, training, scaling laws)
gives meaningful results on a CPU in minutes. Each class has a characteristic shape, texture
family and hue range, with overlap between classes, so segmenting it is learnable but not
trivial. ``gap`` in [0, 1] moves the rendering distribution away from the "real" one (gap=0),
which is how the toy models a synthetic-vs-real domain gap. numpy only, no per-pixel loops.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "star", "ring")
TEXTURES: tuple[str, ...] = ("flat", "gradient", "noise", "stripes", "checker", "dots", "waves")


@dataclass(frozen=True)
class Profile:
    """Appearance distribution of one class: why a pixel looks like its class."""

    hue: float  # centre of the hue range (0..1, wraps)
    hue_spread: float  # half-width of the hue range
    sat: tuple[float, float]
    val: tuple[float, float]
    texture: str  # the characteristic texture family
    p_texture: float  # probability of that family; otherwise any family
    freq: tuple[float, float]  # texture frequency, cycles per image side


PROFILES: dict[str, Profile] = {
    "background": Profile(0.5, 0.5, (0.05, 0.35), (0.35, 0.8), "noise", 0.55, (2.0, 5.0)),
    "circle": Profile(0.00, 0.10, (0.5, 0.9), (0.6, 0.95), "stripes", 0.6, (5.0, 10.0)),
    "square": Profile(0.15, 0.09, (0.5, 0.9), (0.6, 0.95), "checker", 0.6, (4.0, 8.0)),
    "triangle": Profile(0.33, 0.10, (0.4, 0.85), (0.5, 0.9), "dots", 0.6, (6.0, 12.0)),
    "star": Profile(0.55, 0.10, (0.45, 0.9), (0.55, 0.95), "waves", 0.6, (3.0, 7.0)),
    "ring": Profile(0.78, 0.11, (0.4, 0.85), (0.5, 0.9), "gradient", 0.6, (1.0, 3.0)),
}

# Words a caption may use for each class (plurals are handled by stripping a trailing s/es).
SYNONYMS: dict[str, str] = {
    "background": "background", "backdrop": "background", "bg": "background",
    "circle": "circle", "disc": "circle", "disk": "circle", "ball": "circle",
    "ellipse": "circle", "oval": "circle",
    "square": "square", "box": "square", "rectangle": "square", "block": "square",
    "tile": "square",
    "triangle": "triangle", "pyramid": "triangle", "wedge": "triangle",
    "star": "star", "pentagram": "star", "starfish": "star",
    "ring": "ring", "donut": "ring", "doughnut": "ring", "annulus": "ring", "hoop": "ring",
    "loop": "ring",
}  # fmt: skip


def profile_for(class_id: int) -> Profile:
    """Profile of a toy class; ids outside the toy list (e.g. VOC ids) get a stable one."""
    if 0 <= class_id < len(CLASSES):
        return PROFILES[CLASSES[class_id]]
    if class_id == 255:  # ignore pixels are drawn like background
        return PROFILES["background"]
    hue = (class_id * 0.61803398875) % 1.0
    return Profile(hue, 0.08, (0.4, 0.85), (0.5, 0.9), TEXTURES[class_id % len(TEXTURES)], 0.6,
                   (3.0, 9.0))


# --- layout -------------------------------------------------------------------------------


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                theta: float, aux: float) -> np.ndarray:
    """Boolean mask of one shape of circumradius ``r`` (pixels) rotated by ``theta``."""
    dy, dx = yy - cy, xx - cx
    if kind == "circle":  # a slightly elliptic disc, aux sets the aspect ratio
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        return (u / r) ** 2 + (v / (r * (0.8 + 0.2 * aux))) ** 2 <= 1.0
    if kind == "square":
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        half = r * 0.75
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":  # intersection of three half-planes at inradius r/2
        inside = np.ones(yy.shape, dtype=bool)
        for k in range(3):
            a = theta + k * 2.0 * np.pi / 3.0
            inside &= dx * np.cos(a) + dy * np.sin(a) <= r / 2.0
        return inside
    dist = np.hypot(dx, dy)
    if kind == "star":  # five points with straight edges; inner radius 0.4-0.55 r
        sector = 2.0 * np.pi / 5.0
        t = (np.arctan2(dy, dx) - theta) % sector
        phi = np.minimum(t, sector - t)  # folded onto [0, pi/5]: outer point at 0
        inner = r * (0.4 + 0.15 * aux) * np.array([np.cos(sector / 2), np.sin(sector / 2)])
        normal = np.array([inner[1], r - inner[0]])  # perpendicular to the edge, outwards
        normal /= np.hypot(*normal)
        reach = r * normal[0]  # distance from the centre to the edge's line
        return dist * np.cos(phi - np.arctan2(normal[1], normal[0])) <= reach
    if kind == "ring":
        return (dist <= r) & (dist >= r * (0.45 + 0.2 * aux))
    raise ValueError(f"unknown toy shape {kind!r}")


def sample_layout(rng: np.random.Generator, class_names: Sequence[str], height: int,
                  width: int) -> np.ndarray:
    """A uint8 (H, W) mask with 1-4 shapes; every named class stays visible.

    Names outside the toy classes (and "background", always there) are ignored; with no
    usable name, 1-2 random classes are drawn so the mask is never empty.
    """
    fg = [n for n in dict.fromkeys(class_names) if n in CLASSES and n != "background"]
    if not fg:
        k = int(rng.integers(1, 3))
        fg = [CLASSES[i] for i in sorted(rng.choice(np.arange(1, len(CLASSES)), k, replace=False))]
    n = max(len(fg), int(rng.integers(1, 5)))
    kinds = fg + [fg[i] for i in rng.integers(0, len(fg), n - len(fg))]
    side = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)

    def draw(kind: str, scale: float = 1.0) -> np.ndarray:
        r = rng.uniform(0.12, 0.3) * side * scale
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        theta, aux = rng.uniform(0, 2 * np.pi), rng.random()
        return _shape_mask(kind, yy, xx, cy, cx, r, theta, aux)

    shapes = [(kind, draw(kind)) for kind in kinds]
    shapes.sort(key=lambda s: -int(s[1].sum()))  # big first, so small ones stay on top
    for kind, sel in shapes:
        mask[sel] = CLASSES.index(kind)
    min_pixels = max(8, int(0.004 * height * width))
    for attempt in range(20):  # redraw, smaller, any class an occlusion has hidden
        missing = [k for k in fg if (mask == CLASSES.index(k)).sum() < min_pixels]
        if not missing:
            break
        for kind in missing:
            mask[draw(kind, 0.8 ** (attempt + 1))] = CLASSES.index(kind)
    return mask


# --- rendering ----------------------------------------------------------------------------


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to (H, W): smooth value noise without scipy."""
    gy = np.linspace(0, grid.shape[0] - 1, height, dtype=np.float32)
    gx = np.linspace(0, grid.shape[1] - 1, width, dtype=np.float32)
    y0 = np.minimum(gy.astype(int), grid.shape[0] - 2)
    x0 = np.minimum(gx.astype(int), grid.shape[1] - 2)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture(kind: str, v: np.ndarray, u: np.ndarray, freq: float, theta: float, phase: float,
             rng: np.random.Generator) -> np.ndarray:
    """A texture field in [0, 1] over the whole image; (v, u) are coordinates in image sides."""
    a = u * np.cos(theta) + v * np.sin(theta)
    b = -u * np.sin(theta) + v * np.cos(theta)
    grid = rng.random((32, 32)).astype(np.float32)  # always drawn: same rng use for any gap
    two_pi_f = 2.0 * np.pi * freq
    if kind == "flat":
        return np.zeros_like(u)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * np.sin(np.pi * freq * a + phase), 0, 1)
    if kind == "noise":
        k = min(32, max(2, int(round(freq)) + 1))
        return _upsample(grid[:k, :k], u.shape[0], u.shape[1])
    if kind == "stripes":
        return np.clip(0.5 + 2.0 * np.sin(two_pi_f * a + phase), 0, 1)
    if kind == "checker":
        return (np.sin(two_pi_f * a + phase) * np.sin(two_pi_f * b + phase) > 0).astype(np.float32)
    if kind == "dots":
        fa, fb = (a * freq + phase) % 1.0 - 0.5, (b * freq + phase) % 1.0 - 0.5
        return (fa**2 + fb**2 < 0.09).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(two_pi_f * a + 2.5 * np.sin(two_pi_f * 0.5 * b) + phase)
    raise ValueError(f"unknown texture {kind!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)),
                    dtype=np.float32) * 255.0


def render_image(mask: np.ndarray, rng: np.random.Generator, gap: float = 0.0) -> np.ndarray:
    """A uint8 (H, W, 3) image whose regions follow ``mask``'s classes.

    ``gap`` (0..1) shifts hues by +0.12*gap, scales texture frequencies by (1 + gap), lowers
    saturation by up to 35 %, makes the class texture less typical and adds pixel noise. The
    rng is consumed identically for every gap, so one seed gives the same scene restyled.
    """
    gap = float(np.clip(gap, 0.0, 1.0))
    h, w = mask.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    v, u = v / max(h, w), u / max(h, w)
    img = np.zeros((h, w, 3), dtype=np.float32)
    for cid in np.unique(mask):
        p = profile_for(int(cid))
        hue = p.hue + rng.uniform(-p.hue_spread, p.hue_spread) + 0.12 * gap
        sat = rng.uniform(*p.sat) * (1.0 - 0.35 * gap)
        val = rng.uniform(*p.val)
        u_tex, other = rng.random(), int(rng.integers(len(TEXTURES)))
        kind = p.texture if u_tex < p.p_texture * (1.0 - 0.5 * gap) else TEXTURES[other]
        freq = rng.uniform(*p.freq) * (1.0 + gap)
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        c1 = _hsv(hue, sat, val)
        c2 = _hsv(hue + rng.uniform(-0.06, 0.06), sat * rng.uniform(0.5, 1.0),
                  val * rng.uniform(0.35, 0.7))
        t = _texture(kind, v, u, freq, theta, phase, rng)
        sel = mask == cid
        img[sel] = c1 + (c2 - c1) * t[sel][:, None]
    # Lighting and sensor noise, shared by both domains (the noise grows with the gap).
    light_dir = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.05, 0.15) * (u * np.cos(light_dir) + v * np.sin(light_dir) - 0.5)
    img *= light[..., None]
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * (3.0 + 15.0 * gap)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------


def caption_for(mask: np.ndarray) -> str:
    """A caption naming the classes in ``mask``, e.g. 'a photo of a circle and background'."""
    present = [int(c) for c in np.unique(mask) if 0 <= c < len(CLASSES)]
    items = [f"a {CLASSES[c]}" for c in present if c != 0]
    if 0 in present:
        items.append("background")
    if not items:
        return "a photo"
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"a photo of {text}"


def _singular(word: str) -> str:
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("xes", "x"), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in SYNONYMS:
            return word[: -len(suffix)] + repl
    return word


def class_words_in(caption: str) -> list[str]:
    """Toy class names a caption mentions, in order of first mention (plurals, synonyms ok)."""
    found: dict[str, None] = {}
    for word in re.findall(r"[a-z]+", caption.lower()):
        name = SYNONYMS.get(word) or SYNONYMS.get(_singular(word))
        if name:
            found.setdefault(name)
    return list(found)
