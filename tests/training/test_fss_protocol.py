"""Few-shot episodes (segfactory evaluate --protocol fss): the literature's fold splits,
seeded episodes, mIoU / FB-IoU, the DINOv2 prototype baseline and a plugged-in model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.fss import binary, class_presence, draw_episodes, fold_classes, score

VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def test_fold_splits_are_the_literatures():
    assert fold_classes("pascal-5i", 0) == [1, 2, 3, 4, 5] and fold_classes("pascal-5i", 3) == [16, 17, 18, 19, 20]
    assert fold_classes("coco-20i", 0)[:3] == [1, 5, 9] and fold_classes("coco-20i", 3)[-1] == 80
    assert sorted(c for f in range(4) for c in fold_classes("coco-20i", f)) == list(range(1, 81))


def test_episodes_are_seeded_and_valid():
    masks = [np.full((4, 4), c, np.uint8) for c in (1, 1, 1, 2, 2, 3, 7)]
    presence = class_presence(masks, [1, 2, 3])
    a = draw_episodes(presence, shots=1, n=50, seed=3)
    assert a == draw_episodes(presence, shots=1, n=50, seed=3) and a != draw_episodes(presence, 1, 50, 4)
    assert {e.cls for e in a} == {1, 2}  # class 3 has one image: no episode possible
    assert all(e.query not in e.support and all(masks[i][0, 0] == e.cls for i in [e.query, *e.support]) for e in a)
    assert {e.cls for e in draw_episodes(presence, shots=2, n=20, seed=0)} == {1}


def test_miou_and_fb_iou():
    true = binary(np.array([[1, 1, 0, 255]]), 1)
    assert true.tolist() == [[1, 1, 0, 255]]
    perfect = score([(1, np.array([[1, 1, 0, 1]]), true)], [1, 2])
    assert perfect["miou"] == 1.0 and perfect["fb_iou"] == 1.0  # the ignored pixel does not count
    empty = score([(1, np.zeros((1, 4), np.uint8), true)], [1])
    assert empty["miou"] == 0.0 and empty["fb_iou"] == pytest.approx((1 / 3) / 2)


class ColourMatcher:
    """A plugged-in model: the query pixels whose colour is the supports' foreground colour."""

    def __init__(self, classes):
        self.classes = classes

    def predict(self, support_images, support_masks, query_image):
        colours = {tuple(im[m == 1][0]) for im, m in zip(support_images, support_masks, strict=True) if (m == 1).any()}
        return np.isin(query_image[..., 0], [c[0] for c in colours]).astype(np.uint8)


def factory(classes):
    return ColourMatcher(classes)


def write_voc21(root, n: int = 24):
    """A VOC-layout val split: each image one or two squares of classes 1-20 (colour 10 x class)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    ids = []
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        for k, c in enumerate(((i % 20) + 1, ((i * 7) % 20) + 1)[: 1 + i % 2]):
            mask[2 + 14 * k:14 + 14 * k, 4:28] = c
        mask[0, :] = 255
        image = np.stack([mask * 10] * 3, -1).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"im{i:03d}.png")
        Image.fromarray(mask).save(root / "SegmentationClass" / f"im{i:03d}.png")
        ids.append(f"im{i:03d}")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids))
    return root


def test_cli_runs_folds_with_the_baseline_and_a_plugged_in_model(tmp_path, capsys):
    from segfactory.cli import main

    data = write_voc21(tmp_path / "voc")
    base = ["evaluate", "--protocol", "fss", "--data", str(data), "--benchmark", "pascal-5i", "--folds", "0,1",
            "--episodes", "12", "--seed", "1"]
    assert main([*base, "--fss-model", "tests.training.test_fss_protocol:factory", "--shots", "1", "--out", str(tmp_path / "oracle.json")]) == 0
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    assert [f["fold"] for f in oracle["folds"]] == [0, 1] and oracle["miou"] == 1.0 and oracle["fb_iou"] == 1.0
    assert all(f["episodes"] == 12 for f in oracle["folds"])
    assert main([*base, "--fss-model", "tiny", "--shots", "1", "--out", str(tmp_path / "tiny.json")]) == 0
    tiny = json.loads((tmp_path / "tiny.json").read_text())
    assert 0.0 <= tiny["miou"] <= 1.0 and 0.0 <= tiny["fb_iou"] <= 1.0 and tiny["miou"] < 1.0
    again = main([*base, "--fss-model", "tiny", "--shots", "1", "--out", str(tmp_path / "tiny2.json")])
    assert again == 0 and json.loads((tmp_path / "tiny2.json").read_text())["folds"] == tiny["folds"]
    out = capsys.readouterr().out
    assert "fold 0: mIoU" in out and "pascal-5i 1-shot (tiny)" in out
    # wrong class count for the benchmark: one line, exit 2
    assert main([*base[:-6], "--benchmark", "coco-20i", "--fss-model", "tiny"]) == 2
    assert "coco-20i needs 81 classes" in capsys.readouterr().err


def test_textual_inversion_k_shots_per_class_and_a_budget_per_instance():
    from training.finetune.textual_inversion import budget_iterations, select_shots

    keys = [("b", 1), ("a", 1), ("c", 1), ("a", 2), ("d", 2), ("e", 3)]
    assert select_shots(keys, 2) == [("a", 1), ("a", 2), ("b", 1), ("d", 2), ("e", 3)]
    assert select_shots(keys, None) == keys
    # 3000 updates for each of 5 instances, 1 instance per step on 1 worker: 15000 steps; 2 x 2: 3750
    assert budget_iterations(3000, 5, 1, 1, 3000) == 15000 and budget_iterations(3000, 5, 2, 2, 3000) == 3750
    assert budget_iterations(None, 5, 1, 1, 3000) == 3000
