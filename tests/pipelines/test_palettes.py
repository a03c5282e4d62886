"""ade20k-by-name: class colours from class names for ADE20K-trained control models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from actors.colormap import ade20k_palette, palette_by_name
from pipelines.config import GenerateConfig
from pipelines.palettes import ADE20K_NAMES, ade20k_by_name, ade20k_class_for, resolve_palette
from pipelines.sources import ADE20K_CLASSES, VOC_CLASSES

ADE = ade20k_palette()


def ade_color(name: str) -> list[int]:
    return ADE[ADE20K_CLASSES.index(name)].tolist()


def test_names_table_matches_the_ade20k_classes() -> None:
    names = json.loads(ADE20K_NAMES.read_text())["names"]
    assert [n[0] for n in names] == list(ADE20K_CLASSES)


def test_voc_classes_take_the_colour_of_their_ade20k_namesake(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipelines.palettes"):
        palette, matched = ade20k_by_name(VOC_CLASSES, background=0)
    colors = dict(zip(VOC_CLASSES, palette.tolist(), strict=True))
    assert colors["car"] == ade_color("car") == [0, 102, 200]  # by index it was ADE's bed
    assert colors["person"] == ade_color("person") == [150, 5, 61]
    for animal in ("dog", "cat", "bird", "horse", "cow", "sheep"):
        assert colors[animal] == ade_color("animal")
    expected = {"aeroplane": "airplane", "bicycle": "bicycle", "boat": "boat", "bottle": "bottle",
                "bus": "bus", "chair": "chair", "diningtable": "table", "motorbike": "minibike",
                "pottedplant": "plant", "sofa": "sofa", "tvmonitor": "monitor"}
    for voc, ade in expected.items():
        assert colors[voc] == ade_color(ade), voc
    # background (and ADE20K-less 'train') are black, no ADE20K class colour; the miss is logged
    assert colors["background"] == colors["train"] == [0, 0, 0]
    assert not (ADE == 0).all(1).any()
    assert matched[0] is None and matched[VOC_CLASSES.index("train")] is None
    assert any("train" in r.message for r in caplog.records)
    # by index, as before, VOC background was ADE's wall and car its bed: no longer
    assert palette_by_name("ade20k", 21)[7].tolist() == ade_color("bed") != colors["car"]


def test_ade20k_classes_map_to_themselves_and_synonyms_resolve() -> None:
    palette, matched = ade20k_by_name(ADE20K_CLASSES)
    assert matched == list(range(150))
    np.testing.assert_array_equal(palette, ADE)
    assert ade20k_class_for("television") == ADE20K_CLASSES.index("television receiver")
    assert ade20k_class_for("Automobile") == ADE20K_CLASSES.index("car")
    assert ade20k_class_for("ground") is None  # a synonym of earth and of land: ambiguous
    assert ade20k_class_for("unicorn") is None


def test_own_synonym_table(tmp_path: Path) -> None:
    table = tmp_path / "syn.json"
    table.write_text(json.dumps({"entries": [{"class": "lorry", "base": ["lorry"], "aliases": ["truck"]}]}))
    assert ade20k_class_for("lorry") is None
    assert ade20k_class_for("lorry", str(table)) == ADE20K_CLASSES.index("truck")
    got = resolve_palette("ade20k-by-name", ["bg", "lorry"], background=0, synonyms=str(table))
    assert got.tolist() == [[0, 0, 0], ade_color("truck")]
    np.testing.assert_array_equal(resolve_palette("voc", ["a", "b"]), palette_by_name("voc", 2))


def test_shipped_factory_configs_colour_by_name() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
    for name in ("factory-sd15.yaml", "factory-sdxl.yaml"):
        cfg = GenerateConfig.model_validate(yaml.safe_load((root / name).read_text()))
        assert cfg.palette == "ade20k-by-name", name
