"""source.format=coco on a tiny COCO layout written here: panoptic JSON + PNGs → semantic
masks (rows with a category missing from the classes quarantined with a reason, the rest kept),
and COCO-Stuff 164k's PNG layout; the same index feeds training and generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.source_index import index_source

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 18, "name": "dog", "isthing": 1},
              {"id": 184, "name": "sky-other-merged", "isthing": 0}]


def _rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids → COCO panoptic RGB (id = R + 256 G + 256^2 B)."""
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)


def write_coco_panoptic(root: Path, split: str = "val2017") -> Path:
    """Three 32x48 images: a person + a dog; a dog only; a person under sky (sky: a stuff class)."""
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / f"panoptic_{split}").mkdir(parents=True)
    anns = []
    layouts = {1: [(1, 1), (300, 18)], 2: [(7, 18)], 3: [(5, 1), (70000, 184)]}  # segment id, category
    for image_id, segs in layouts.items():
        ids = np.zeros((32, 48), np.int64)  # 0 = void
        for k, (seg, _) in enumerate(segs):
            ids[4 + 12 * k:14 + 12 * k, 4:40] = seg
        name = f"{image_id:012d}"
        Image.fromarray(np.full((32, 48, 3), 40 * image_id, np.uint8)).save(root / "images" / split / f"{name}.jpg")
        Image.fromarray(_rgb(ids)).save(root / "annotations" / f"panoptic_{split}" / f"{name}.png")
        anns.append({"image_id": image_id, "file_name": f"{name}.png",
                     "segments_info": [{"id": seg, "category_id": cat, "iscrowd": 0} for seg, cat in segs]})
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in layouts], "annotations": anns, "categories": CATEGORIES}))
    return root


def test_panoptic_to_semantic_keeps_known_rows_and_quarantines_the_rest(tmp_path):
    root = write_coco_panoptic(tmp_path / "coco")
    idx = index_source(root, "coco", split="val", classes=["person", "dog"])
    assert [r["source_id"] for r in idx.rows] == ["000000000001", "000000000002"]
    assert len(idx.problems) == 1
    sid, where, reason = idx.problems[0]
    assert sid == "000000000003" and where.endswith("000000000003.png")
    assert reason == "coco_category_not_in_classes: sky-other-merged not in source.classes"
    image, mask = idx.load(idx.rows[0])
    assert image.shape == (32, 48, 3) and mask.shape == (32, 48)
    assert (mask[4:14, 4:40] == 0).all() and (mask[16:26, 4:40] == 1).all()  # person, dog
    assert (mask[:4] == 255).all() and set(np.unique(mask).tolist()) == {0, 1, 255}  # void -> ignore
    # without a class list: every panoptic category, in the file's order; nothing quarantined
    every = index_source(root, "coco", split="val")
    assert every.classes == ["person", "dog", "sky-other-merged"] and len(every.rows) == 3 and not every.problems
    _, sky = every.load(every.rows[2])
    assert (sky[16:26, 4:40] == 2).all() and (sky[4:14, 4:40] == 0).all()


def test_coco_stuff_164k_png_layout(tmp_path):
    root = tmp_path / "stuff"
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(root / "images" / split / f"{i:012d}.jpg")
            m = np.full((16, 16), 170, np.uint8)
            m[:4] = 255
            Image.fromarray(m).save(root / "annotations" / split / f"{i:012d}_labelTrainIds.png")
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(171)))
    idx = index_source(root, "coco", split="train")
    assert [r["source_id"] for r in idx.rows] == ["000000000000", "000000000001"] and len(idx.classes) == 171
    _, mask = idx.load(idx.rows[1])
    assert set(np.unique(mask).tolist()) == {170, 255}


def test_training_and_generation_read_the_coco_source(tmp_path):
    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.generate import index_rows
    from segfactory.configs import resolve_config
    from training.config import TrainConfig
    from training.data import index_inputs

    root = write_coco_panoptic(tmp_path / "coco", "train2017")
    write_coco_panoptic(tmp_path / "val", "val2017")
    (root / "annotations" / "panoptic_val2017.json").write_text((tmp_path / "val/annotations/panoptic_val2017.json").read_text())
    (root / "images" / "val2017").symlink_to(tmp_path / "val/images/val2017")
    (root / "annotations" / "panoptic_val2017").symlink_to(tmp_path / "val/annotations/panoptic_val2017")
    cfg = TrainConfig(real={"path": str(root), "format": "coco", "classes": ["person", "dog"]})
    src = index_inputs(cfg)
    assert src.classes == ["person", "dog"] and len(src.real_rows) == 2 and len(src.val_rows) == 2
    gcfg = load_config(GenerateConfig, str(resolve_config("seggen-toy")), [f"source.path={root}", "source.format=coco", "source.split=train",
                                                      "source.classes=[person,dog]", f"output.path={tmp_path / 'out'}"])
    index, rows = index_rows(gcfg)
    assert rows.num_rows == 2 and [p[2].split(":")[0] for p in index.problems] == ["coco_category_not_in_classes"]
    with pytest.raises(Exception, match="no usable rows"):
        index_rows(load_config(GenerateConfig, str(resolve_config("seggen-toy")), [f"source.path={root}", "source.format=coco",
                                                               "source.classes=[cat]", f"output.path={tmp_path / 'o2'}"]))


def test_a_coco_root_one_level_off_is_named_before_ray(tmp_path):
    from pipelines.inputs import source_problems

    root = write_coco_panoptic(tmp_path / "coco")
    assert source_problems(str(root), "coco") == []
    problems = source_problems(str(root / "images"), "coco")
    assert problems and "did you mean" in problems[0] and str(root) in problems[0]
