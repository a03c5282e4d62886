"""What a person sees of a dataset: the end-of-run summary and ``segfactory inspect``."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines import schema as S
from pipelines import storage
from pipelines.stages import decode_png
from pipelines.storage import Location


def print_generate_summary(result) -> None:
    m = result.manifest
    lines = [f"dataset: {result.out}",
             f"rows kept: {m['rows']}  rejected: {m['rejected_rows']} (filtered by quality: "
             f"{m['filtered_rows']}; errors and bad input: {result.rejected_fraction:.1%})"]
    lines += [f"  {method:<10} {n}" for method, n in m["rows_per_method"].items()]
    if m["drops_per_reason"]:
        lines.append("drops per reason:")
        lines += [f"  {reason:<24} {n}" for reason, n in m["drops_per_reason"].items()]
    t = m["timings"]
    lines.append(f"wall time: {t['wall_s']:.1f} s   throughput: {t['samples_per_s']:.2f} samples/s")
    if t["stage_busy_s"]:
        lines.append("stage busy time (summed over workers):")
        lines += [f"  {stage:<40} {sec:.1f} s" for stage, sec in t["stage_busy_s"].items()]
    print("\n".join(lines))


def read_manifest(dataset: Location | str | os.PathLike) -> dict:
    dataset = storage.resolve(dataset, "dataset")
    path = dataset / "manifest.json"
    if not storage.is_file(path):
        raise storage.StorageError(f"{path}: no manifest; is {dataset} a segfactory dataset?")
    return json.loads(storage.read_text(path))


def class_frequencies(dataset: Location | str | os.PathLike, num_classes: int) -> np.ndarray:
    """Pixel share of each class over all kept masks (ignore excluded)."""
    dataset = storage.resolve(dataset, "dataset")
    counts = np.zeros(num_classes, dtype=np.int64)
    for f in storage.listdir(dataset / "shards", ".parquet"):
        for mask_png in pq.read_table(f.path, columns=[S.MASK], filesystem=f.fs).column(S.MASK).to_pylist():
            mask = decode_png(mask_png)
            counts += np.bincount(mask[mask != S.IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colors = np.zeros_like(image)
    valid = mask != S.IGNORE_INDEX
    colors[valid] = palette[mask[valid]]
    out = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
    return np.where(valid[..., None], out, image).astype(np.uint8)


def contact_sheet(dataset: Location | str | os.PathLike, palette: np.ndarray, n: int, tile: int = 160) -> Image.Image:
    """Rows of ``image | mask overlay`` for the first ``n`` samples (sorted by sample_id)."""
    dataset = storage.resolve(dataset, "dataset")
    samples = []
    for f in storage.listdir(dataset / "shards", ".parquet"):
        samples += pq.read_table(f.path, columns=[S.SAMPLE_ID, S.IMAGE, S.MASK], filesystem=f.fs).to_pylist()
        if len(samples) >= n:
            break
    samples = samples[:n]
    cols = 2  # pairs per sheet row
    rows = max(1, -(-len(samples) // cols))
    sheet = Image.new("RGB", (cols * 2 * tile, rows * tile), "white")
    for i, row in enumerate(samples):
        image = np.array(Image.open(io.BytesIO(row[S.IMAGE])).convert("RGB"))
        mask = decode_png(row[S.MASK])
        pair = [image, overlay(image, mask, palette)]
        for j, arr in enumerate(pair):
            thumb = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            sheet.paste(thumb, (((i % cols) * 2 + j) * tile, (i // cols) * tile))
    return sheet


def inspect_dataset(dataset: Location | str | os.PathLike, n_samples: int = 16, sheet: str | None = None) -> dict:
    """Print counts and class frequencies; write the contact sheet PNG (beside the data, any URI)."""
    dataset = storage.resolve(dataset, "dataset")
    m = read_manifest(dataset)
    classes, palette = m["classes"], np.array(m["palette"], dtype=np.uint8)
    freq = class_frequencies(dataset, len(classes))
    print(f"dataset: {dataset}")
    print(f"rows: {m['rows']}  rejected: {m['rejected_rows']}  shards: {len(m['shards'])}")
    for method, count in m["rows_per_method"].items():
        print(f"  {method:<10} {count}")
    for reason, count in m["drops_per_reason"].items():
        print(f"  dropped {reason:<20} {count}")
    print("class pixel frequencies:")
    for name, share in sorted(zip(classes, freq, strict=True), key=lambda t: -t[1]):
        if share > 0:
            print(f"  {name:<20} {share:.3f}")
    sheet_path = storage.resolve(sheet, "--sheet") if sheet else dataset / "contact_sheet.png"
    png = io.BytesIO()
    contact_sheet(dataset, palette, n_samples).save(png, format="PNG")
    storage.write_bytes(sheet_path, png.getvalue())
    print(f"contact sheet: {sheet_path}")
    return {"class_frequencies": dict(zip(classes, freq.tolist(), strict=True)), "sheet": str(sheet_path),
            "counts": Counter(m["rows_per_method"])}
