"""Mask <-> colour-map conversion: exact round trips, noise tolerance, the palettes."""

from __future__ import annotations

import numpy as np
import pytest

from actors.colormap import (
    PALETTE_NAMES,
    ade20k_palette,
    auto_palette,
    color_to_mask,
    default_ignore_color,
    mask_to_color,
    min_pairwise_distance,
    palette_by_name,
    voc_palette,
)
from core.schema import IGNORE_INDEX

ADE20K_FIRST = [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3]]
VOC_FIRST = [
    [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
    [0, 0, 128], [128, 0, 128], [0, 128, 128], [128, 128, 128],
    [64, 0, 0], [192, 0, 0], [64, 128, 0],
]  # fmt: skip


def random_mask(num_classes: int, shape=(64, 48), seed: int = 0, exclude=()) -> np.ndarray:
    """Every class id present where the mask is large enough, plus ~5 % ignore pixels."""
    rng = np.random.default_rng(seed)
    ids = np.setdiff1d(np.arange(num_classes), [IGNORE_INDEX, *exclude])
    mask = rng.choice(ids, size=shape).astype(np.uint8 if num_classes <= 255 else np.uint16)
    mask[rng.random(shape) < 0.05] = IGNORE_INDEX
    return mask


def blocky_colour_map(palette: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 mask of 8x8 blocks (class regions, like a real map) and its colour map."""
    mask = np.random.default_rng(seed).integers(0, len(palette), (32, 32)).astype(np.uint8)
    mask = mask.repeat(8, 0).repeat(8, 1)
    return mask, mask_to_color(mask, palette)


def noisy_accuracy(palette: np.ndarray, sigma: float = 8.0, seed: int = 0) -> float:
    mask, colour = blocky_colour_map(palette, seed)
    noise = np.random.default_rng(seed + 1).normal(0.0, sigma, colour.shape)
    noisy = np.clip(colour + noise, 0, 255).round().astype(np.uint8)
    return float((color_to_mask(noisy, palette) == mask).mean())


@pytest.mark.parametrize(
    "palette",
    [
        voc_palette(21),
        voc_palette(256)[:200],
        auto_palette(2),
        auto_palette(21),
        auto_palette(150),
        auto_palette(300),
        ade20k_palette(distinct=True),
    ],
    ids=["voc21", "voc200", "auto2", "auto21", "auto150", "auto300", "ade20k-distinct"],
)
def test_round_trip_is_exact_including_ignore(palette):
    mask = random_mask(len(palette))
    colour = mask_to_color(mask, palette)
    assert colour.shape == (*mask.shape, 3) and colour.dtype == np.uint8
    assert (colour[mask == IGNORE_INDEX] == default_ignore_color(palette)).all()
    back = color_to_mask(colour, palette)
    assert back.dtype == (np.uint8 if len(palette) <= 255 else np.uint16)
    np.testing.assert_array_equal(back, mask)


def test_standard_ade20k_round_trips_except_its_repeated_colour():
    palette = ade20k_palette()
    mask = random_mask(150, exclude=[48])
    np.testing.assert_array_equal(color_to_mask(mask_to_color(mask, palette), palette), mask)
    # Classes 6 (road) and 48 (skyscraper) share (140, 140, 140): decoding gives the lower id.
    both = np.array([[6, 48]], np.uint8)
    np.testing.assert_array_equal(color_to_mask(mask_to_color(both, palette), palette), [[6, 6]])


def test_noise_sigma8_auto_palette_decodes_99_percent_ade20k_much_less():
    auto = noisy_accuracy(auto_palette(150))
    ade = noisy_accuracy(ade20k_palette())
    print(f"sigma=8, 150 classes: auto palette {auto:.4f}, ADE20K palette {ade:.4f}")
    assert auto >= 0.99
    # ADE20K has many colours 10 apart (e.g. (0, 255, 10) vs (0, 255, 20)): ~61 % measured.
    assert 0.5 <= ade <= 0.75
    assert noisy_accuracy(voc_palette(21)) >= 0.999


def test_voc_palette_is_the_bitwise_standard():
    np.testing.assert_array_equal(voc_palette(21)[: len(VOC_FIRST)], VOC_FIRST)
    np.testing.assert_array_equal(voc_palette(21)[20], [0, 64, 128])  # tvmonitor
    np.testing.assert_array_equal(voc_palette(256)[255], [224, 224, 192])  # VOC's boundary
    np.testing.assert_array_equal(voc_palette(256)[:21], voc_palette(21))
    assert voc_palette().dtype == np.uint8 and min_pairwise_distance(voc_palette()) == 64.0


def test_ade20k_palette_known_entries_and_its_one_repeat():
    palette = ade20k_palette()
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[:5], ADE20K_FIRST)
    np.testing.assert_array_equal(palette[-1], [92, 0, 255])
    colours, counts = np.unique(palette, axis=0, return_counts=True)
    assert len(colours) == 149 and colours[counts > 1].tolist() == [[140, 140, 140]]
    assert min_pairwise_distance(palette) == 0.0
    distinct = ade20k_palette(distinct=True)
    assert len(np.unique(distinct, axis=0)) == 150
    assert (distinct != palette).any(1).nonzero()[0].tolist() == [48]
    # Its closest pair is then (4, 250, 7) vs (0, 255, 10), classes 9 and 98.
    assert min_pairwise_distance(distinct) == pytest.approx(np.sqrt(50))


@pytest.mark.parametrize("n", [2, 21, 150, 300])
def test_auto_palette_spreads_colours_deterministically(n):
    palette = auto_palette(n)
    assert palette.shape == (n, 3) and palette.dtype == np.uint8
    assert len(np.unique(palette, axis=0)) == n
    np.testing.assert_array_equal(palette, auto_palette(n))
    # Greedy farthest points over the cube, from black: measured 441.7, 115.5, 47.2, 36.7.
    expected_min = {2: 441.0, 21: 110.0, 150: 45.0, 300: 35.0}[n]
    assert min_pairwise_distance(palette) >= expected_min
    assert palette[0].tolist() == [0, 0, 0] and [255, 255, 255] in palette.tolist()
    seeded = auto_palette(n, seed=1)
    assert not np.array_equal(seeded, palette)
    if n > 2:  # another start point spreads about as well
        assert min_pairwise_distance(seeded) >= 0.9 * expected_min
    palette[0] = 7  # a copy: callers cannot corrupt the cache
    assert auto_palette(n)[0].tolist() == [0, 0, 0]


def test_auto_palette_beats_ade20k_separation():
    auto = min_pairwise_distance(auto_palette(150))
    assert auto > 5 * min_pairwise_distance(ade20k_palette(distinct=True))
    assert auto > min_pairwise_distance(ade20k_palette()) == 0.0


def test_default_ignore_colours_are_off_palette_and_far():
    assert default_ignore_color(ade20k_palette()) == (0, 0, 0)
    assert default_ignore_color(voc_palette(21)) == (224, 224, 192)
    for palette in (auto_palette(150), auto_palette(300), voc_palette(256)[:200]):
        ignore = np.array(default_ignore_color(palette), np.float32)
        nearest = np.sqrt(((palette.astype(np.float32) - ignore) ** 2).sum(1).min())
        assert nearest >= 0.5 * min_pairwise_distance(palette)


def test_bad_class_ids_are_named():
    mask = np.array([[0, 149, 150], [IGNORE_INDEX, 200, 150]], np.uint8)
    with pytest.raises(ValueError, match=r"\[150, 200\]"):
        mask_to_color(mask, ade20k_palette())
    with pytest.raises(ValueError, match=r"\[-3\]"):
        mask_to_color(np.array([[1, -3]], np.int32), voc_palette())
    with pytest.raises(TypeError):
        mask_to_color(np.zeros((2, 2), np.float32), voc_palette())
    with pytest.raises(ValueError, match="also a class colour"):
        mask_to_color(mask[:1, :2], ade20k_palette(), ignore_color=(120, 120, 120))
    with pytest.raises(ValueError, match="uint8"):
        color_to_mask(np.zeros((2, 2, 3), np.float32), voc_palette())


def test_explicit_ignore_colour_and_decoding_options():
    palette = voc_palette(21)
    mask = np.array([[0, 15, IGNORE_INDEX]], np.uint8)
    colour = mask_to_color(mask, palette, ignore_color=(255, 255, 255))
    assert colour[0, 2].tolist() == [255, 255, 255]
    back = color_to_mask(colour, palette, ignore_color=(255, 255, 255))
    np.testing.assert_array_equal(back, mask)
    # Without the ignore entry, white falls to its nearest class, (192, 128, 128) = person.
    no_ignore = color_to_mask(colour, palette, decode_ignore=False)
    assert no_ignore.tolist() == [[0, 15, 15]]
    # Off-palette pixels become ignore when farther than max_distance from every entry.
    odd = np.array([[[10, 0, 0], [60, 200, 60]]], np.uint8)
    assert color_to_mask(odd, palette, max_distance=20).tolist() == [[0, IGNORE_INDEX]]
    # A large ignore index (uint16 masks) is honoured on both sides.
    big = np.array([[3, 65535]], np.uint16)
    colour = mask_to_color(big, palette, ignore_index=65535)
    back = color_to_mask(colour, palette, ignore_index=65535)
    assert back.dtype == np.uint16 and back.tolist() == [[3, 65535]]


def test_palette_by_name():
    assert set(PALETTE_NAMES) == {"ade20k", "ade20k-distinct", "voc", "auto"}
    np.testing.assert_array_equal(palette_by_name("ade20k", 150), ade20k_palette())
    np.testing.assert_array_equal(palette_by_name("ade20k", 10), ade20k_palette()[:10])
    np.testing.assert_array_equal(palette_by_name("voc", 21), voc_palette(21))
    np.testing.assert_array_equal(palette_by_name("auto", 7), auto_palette(7))
    assert len(np.unique(palette_by_name("ade20k-distinct", 150), axis=0)) == 150
    with pytest.raises(ValueError, match="150"):
        palette_by_name("ade20k", 151)
    with pytest.raises(ValueError, match="unknown palette"):
        palette_by_name("cityscapes", 19)
