"""pipelines.sources: tiny VOC / ADE20K / folder / Parquet / captions sources built in tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.source_index import index_source
from pipelines.sources import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    SourceError,
    caption_from_mask,
    load_pixels,
)

PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)]


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, im: Image.Image, fmt: str = "PNG") -> Path:
    """Lossless PNG content even under a .jpg name, so decoded pixels compare exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def palette_mask(ids: np.ndarray) -> Image.Image:
    im = Image.fromarray(ids.astype(np.uint8))
    im.putpalette(PALETTE)  # L -> P: the file stores indices, the palette colours differ
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def ids(index) -> list[str]:
    return [r["source_id"] for r in index.rows]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    masks = {
        "a": np.array([[0, 12, 12], [255, 15, 0]]),
        "b": np.array([[1, 1, 1], [1, 1, 255]]),
        "c": np.array([[0, 0, 0], [0, 0, 20]]),
    }
    for k, (sid, m) in enumerate(masks.items()):
        save(root / "JPEGImages" / f"{sid}.jpg", Image.fromarray(rgb(2, 3, k)))
        save(root / "SegmentationClass" / f"{sid}.png", palette_mask(m))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    (root / "captions.jsonl").write_text(
        json.dumps({"id": "a", "caption": "a dog on a sofa"}) + "\n{broken\n"
    )
    return root


def test_voc_index_captions_and_pixels(voc: Path) -> None:
    index = index_source(voc, "voc")
    assert ids(index) == ["a", "b"] and index.problems == []
    assert index.classes == list(VOC_CLASSES) and len(index.classes) == 21
    assert index.palette_hint == "voc" and index.background_index == 0
    a = index.rows[0]
    assert a == {
        "source_id": "a",
        "source_path": str(voc / "JPEGImages" / "a.jpg"),
        "source_mask_path": str(voc / "SegmentationClass" / "a.png"),
        "source_row": -1,
        "caption": "a dog on a sofa",
    }
    assert index.rows[1]["caption"] == ""
    assert Image.open(a["source_mask_path"]).mode == "P"
    image, mask = index.load(a)
    np.testing.assert_array_equal(image, rgb(2, 3, 0))
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[0, 12, 12], [255, 15, 0]])  # indices, not colours
    assert ids(index_source(voc, "voc", split="val")) == ["c"]
    (voc / "classes.txt").write_text("bg\nthing\n\n")
    assert index_source(voc, "voc").classes == ["bg", "thing"]
    assert index_source(voc, "voc", classes=["x", "y", "z"]).classes == ["x", "y", "z"]


def test_voc_split_fallback_and_problems(voc: Path) -> None:
    with pytest.raises(SourceError, match="trainval.txt"):
        index_source(voc, "voc", split="trainval")
    for f in (voc / "ImageSets" / "Segmentation").iterdir():
        f.unlink()
    (voc / "ImageSets" / "Segmentation").rmdir()
    assert ids(index_source(voc, "voc")) == ["a", "b", "c"]  # no split files: every mask
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir()
    save(voc / "JPEGImages" / "nomask.jpg", Image.fromarray(rgb(2, 3, 9)))
    (sets / "train.txt").write_text("a\nnomask\nghost\na\nb\n")
    (voc / "SegmentationClass" / "ghost.png").write_bytes(b"whatever")
    index = index_source(voc, "voc")
    assert ids(index) == ["a", "b"]
    assert sorted(index.problems) == [
        ("a", str(voc / "JPEGImages" / "a.jpg"), "duplicate_id: kept the first"),
        ("ghost", str(voc / "SegmentationClass" / "ghost.png"), "missing_image: listed but not on disk"),
        ("nomask", str(voc / "JPEGImages" / "nomask.jpg"), "missing_mask: no mask file for this image"),
    ]
    relaxed = index_source(voc, "voc", require_masks=False)  # rows come sorted by id
    assert ids(relaxed) == ["a", "b", "nomask"] and relaxed.rows[2]["source_mask_path"] == ""
    image, mask = relaxed.load(relaxed.rows[2])
    assert mask is None and image.shape == (2, 3, 3)


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    for split, sub in (("train", "training"), ("val", "validation")):
        img = Image.fromarray(rgb(4, 5, 1))
        save(root / "images" / sub / f"ADE_{split}_1.jpg", img, "JPEG")
        ann = np.array([[0, 1, 2, 150, 0]] * 4, dtype=np.uint8)
        save(root / "annotations" / sub / f"ADE_{split}_1.png", Image.fromarray(ann))
    index = index_source(root, "ade20k")
    assert ids(index) == ["ADE_train_1"] and index.palette_hint == "ade20k"
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert index.classes[:3] == ["wall", "building", "sky"] and index.classes[-1] == "flag"
    assert index.background_index is None
    image, mask = index.load(index.rows[0])
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8  # real JPEG: lossy
    np.testing.assert_array_equal(mask, [[255, 0, 1, 149, 255]] * 4)
    assert ids(index_source(root, "ade20k", split="val")) == ["ADE_val_1"]
    bad = np.array([[0, 151, 200, 1, 1]] * 4, dtype=np.uint8)
    save(root / "annotations" / "training" / "ADE_train_1.png", Image.fromarray(bad))
    with pytest.raises(SourceError, match=r"ADE_train_1\.png.*\[150, 199\]"):
        index.load(index.rows[0])
    with pytest.raises(SourceError, match="images/test"):
        index_source(root, "ade20k", split="test")


def test_folder(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    save(root / "images" / "x.png", Image.fromarray(rgb(3, 3, 1)))
    save(root / "images" / "sub" / "y.bmp", Image.fromarray(rgb(3, 3, 2)), "BMP")
    save(root / "images" / "x.webp", Image.fromarray(rgb(3, 3, 3)), "WEBP")  # same stem
    save(root / "images" / "lonely.png", Image.fromarray(rgb(3, 3, 4)))
    (root / "images" / "notes.txt").write_text("not an image")
    save(root / "masks" / "x.png", Image.fromarray(np.full((3, 3), 2, np.uint8)))
    save(root / "masks" / "sub" / "y.png", Image.fromarray(np.eye(3, dtype=np.uint8)))
    with pytest.raises(SourceError, match=r"classes\.txt"):
        index_source(root, "folder")
    index = index_source(root, "folder", classes=["road", "car", "tree"])
    assert ids(index) == ["sub/y", "x"] and index.palette_hint is None
    assert index.problems == [
        ("lonely", str(root / "images" / "lonely.png"), "missing_mask: no mask file for this image"),
        ("x", str(root / "images" / "x.webp"), "duplicate_id: kept the first"),
    ]
    (root / "classes.txt").write_text("road\ncar\n")
    index = index_source(root, "folder")
    assert index.classes == ["road", "car"]
    image, mask = index.load(index.rows[0])
    np.testing.assert_array_equal(image, rgb(3, 3, 2))
    np.testing.assert_array_equal(mask, np.eye(3))
    with pytest.raises(SourceError, match=r"x\.png.*\[2\].*num_classes=2"):
        index.load(index.rows[1])


def test_parquet_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "rejected").mkdir()
    manifest = {"classes": ["background", "cat", "dog"], "palette_hint": "voc"}
    (out / "manifest.json").write_text(json.dumps(manifest))

    def shard(path: Path, names: list[str], seed: int) -> None:
        rows = {
            "sample_id": names,
            "caption": [f"cap {n}" for n in names],
            "image": [png_bytes(Image.fromarray(rgb(2, 2, seed + i))) for i in range(len(names))],
            "mask": [png_bytes(palette_mask(np.full((2, 2), i % 3))) for i in range(len(names))],
        }
        pq.write_table(pa.table(rows), path, row_group_size=2)

    shard(out / "shards" / "part-00000.parquet", ["s/imgsyn/0", "s/imgsyn/1", "s/imgsyn/2"], 0)
    shard(out / "shards" / "part-00001.parquet", ["t/imgsyn/0", "s/imgsyn/1"], 10)
    shard(out / "rejected" / "part-00000.parquet", ["bad/imgsyn/0"], 20)
    (out / "shards" / "part-00002.parquet").write_bytes(b"PAR1 not really")
    index = index_source(out, "parquet")
    assert ids(index) == ["s/imgsyn/0", "s/imgsyn/1", "s/imgsyn/2", "t/imgsyn/0"]
    assert index.classes == ["background", "cat", "dog"] and index.palette_hint == "voc"
    assert index.background_index == 0
    p1 = str(out / "shards" / "part-00001.parquet")
    assert index.problems[1] == ("s/imgsyn/1", p1, "duplicate_id: kept the first")  # duplicates last
    assert index.problems[0][1].endswith("part-00002.parquet")
    assert index.problems[0][2].startswith("corrupt_parquet: unreadable parquet")
    r = index.rows[2]  # third row: second row group of the first file
    assert (r["source_row"], r["caption"]) == (2, "cap s/imgsyn/2")
    image, mask = index.load(r)
    np.testing.assert_array_equal(image, rgb(2, 2, 2))
    np.testing.assert_array_equal(mask, np.full((2, 2), 2))
    image, _ = index.load(index.rows[3])
    np.testing.assert_array_equal(image, rgb(2, 2, 10))
    same = index_source(out / "shards" / "part-00001.parquet", "parquet")  # manifest above
    assert ids(same) == ["s/imgsyn/1", "t/imgsyn/0"] and same.classes == index.classes
    with pytest.raises(SourceError, match="row 7"):
        load_pixels({**r, "source_row": 7}, "parquet", 3)


def test_captions_source(tmp_path: Path) -> None:
    lines = [
        {"id": "c1", "caption": "a cat on a mat"},
        {"id": 2, "caption": "two dogs"},
        {"id": "c1", "caption": "again"},
        {"id": "c3", "caption": "  "},
        {"caption": "no id"},
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n")
    index = index_source(tmp_path, "captions")
    assert [(r["source_id"], r["caption"], r["source_path"]) for r in index.rows] == [
        ("2", "two dogs", ""),
        ("c1", "a cat on a mat", ""),
    ]
    assert index.classes == [] and index_source(path, "captions").rows == index.rows
    assert [p[::2] for p in index.problems] == [
        ("c3", "empty_caption: line 4"),
        ("line 5", "bad_caption_line: not a JSON object with id and caption"),
        ("line 6", "bad_caption_line: not a JSON object with id and caption"),
        ("c1", "duplicate_id: kept the first"),
    ]
    with pytest.raises(SourceError, match="no image"):
        load_pixels(index.rows[1], "captions")


@pytest.fixture
def pair(tmp_path: Path):
    """A valid image + mask; the cases below break one of them."""
    img = save(tmp_path / "img.png", Image.fromarray(rgb(4, 4, 0)))
    mask = save(tmp_path / "mask.png", palette_mask(np.ones((4, 4))))
    return {"source_id": "p", "source_path": str(img), "source_mask_path": str(mask)}


@pytest.mark.parametrize(
    "case, file, message",
    [
        ("missing image", "img.png", "image file not found"),
        ("missing mask", "mask.png", "mask file not found"),
        ("corrupt image", "img.png", "corrupt or unreadable image"),
        ("truncated image", "img.png", "corrupt or unreadable image"),
        ("corrupt mask", "mask.png", "corrupt or unreadable mask"),
        ("mask size", "mask.png", "mask size 3x4 != image size 4x4"),
        ("class ids", "mask.png", r"class ids \[21, 30\] out of range"),
        ("rgb mask", "mask.png", "mask has mode RGB"),
    ],
)
def test_bad_input_names_the_file(pair: dict, case: str, file: str, message: str) -> None:
    img, mask = Path(pair["source_path"]), Path(pair["source_mask_path"])
    if case.startswith("missing"):
        (img if file == "img.png" else mask).unlink()
    elif case == "corrupt image":
        img.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    elif case == "truncated image":
        img.write_bytes(img.read_bytes()[:60])
    elif case == "corrupt mask":
        mask.write_bytes(b"garbage")
    elif case == "mask size":
        save(mask, palette_mask(np.zeros((4, 3))))
    elif case == "class ids":
        save(mask, palette_mask(np.array([[0, 21, 30, 255]] * 4)))
    else:
        save(mask, Image.fromarray(rgb(4, 4, 1)))
    with pytest.raises(SourceError, match=message) as err:
        load_pixels(pair, "voc", num_classes=21)
    assert str(err.value).startswith(str(img if file == "img.png" else mask))


def test_image_modes_become_rgb(pair: dict, tmp_path: Path) -> None:
    base = rgb(4, 4, 5)
    gray = base[:, :, 0]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red, lossless in TIFF
    p_img = palette_mask(gray)
    wide = (gray.astype(np.uint16) * 257).astype(np.uint16)  # 16-bit grayscale PNG
    cases = {
        "rgba.png": (Image.fromarray(np.dstack([base, gray])), base),
        "gray.png": (Image.fromarray(gray), np.dstack([gray] * 3)),
        "la.png": (Image.fromarray(gray).convert("LA"), np.dstack([gray] * 3)),
        "pal.png": (p_img, np.array(p_img.convert("RGB"))),
        "cmyk.tiff": (cmyk, np.broadcast_to([255, 0, 0], (4, 4, 3))),
        "wide.png": (Image.fromarray(wide), np.dstack([gray] * 3)),
    }
    for name, (im, expected) in cases.items():
        path = save(tmp_path / name, im, "TIFF" if name.endswith("tiff") else "PNG")
        mode = Image.open(path).mode
        image, mask = load_pixels({**pair, "source_path": str(path)}, "folder", 2)
        assert image.dtype == np.uint8 and image.shape == (4, 4, 3), name
        np.testing.assert_array_equal(image, expected, err_msg=f"{name} ({mode})")
        np.testing.assert_array_equal(mask, np.ones((4, 4)))
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    assert not np.array_equal(np.array(p_img.convert("RGB"))[..., 0], gray)


def test_16bit_masks(pair: dict, tmp_path: Path) -> None:
    m = np.array([[0, 3, 255, 300]] * 4, dtype=np.uint16)
    pair["source_mask_path"] = str(save(tmp_path / "m16.png", Image.fromarray(m)))
    _, mask = load_pixels(pair, "folder", num_classes=400)
    assert mask.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(mask, m)
    with pytest.raises(SourceError, match=r"\[300\]"):
        load_pixels(pair, "folder", num_classes=21)
    small = save(tmp_path / "s16.png", Image.fromarray(np.minimum(m, 255)))
    _, mask = load_pixels({**pair, "source_mask_path": str(small)}, "folder", num_classes=21)
    assert mask.dtype == np.uint8 and mask.tolist()[0] == [0, 3, 255, 255]


def test_caption_from_mask() -> None:
    classes = list(VOC_CLASSES)
    m = np.array([[0, 0, 0, 0, 12, 12, 12, 15, 15, 255, 11, 16]])
    assert (
        caption_from_mask(m, classes)
        == "a photo of a dog, person, dining table and potted plant"  # area, then id
    )
    assert caption_from_mask(np.array([[1, 0, 0]]), classes) == "a photo of an aeroplane"
    assert caption_from_mask(np.zeros((2, 2)), classes) == "a photo of a background"
    assert caption_from_mask(np.full((2, 2), 255), classes) == "a photo"
    ade = np.array([[0, 0, 2, 9]])  # ADE ids after reduce_zero_label: 0 is wall, a real class
    assert (
        caption_from_mask(ade, ADE20K_CLASSES, background_index=None)
        == "a photo of a wall, sky and grass"
    )


def test_source_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source format 'cityscapes'"):
        index_source(tmp_path, "cityscapes")
    with pytest.raises(SourceError, match="nowhere: source path not found"):
        index_source(tmp_path / "nowhere", "voc")
    with pytest.raises(SourceError, match="no .parquet files"):
        index_source(tmp_path, "parquet")
    with pytest.raises(SourceError, match=r"captions\.jsonl: captions file not found"):
        index_source(tmp_path, "captions")
    pq.write_table(pa.table({"sample_id": ["a"], "image": [b""]}), tmp_path / "x.parquet")
    with pytest.raises(SourceError, match=r"manifest\.json \(classes\) or classes\.txt"):
        index_source(tmp_path, "parquet")
