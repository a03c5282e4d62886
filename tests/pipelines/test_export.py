"""`segfactory export`: every format round-trips (segfactory's own source readers, pycocotools,
datasets.load_dataset) with identical masks; bad input exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_dataset import CLASSES, write_dataset
from PIL import Image

from core import schema as S
from pipelines.export.writers import file_id, split_of
from segfactory.cli import main

VAL = 0.3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "synthetic"
    return root, write_dataset(root)


def _export(dataset_root, fmt, out) -> None:
    assert main(["export", str(dataset_root), "--format", fmt, str(out), "--val-fraction", str(VAL)]) == 0


def _read_back(out, fmt: str, split: str) -> dict[str, np.ndarray]:
    from pipelines.source_index import index_source

    index = index_source(out, fmt, split=split)
    assert index.classes == CLASSES
    return {row[S.SOURCE_ID]: index.load(row)[1] for row in index.rows}


@pytest.mark.ray
def test_folder_formats_read_back_by_segfactory_readers(ray_local, dataset, tmp_path):
    root, masks = dataset
    expect = {s: {file_id(k): v for k, v in masks.items() if split_of(k, VAL) == s} for s in ("train", "val")}
    assert expect["train"] and expect["val"]
    for fmt in ("voc", "ade20k", "folder"):
        _export(root, fmt, tmp_path / fmt)
        for split in ("train", "val"):
            got = _read_back(tmp_path / fmt, fmt, split)
            assert got.keys() == expect[split].keys(), (fmt, split)
            for sid, mask in expect[split].items():
                np.testing.assert_array_equal(got[sid], mask, err_msg=f"{fmt} {sid}")
    voc = Image.open(next((tmp_path / "voc" / "SegmentationClass").iterdir()))
    assert voc.mode == "P" and voc.getpalette()[3:6] == [40, 215, 20]  # the dataset's palette
    captions = (tmp_path / "voc" / "captions.jsonl").read_text().splitlines()
    assert len(captions) == len(masks) and json.loads(captions[0])["caption"].startswith("caption")
    _export(root, "cityscapes", tmp_path / "cs")
    for sid, mask in expect["val"].items():
        label = tmp_path / "cs" / "gtFine" / "val" / "segfactory" / f"{sid}_gtFine_labelTrainIds.png"
        np.testing.assert_array_equal(np.array(Image.open(label)), mask)
        assert (tmp_path / "cs" / "leftImg8bit" / "val" / "segfactory" / f"{sid}_leftImg8bit.png").is_file()


@pytest.mark.ray
def test_coco_and_hf_round_trip(ray_local, dataset, tmp_path):
    import datasets
    from pycocotools.coco import COCO

    root, masks = dataset
    _export(root, "coco", tmp_path / "coco")
    seen = 0
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "coco" / "annotations" / f"semantic_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
        for img in coco.loadImgs(coco.getImgIds()):
            decoded = np.full((img["height"], img["width"]), S.IGNORE_INDEX, np.uint8)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                decoded[coco.annToMask(ann) == 1] = ann["category_id"] - 1
            np.testing.assert_array_equal(decoded, masks[img["sample_id"]])
            assert split_of(img["sample_id"], VAL) == split and (tmp_path / "coco" / "images" / img["file_name"]).is_file()
            seen += 1
    assert seen == len(masks)

    _export(root, "hf", tmp_path / "hf")
    loaded = datasets.load_dataset(str(tmp_path / "hf"))
    assert set(loaded) == {"train", "validation"}
    assert loaded["train"].features["classes"].feature.names == CLASSES
    for split in loaded.values():
        for row in split:
            np.testing.assert_array_equal(np.array(row["annotation"]), masks[row["sample_id"]])
            present = sorted(set(np.unique(masks[row["sample_id"]]).tolist()) - {S.IGNORE_INDEX})
            assert row["classes"] == present
    assert sum(len(s) for s in loaded.values()) == len(masks)
    assert "config hash `abc`" in (tmp_path / "hf" / "README.md").read_text()


def test_bad_input_exits_2_with_one_line(dataset, tmp_path, capsys):
    root, _ = dataset
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert main(["export", str(root), "--format", "voc", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'full'}: not empty; pass --overwrite to replace what is there"
    assert main(["export", str(tmp_path / "nothing"), "--format", "coco", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err
    (tmp_path / "nomani" / "shards").mkdir(parents=True)
    assert main(["export", str(tmp_path / "nomani"), "--format", "coco", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    many = tmp_path / "many"
    write_dataset(many, classes=[f"c{i}" for i in range(300)], n_shards=1, rows=1)
    assert main(["export", str(many), "--format", "voc", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--format voc: the dataset has 300 classes" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_export_between_object_store_uris(ray_local, dataset, s3_bucket):
    """DATASET and OUT both on S3 (moto's server): workers read and write through pyarrow.fs."""
    from pyarrow import fs

    root, masks = dataset
    fs.copy_files(str(root), f"{s3_bucket[5:]}/synthetic", source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=fs.FileSystem.from_uri(s3_bucket)[0])
    assert main(["export", f"{s3_bucket}/synthetic", "--format", "voc", f"{s3_bucket}/voc"]) == 0
    got = _read_back(f"{s3_bucket}/voc", "voc", "train")
    assert got.keys() == {file_id(k) for k in masks}
    for sid, mask in masks.items():
        np.testing.assert_array_equal(got[file_id(sid)], mask)
    assert main(["export", f"{s3_bucket}/synthetic", "--format", "voc", f"{s3_bucket}/voc"]) == 2  # not empty
