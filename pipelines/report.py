"""What a person sees of a dataset: the end-of-run summary and ``segfactory inspect``."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from core import schema as S
from core import storage
from core.storage import Location
from pipelines.commits import shard_files_to_read
from pipelines.stages import decode_png


def generate_summary(result) -> str:
    """The end-of-run summary: where, how many, why dropped, how fast, time per stage (aligned)."""
    m = result.manifest
    t = m["timings"]
    lines = [f"dataset: {result.out}",
             f"rows kept: {m['rows']}  rejected: {m['rejected_rows']} (filtered by quality: "
             f"{m['filtered_rows']}; errors and bad input: {result.rejected_fraction:.1%})",
             _rate_line(m, t)]
    sections = [("rows per method", {k: str(v) for k, v in m["rows_per_method"].items()}),
                ("drops per reason", {k: str(v) for k, v in m["drops_per_reason"].items()}),
                ("stage busy time, summed over workers",
                 {k: f"{v:.1f} s" for k, v in t["stage_busy_s"].items()})]
    width = max((len(k) for _, rows in sections for k in rows), default=0)
    for title, rows in sections:
        if rows:
            lines.append(f"{title}:")
            lines += [f"  {key:<{width}}  {value:>8}" for key, value in rows.items()]
    return "\n".join(lines)


def _rate_line(m: dict, t: dict) -> str:
    """Throughput of the rows this run made; a rerun that skipped every shard made none."""
    made = t.get("rows_this_run")
    if made == 0:
        return (f"wall time: {t['wall_s']:.1f} s   nothing generated: all {len(m['shards'])} shard"
                f"{'s were' if len(m['shards']) != 1 else ' was'} already complete")
    if "stream_s" not in t:  # a manifest written before the stream time was recorded
        return f"wall time: {t['wall_s']:.1f} s   throughput: {t['samples_per_s']:.2f} samples/s"
    return (f"wall time: {t['wall_s']:.1f} s ({t['wall_s'] - t['stream_s']:.1f} s of it outside the stream: Ray start, index, manifest)   "
            f"throughput: {t['samples_per_s']:.2f} samples/s over {t['stream_s']:.1f} s of generation")


def print_generate_summary(result) -> None:
    print(generate_summary(result))


def read_manifest(dataset: Location | str | os.PathLike) -> dict:
    from pipelines.sources import SourceError

    dataset = storage.resolve(dataset, "dataset")
    path = dataset / "manifest.json"
    if not storage.is_dir(dataset):
        raise SourceError(f"{dataset}: no such directory; give the output.path of a `segfactory generate` run")
    if not storage.is_file(path):
        raise SourceError(f"{dataset}: not a segfactory dataset (no manifest.json); give the output.path of a "
                          "finished `segfactory generate` run (rerun it to finish an interrupted one), or for "
                          "a source dataset `inspect DIR --format voc|ade20k|folder|parquet`")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as exc:
        raise SourceError(f"{path}: unreadable manifest ({exc}); rerun the generate command to rebuild it") from None


def _shard_class_counts(f: Location, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for mask_png in pq.read_table(f.path, columns=[S.MASK], filesystem=f.fs).column(S.MASK).to_pylist():
        mask = decode_png(mask_png)
        counts += np.bincount(mask[mask != S.IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
    return counts


def class_frequencies(dataset: Location | str | os.PathLike, num_classes: int) -> np.ndarray:
    """Pixel share of each class over all kept masks (ignore excluded); shards read in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    dataset = storage.resolve(dataset, "dataset")
    counts = np.zeros(num_classes, dtype=np.int64)
    files = shard_files_to_read(dataset)
    with ThreadPoolExecutor(max(1, min(8, len(files)))) as pool:
        for c in pool.map(lambda f: _shard_class_counts(f, num_classes), files):
            counts += c
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colors = np.zeros_like(image)
    valid = mask != S.IGNORE_INDEX
    colors[valid] = palette[mask[valid]]
    out = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
    return np.where(valid[..., None], out, image).astype(np.uint8)


def contact_sheet(dataset: Location | str | os.PathLike, palette: np.ndarray, n: int, tile: int = 160,
                  classes: list[str] | None = None) -> Image.Image:
    """Rows of ``image | mask overlaid in the palette colours`` for the first ``n`` samples (by
    sample_id), each pair captioned with its sample_id, and a legend of the classes they show."""
    from PIL import ImageDraw

    dataset = storage.resolve(dataset, "dataset")
    samples = []
    for f in shard_files_to_read(dataset):
        samples += pq.read_table(f.path, columns=[S.SAMPLE_ID, S.IMAGE, S.MASK], filesystem=f.fs).to_pylist()
        if len(samples) >= n:
            break
    samples = samples[:n]
    cols, caption = 2, 14  # pairs per sheet row; pixels of text under each pair
    rows = max(1, -(-len(samples) // cols))
    seen: set[int] = set()
    pairs = []
    for row in samples:
        image = np.array(Image.open(io.BytesIO(row[S.IMAGE])).convert("RGB"))
        mask = decode_png(row[S.MASK])
        seen |= {int(c) for c in np.unique(mask)}
        pairs.append((row[S.SAMPLE_ID], image, overlay(image, mask, palette)))
    names = classes or [str(i) for i in range(len(palette))]
    legend = [(names[c], tuple(int(v) for v in palette[c])) for c in sorted(seen) if c < len(names)]
    if S.IGNORE_INDEX in seen:
        legend.append((f"ignore ({S.IGNORE_INDEX}): not coloured", None))
    # legend columns as wide as the longest label: names are never cut
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = 28 + int(max((measure.textlength(name) for name, _ in legend), default=0))
    per_line = max(1, (cols * 2 * tile) // col_w)
    legend_h = 8 + 18 * -(-len(legend) // per_line) if legend else 0
    sheet = Image.new("RGB", (max(cols * 2 * tile, col_w + 8), rows * (tile + caption) + legend_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (sample_id, image, over) in enumerate(pairs):
        x0, y0 = (i % cols) * 2 * tile, (i // cols) * (tile + caption)
        for j, arr in enumerate((image, over)):
            sheet.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (x0 + j * tile, y0))
        draw.text((x0 + 3, y0 + tile + 1), str(sample_id)[:48], fill="black")
    top = rows * (tile + caption) + 4
    for k, (name, color) in enumerate(legend):
        x, y = (k % per_line) * col_w + 4, top + (k // per_line) * 18
        draw.rectangle([x, y, x + 14, y + 14], fill=color or "white", outline="black")
        draw.text((x + 20, y + 2), name, fill="black")
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
    contact_sheet(dataset, palette, n_samples, classes=classes).save(png, format="PNG")
    storage.write_bytes(sheet_path, png.getvalue())
    print(f"contact sheet: {sheet_path}")
    return {"class_frequencies": dict(zip(classes, freq.tolist(), strict=True)), "sheet": str(sheet_path),
            "counts": Counter(m["rows_per_method"])}
