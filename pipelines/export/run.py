"""Driver of ``segfactory export DATASET --format FMT OUT``.

Checks first (before Ray starts): the manifest is there, OUT is empty (or ``--overwrite``),
the format can encode the dataset's classes. Then one Ray Data stream over the dataset's
shards, where workers write every file (:mod:`pipelines.export.writers`), and one Ray task that
joins the shards' parts into split files, ``captions.jsonl`` and the COCO JSON. The driver
writes only small files: class lists, palette, the dataset card.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from core import storage
from core.storage import Location
from pipelines.export.writers import (
    CITY,
    FORMATS,
    MAX_CLASSES,
    PARTS,
    Target,
    export_shard,
    hf_features,
)

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """Bad export input (OUT not empty, too many classes, no manifest): one line, exit 2."""


def check_export(dataset: str, fmt: str, out: str, overwrite: bool) -> dict[str, Any]:
    """The dataset's manifest, after the checks that need no Ray; raises :class:`ExportError`."""
    from pipelines.report import read_manifest
    from pipelines.sources import SourceError

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    try:
        manifest = read_manifest(dataset)
    except SourceError as e:
        raise ExportError(str(e)) from None
    n, limit = len(manifest["classes"]), MAX_CLASSES.get(fmt)
    if limit is not None and n > limit:
        raise ExportError(f"--format {fmt}: the dataset has {n} classes; {fmt} label PNGs are 8-bit and encode at "
                          f"most {limit} (255 = ignore); use --format coco or hf")
    target = storage.resolve(out, "OUT")
    storage.check_writable_root(target)
    if storage.exists(target) and storage.listdir(target, recursive=True) and not overwrite:
        raise ExportError(f"{target}: not empty; pass --overwrite to replace what is there")
    return manifest


def export_dataset(dataset: str, fmt: str, out: str, overwrite: bool = False, val_fraction: float = 0.0,
                   ray_cfg: Any = None) -> dict[str, Any]:
    """Export ``dataset`` as ``fmt`` into ``out``; returns counts per split and what was written."""
    import ray

    from core.runtime import init_ray

    manifest = check_export(dataset, fmt, out, overwrite)
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"--val-fraction {val_fraction}: give 0 <= fraction < 1")
    src, dst = storage.resolve(dataset, "DATASET"), storage.resolve(out, "OUT")
    if storage.exists(dst) and overwrite:
        storage.remove_tree(dst)
    from pipelines.commits import shard_files_to_read

    shards = shard_files_to_read(src)
    target = Target(fmt, dst.uri if not dst.is_local else dst.path, manifest["palette"], val_fraction,
                    list(manifest["classes"]))
    init_ray(ray_cfg)
    items = [{"shard": s.uri if not s.is_local else s.path, "index": i} for i, s in enumerate(shards)]
    counts = {"train": 0, "val": 0}
    if items:
        ds = ray.data.from_items(items).map_batches(export_shard, batch_size=1, fn_kwargs={"target": target},
                                                    num_cpus=1)
        for rec in ds.iter_rows():
            counts["train"] += int(rec["train"])
            counts["val"] += int(rec["val"])
    ray.get(ray.remote(join_parts).options(num_cpus=0).remote(target, len(items)))
    _write_metadata(dst, fmt, manifest, counts, src)
    return {"out": str(dst), "format": fmt, "rows": counts, "shards": len(items)}


def join_parts(t: Target, n_shards: int) -> None:
    """Runs in a Ray task: the shards' parts become the format's split files, captions and
    COCO JSON (streamed: one part in memory at a time); the parts are removed."""
    root = storage.resolve(t.out, "OUT")
    parts = root / PARTS

    def lines(kind: str):
        for i in range(n_shards):
            for line in storage.read_text(parts.join(kind, f"{i:08d}.txt")).splitlines():
                if line:
                    yield line

    splits = [s for s in ("train", "val") if any(True for _ in lines(s))]
    if t.fmt == "voc":
        for split in splits:
            _stream(root.join("ImageSets", "Segmentation", f"{split}.txt"), (f"{x}\n" for x in lines(split)))
    if t.fmt in ("voc", "ade20k", "folder"):  # segfactory's readers merge a captions.jsonl beside the data
        _stream(root / "captions.jsonl", (f"{x}\n" for x in lines("captions")))
    if t.fmt == "coco":
        for split in splits:
            _write_coco(root.join("annotations", f"semantic_{split}.json"), t, split, lines)
    storage.remove_tree(parts)


def _stream(loc: Location, chunks) -> None:
    if loc.is_local:
        storage.makedirs(loc.parent)
    with loc.fs.open_output_stream(loc.path) as f:
        for chunk in chunks:
            f.write(chunk.encode())


def _write_coco(loc: Location, t: Target, split: str, lines) -> None:
    """COCO JSON of one split, written in two passes over the parts (images, then annotations)."""
    def images():
        n = 0
        for line in lines("coco"):
            rec = json.loads(line)
            if rec["split"] == split:
                n += 1
                yield rec, n

    categories = [{"id": i + 1, "name": name, "supercategory": "class"} for i, name in enumerate(t.classes)]

    def chunks():
        yield '{"info": {"description": "exported by segfactory export"}, "licenses": [],\n'
        yield f'"categories": {json.dumps(categories)},\n"images": ['
        for rec, image_id in images():
            sep = "" if image_id == 1 else ",\n"
            yield sep + json.dumps({"id": image_id, "file_name": rec["file_name"], "height": rec["height"],
                                    "width": rec["width"], "sample_id": rec["sample_id"]})
        yield '],\n"annotations": ['
        ann_id = 0
        for rec, image_id in images():
            for ann in rec["anns"]:
                ann_id += 1
                yield ("" if ann_id == 1 else ",\n") + json.dumps({"id": ann_id, "image_id": image_id, **ann})
        yield "]}\n"

    _stream(loc, chunks())


def _write_metadata(dst: Location, fmt: str, manifest: dict[str, Any], counts: dict[str, int], src: Location) -> None:
    """Class list and palette files each format's tools expect; the card for ``hf``."""
    classes, palette = list(manifest["classes"]), manifest["palette"]
    if fmt in ("voc", "ade20k", "folder"):
        storage.write_text(dst / "classes.txt", "".join(f"{c}\n" for c in classes))
    table = [{"id": i, "name": c, "color": palette[i] if i < len(palette) else None} for i, c in enumerate(classes)]
    storage.write_text(dst / "classes.json", json.dumps({"classes": table, "ignore_index": 255,
                                                         "note": _id_note(fmt)}, indent=1))
    if fmt == "hf":
        storage.write_text(dst / "README.md", dataset_card(manifest, counts, src))


def _id_note(fmt: str) -> str:
    return {"ade20k": "annotation value = class id + 1; 0 = other/ignore (ADE20K's reduce_zero_label convention)",
            "coco": "category_id = class id + 1; pixels of no annotation are ignore",
            "cityscapes": f"gtFine/<split>/{CITY}/*_gtFine_labelTrainIds.png hold the class ids (255 = ignore)"
            }.get(fmt, "mask value = class id; 255 = ignore")


def dataset_card(manifest: dict[str, Any], counts: dict[str, int], src: Location) -> str:
    """A Hugging Face dataset card: YAML (configs, features with the class names) + what the
    manifest says about how the data was made."""
    import yaml

    splits = [s for s in ("train", "val") if counts.get(s)]
    meta = {"configs": [{"config_name": "default",
                         "data_files": [{"split": s if s != "val" else "validation",
                                         "path": f"data/{s}-*.parquet"} for s in splits]}],
            "task_categories": ["image-segmentation"], "tags": ["synthetic", "segfactory"],
            "dataset_info": {"features": _card_features(manifest["classes"]),
                             "splits": [{"name": s if s != "val" else "validation", "num_examples": counts[s]}
                                        for s in splits]}}
    cfg = manifest.get("config", {})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# Synthetic segmentation dataset ({cfg.get('pipeline', '?')}, preset {cfg.get('preset', '?')})", "",
             f"Made by `segfactory generate` (config hash `{manifest.get('config_hash', '?')}`) and exported from "
             f"`{src}` with `segfactory export --format hf`.", "",
             f"- rows: {manifest.get('rows')} kept, {manifest.get('rejected_rows')} rejected during generation",
             f"- rows per method: {json.dumps(manifest.get('rows_per_method', {}))}",
             f"- drops per reason: {json.dumps(manifest.get('drops_per_reason', {}))}",
             f"- versions: {json.dumps(manifest.get('versions', {}))}", "",
             "Columns: `image`, `annotation` (single-channel PNG of class ids, 255 = ignore), `classes` (the class "
             "ids present, a ClassLabel sequence naming them), `sample_id`, `source_id`, `method`, `caption`, "
             "`prompt`, `seed`, `generator`.", "", "| id | class |", "|---|---|",
             *[f"| {i} | {c} |" for i, c in enumerate(manifest["classes"])], ""]
    return "\n".join(lines)


def _card_features(classes: list[str]) -> list[dict[str, Any]]:
    """The card's YAML form of :func:`hf_features`."""
    out: list[dict[str, Any]] = []
    for name, f in hf_features(classes).items():
        if f["_type"] == "Image":
            out.append({"name": name, "dtype": "image"})
        elif f["_type"] == "List":
            names = {str(i): c for i, c in enumerate(classes)}
            out.append({"name": name, "sequence": {"class_label": {"names": names}}})
        else:
            out.append({"name": name, "dtype": f["dtype"]})
    return out
