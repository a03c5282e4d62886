"""What a person sees of a dataset: the contact sheet (image beside its mask overlay, a legend
of class names in the palette colours), `inspect`'s errors, the aligned run summary."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core import schema as S
from core import storage
from pipelines.commits import ids_digest, write_commit
from pipelines.graphs import Stage
from pipelines.graphs.base import stage_label
from pipelines.report import contact_sheet, generate_summary, inspect_dataset
from pipelines.sources import SourceError
from pipelines.stages import encode_png

PALETTE = np.array([[0, 0, 0], [200, 30, 30], [30, 30, 200]], dtype=np.uint8)
CLASSES = ["background", "cat", "dog"]


def _dataset(root, n=3, size=32):
    (root / "shards").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = np.full((size, size, 3), 128, dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[: size // 2] = 1  # top half "cat"
        if i == 0:
            mask[-4:] = S.IGNORE_INDEX
        rows.append({S.SAMPLE_ID: f"src{i}/imgsyn/0", S.IMAGE: encode_png(image), S.MASK: encode_png(mask)})
    pq.write_table(pa.Table.from_pylist(rows), root / "shards" / "part-0.parquet")
    # only committed shards are read (an uncommitted file beside it is never shown)
    pq.write_table(pa.Table.from_pylist(rows[:1]), root / "shards" / "part-00.parquet")
    write_commit(storage.resolve(root), {
        "shard": 0, "config_hash": "x", "file": "shards/part-0.parquet", "rows": n,
        "sample_ids": ids_digest(r[S.SAMPLE_ID] for r in rows), "rows_per_method": {"imgsyn": n},
        "drops_per_reason": {}, "rejected_rows": 0, "filtered_rows": 0, "prompts_truncated": 0})
    (root / "manifest.json").write_text(json.dumps({
        "classes": CLASSES, "palette": PALETTE.tolist(), "rows": n, "rejected_rows": 0, "shards": [0],
        "rows_per_method": {"imgsyn": n}, "drops_per_reason": {}}))
    return root


def test_sheet_pairs_image_with_coloured_mask_and_names_the_classes(tmp_path):
    ds = _dataset(tmp_path / "ds")
    tile = 64
    sheet = np.array(contact_sheet(ds, PALETTE, n=3, tile=tile, classes=CLASSES))
    assert sheet.shape[1] == 4 * tile  # two (image, overlay) pairs per row
    image, over = sheet[:tile, :tile], sheet[:tile, tile:2 * tile]
    assert (image[: tile // 2] == 128).all()  # the image as it is
    cat = np.round(128 * 0.5 + PALETTE[1] * 0.5)  # overlay: half image, half the class colour
    assert np.abs(over[5, 5].astype(int) - cat).max() <= 1
    assert (over[-2, 5] == 128).all()  # ignore pixels are left uncoloured
    legend = sheet[2 * (tile + 14):]  # below the two rows of pairs
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert tuple(PALETTE[1]) in colours and tuple(PALETTE[0]) in colours
    assert tuple(PALETTE[2]) not in colours  # "dog" is in no mask shown: not in the legend


def test_legend_labels_are_never_cut(tmp_path):
    from PIL import ImageDraw

    ds = _dataset(tmp_path / "ds")
    long = ["background", "a cat with a very long descriptive class name", "dog"]
    sheet = contact_sheet(ds, PALETTE, n=3, tile=64, classes=long)
    need = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(long[1])
    assert sheet.size[0] >= 4 + 20 + need  # the column holds swatch + the whole label
    legend = np.array(sheet)[2 * (64 + 14):]
    ink = np.where((legend < 100).all(axis=2).any(axis=0))[0]
    assert ink.max() >= 20 + need - 8  # text drawn out to the label's full width


def test_inspect_writes_the_sheet_and_names_bad_paths(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    result = inspect_dataset(ds, n_samples=2)
    assert Image.open(result["sheet"]).size[0] == 4 * 160
    # cat: the top half of 3 masks; background: the rest but image 0's 4 ignore rows
    assert result["class_frequencies"]["cat"] == pytest.approx(3 * 512 / (3 * 512 + 2 * 512 + 384))
    with pytest.raises(SourceError, match="no such directory"):
        inspect_dataset(tmp_path / "missing")
    with pytest.raises(SourceError, match="not a segfactory dataset"):
        inspect_dataset(tmp_path)


def test_summary_names_stages_and_aligns_columns():
    plan = [Stage("expand", SimpleNamespace(__name__="expand_sources")),
            Stage("text2mask", SimpleNamespace(__name__="Text2MaskPool")),
            Stage("finalize", SimpleNamespace(__name__="finalize"))]
    assert stage_label("MapBatches(expand_sources)->MapBatches(Text2MaskPool)", plan) == "expand + text2mask"
    assert stage_label("FromItems", plan) == "source rows"
    result = SimpleNamespace(out="/o", rejected_fraction=0.0, manifest={
        "rows": 10, "rejected_rows": 1, "filtered_rows": 1, "rows_per_method": {"imgsyn": 10},
        "drops_per_reason": {"low_similarity": 1},
        "timings": {"wall_s": 3.0, "samples_per_s": 3.3,
                    "stage_busy_s": {"source rows": 0.1, "expand + text2mask": 12.25}}})
    lines = generate_summary(result).splitlines()
    values = [line for line in lines if line.startswith("  ")]
    assert len({len(line) for line in values}) == 1  # every value ends in the same column
    assert any("expand + text2mask" in line and line.endswith("12.2 s") for line in values)
