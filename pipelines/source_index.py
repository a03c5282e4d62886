"""The source index: a source's rows as one Arrow table, listed without decoding any pixel.

The index is columnar from the start: listings and caption lines are gathered in chunks of
:data:`CHUNK` rows into Arrow tables, and de-duplication, pairing images with masks and merging
captions are Arrow sorts and joins. So a 10-million-line ``captions.jsonl`` or a million-image
folder costs ~100 bytes per row in Arrow buffers, never a Python dict per row (~1 kB).
:func:`pipelines.generate.run_generate` builds it in a Ray task, so the driver keeps none of it.

Rows come sorted by ``source_id``. Per-row problems (duplicate ids, missing masks, unreadable
caption lines) never raise: they are returned in :attr:`SourceIndex.problems` for ``rejected/``
(missing files and bad lines first, duplicates last). Only a source that cannot be read at all
(missing root, no class list, unknown format) raises :class:`pipelines.sources.SourceError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import schema, storage
from core.storage import Location
from pipelines.sources import (
    _BACKGROUND_NAMES,
    ADE20K_CLASSES,
    FORMATS,
    IMAGE_EXTS,
    PANOPTIC_SEGMENTS,
    VOC_CLASSES,
    Problem,
    SourceError,
    load_pixels,
)

log = logging.getLogger(__name__)

CHUNK = 65_536  # rows gathered in Python lists before they become an Arrow table
ID, PATH, MASK, ROW, CAPTION = (schema.SOURCE_ID, schema.SOURCE_PATH, schema.SOURCE_MASK_PATH, "source_row",
                                schema.CAPTION)
INDEX_SCHEMA = pa.schema([(ID, pa.string()), (PATH, pa.string()), (MASK, pa.string()), (ROW, pa.int64()),
                          (CAPTION, pa.string())])
MAX_CAPTION_CHARS = 2000  # longer is a broken file, not a caption; prompts are cut to the tokenizer


@dataclass
class SourceIndex:
    """A source's rows (:attr:`table`, sorted by id, columns of :data:`INDEX_SCHEMA`) and what
    the run needs to know about it: class names, palette hint, the background class."""

    format: str
    root: str
    table: pa.Table
    classes: list[str]
    palette_hint: str | None = None  # "voc", "ade20k" or None
    background_index: int | None = None  # class left out of generated captions
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts — for small sources only (a val split, a few hundred pairs)."""
        return self.table.to_pylist()

    @rows.setter
    def rows(self, rows: list[dict[str, Any]]) -> None:
        self.table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)

    def load(self, row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`load_pixels` with this source's format and class count."""
        return load_pixels(row, self.format, len(self.classes) or None)


class _Chunks:
    """Columns appended value by value, turned into an Arrow table every :data:`CHUNK` rows."""

    def __init__(self, schema_: pa.Schema):
        self.schema = schema_
        self.cols: list[list[Any]] = [[] for _ in schema_.names]
        self.tables: list[pa.Table] = []

    def add(self, *values: Any) -> None:
        for col, v in zip(self.cols, values, strict=True):
            col.append(v)
        if len(self.cols[0]) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.cols[0]:
            self.tables.append(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(self.cols, self.schema, strict=True)],
                                                    schema=self.schema))
            self.cols = [[] for _ in self.schema.names]

    def table(self) -> pa.Table:
        self._flush()
        return pa.concat_tables(self.tables) if self.tables else self.schema.empty_table()


# --- Arrow helpers ------------------------------------------------------------------------------


def _first_of_each_id(table: pa.Table, order: list[str], path_cols: Sequence[str] = (PATH,)) -> tuple[pa.Table, list[Problem]]:
    """``table`` sorted by (id, *order) with later rows of an id dropped as ``duplicate_id``
    problems (naming the first non-empty of ``path_cols``)."""
    table = table.sort_by([(ID, "ascending"), *((c, "ascending") for c in order)])
    ids = table.column(ID)
    if table.num_rows < 2:
        return table, []
    dup = pc.equal(ids.slice(1), ids.slice(0, table.num_rows - 1))
    dup = pa.concat_arrays([pa.array([False]), *pc.fill_null(dup, False).chunks])
    problems = [(r[ID], next((str(r[c]) for c in path_cols if r.get(c)), ""), "duplicate_id: kept the first")
                for r in table.filter(dup).select([ID, *path_cols]).to_pylist()]
    return table.filter(pc.invert(dup)), problems


def _listing(d: Location, exts: set[str] = IMAGE_EXTS) -> pa.Table:
    """``(source_id, path or URI)`` of files under ``d`` (id = relative path without suffix),
    hidden entries skipped, sorted by id then path. One recursive listing (a ``LIST`` per 1000
    keys on object stores); every id is kept, duplicates included (the caller reports them)."""
    from pyarrow.fs import FileType

    out = _Chunks(pa.schema([(ID, pa.string()), (PATH, pa.string())]))
    base = d.path.rstrip("/") + "/"
    for info in storage.iter_file_infos(d):
        if info.type != FileType.File or not info.path.startswith(base):
            continue
        rel = info.path[len(base):]
        parts = rel.split("/")
        stem, dot, ext = parts[-1].rpartition(".")
        if any(p.startswith(".") for p in parts) or not (dot and stem) or "." + ext.lower() not in exts:
            continue
        out.add("/".join([*parts[:-1], stem]), d.join(rel).uri)
    return out.table().sort_by([(ID, "ascending"), (PATH, "ascending")])


def _unique_listing(d: Location, exts: set[str] = IMAGE_EXTS) -> tuple[pa.Table, list[Problem]]:
    return _first_of_each_id(_listing(d, exts), [PATH])


def _pair(images: pa.Table, masks: pa.Table, require_masks: bool) -> tuple[pa.Table, list[Problem]]:
    """Index rows from ``images`` (id, path — null where a listed id has no file) and ``masks``
    (id, path, unique ids); missing images and (if required) masks become problems."""
    masks = masks.rename_columns([ID, MASK])
    joined = images.join(masks, keys=ID, join_type="left outer")
    no_image = pc.is_null(joined.column(PATH))
    no_mask = pc.is_null(joined.column(MASK))
    problems = [(r[ID], r[MASK] or "", "missing_image: listed but not on disk")
                for r in joined.filter(no_image).select([ID, MASK]).to_pylist()]
    bad = no_image
    if require_masks:
        missing = pc.and_(no_mask, pc.invert(no_image))
        problems += [(r[ID], r[PATH], "missing_mask: no mask file for this image")
                     for r in joined.filter(missing).select([ID, PATH]).to_pylist()]
        bad = pc.or_(bad, missing)
    kept = joined.filter(pc.invert(bad))
    n = kept.num_rows
    rows = pa.table({ID: kept.column(ID), PATH: kept.column(PATH), MASK: pc.fill_null(kept.column(MASK), ""),
                     ROW: pa.repeat(-1, n), CAPTION: pa.repeat("", n)}, schema=INDEX_SCHEMA)
    return rows, problems


# --- formats ------------------------------------------------------------------------------------


def _index_voc(root: Location, split: str | None, require_masks: bool) -> tuple[pa.Table, list[Problem]]:
    masks, _ = _unique_listing(root / "SegmentationClass", {".png"})
    images, _ = _unique_listing(root / "JPEGImages")
    sets_dir = root / "ImageSets" / "Segmentation"
    split_file = sets_dir / f"{split or 'train'}.txt"
    if storage.is_file(split_file):
        listed = _Chunks(pa.schema([(ID, pa.string()), ("order", pa.int64())]))
        for n, line in enumerate(storage.iter_lines(split_file)):
            if line.strip():
                listed.add(line.split()[0].decode("utf-8", errors="replace"), n)
        # a split file listing an id twice: the duplicate names its image (else its mask) file
        with_files = listed.table().join(images, keys=ID, join_type="left outer").join(
            masks.rename_columns([ID, MASK]), keys=ID, join_type="left outer")
        ids, dups = _first_of_each_id(with_files, ["order"], path_cols=(PATH, MASK))
        ids = ids.select([ID, PATH])
    elif split is not None and storage.is_dir(sets_dir):
        raise SourceError(f"{split_file}: split file not found (split={split!r})")
    else:
        log.warning("%s missing: using every mask in %s", split_file, root / "SegmentationClass")
        ids, dups = masks.select([ID]).join(images, keys=ID, join_type="left outer"), []
    rows, problems = _pair(ids, masks, require_masks)
    return rows, problems + dups


def _index_dirs(img_dir: Location, mask_dir: Location, require_masks: bool) -> tuple[pa.Table, list[Problem]]:
    if not storage.is_dir(img_dir):
        raise SourceError(f"{img_dir}: image directory not found")
    images, dups = _unique_listing(img_dir)
    masks, _ = _unique_listing(mask_dir, {".png"})
    rows, problems = _pair(images, masks, require_masks)
    return rows, problems + dups


COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def _index_coco(root: Location, split: str | None, classes: Sequence[str] | None,
                require_masks: bool) -> tuple[pa.Table, list[Problem], list[str] | None]:
    """COCO: panoptic (``annotations/panoptic_<split>.json`` + its PNG folder) → semantic, else
    COCO-Stuff 164k's PNG layout (mmseg: ``images/<split>/X.jpg``, ``annotations/<split>/
    X_labelTrainIds.png``, class ids 0..170, 255 ignore). Returns (rows, problems, class names
    from the panoptic categories when ``classes`` is None)."""
    sub = COCO_SPLITS.get(split or "train", split or "train")
    pan = root / "annotations" / f"panoptic_{sub}.json"
    if not storage.is_file(pan):
        images, dups = _unique_listing(root / "images" / sub)
        masks, _ = _unique_listing(root / "annotations" / sub, {".png"})
        stems = pc.replace_substring_regex(masks.column(ID), "_labelTrainIds$", "")
        rows, problems = _pair(images, pa.table({ID: stems, PATH: masks.column(PATH)}), require_masks)
        return rows, problems + dups, None
    data = json.loads(storage.read_text(pan))
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    vocab = list(classes) if classes is not None else [c["name"] for c in data.get("categories", [])]
    index = {n: i for i, n in enumerate(vocab)}
    out, problems = _Chunks(INDEX_SCHEMA), []
    for ann in data.get("annotations", []):
        stem = ann["file_name"].rsplit(".", 1)[0]
        png = (root / "annotations" / f"panoptic_{sub}" / ann["file_name"]).uri
        missing = sorted({names.get(s["category_id"], str(s["category_id"])) for s in ann.get("segments_info", [])} - index.keys())
        if missing:  # quarantined: a class the run does not know would be trained as ignore silently
            problems.append((stem, png, f"coco_category_not_in_classes: {', '.join(missing)} not in source.classes"))
            continue
        pairs = ",".join(f"{s['id']}:{index[names[s['category_id']]]}" for s in ann.get("segments_info", []))
        out.add(stem, (root / "images" / sub / f"{stem}.jpg").uri, f"{png}{PANOPTIC_SEGMENTS}{pairs}", -1, "")
    return out.table(), problems, None if classes is not None else vocab


def _parquet_files(root: Location) -> list[Location]:
    if storage.is_file(root):
        return [root]
    from pipelines.commits import shard_files_to_read  # a generated dataset: its committed shards

    return shard_files_to_read(root) if storage.is_dir(root / "shards") else storage.listdir(root, ".parquet")


def _find_manifest(root: Location) -> Location | None:
    start = root if storage.is_dir(root) else root.parent
    for d in (start, start.parent, start.parent.parent):
        if d.path and storage.is_file(d / "manifest.json"):
            return d / "manifest.json"
    return None


def _index_parquet(files: list[Location]) -> tuple[pa.Table, list[Problem]]:
    """Reads only ``sample_id`` and ``caption``; pixels are read per row group at load time."""
    tables: list[pa.Table] = []
    problems: list[Problem] = []
    for k, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f.path, filesystem=f.fs)
            names = pf.schema_arrow.names
            if schema.SAMPLE_ID not in names or schema.IMAGE not in names:
                problems.append(("", str(f), f"bad_parquet: no {schema.SAMPLE_ID}/{schema.IMAGE} column"))
                continue
            read = pf.read(columns=[c for c in (schema.SAMPLE_ID, schema.CAPTION) if c in names])
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            problems.append(("", str(f), f"corrupt_parquet: unreadable parquet file ({e})"))
            continue
        n = read.num_rows
        ids = pc.cast(read.column(schema.SAMPLE_ID), pa.string())
        caps = read.column(schema.CAPTION) if schema.CAPTION in names else pa.nulls(n, pa.string())
        table = pa.table({ID: ids, PATH: pa.repeat(str(f), n),
                          MASK: pa.repeat(str(f) if schema.MASK in names else "", n),
                          ROW: pa.array(np.arange(n, dtype=np.int64)),
                          CAPTION: pc.fill_null(pc.cast(caps, pa.string()), ""), "file": pa.repeat(k, n)})
        no_id = pc.fill_null(pc.equal(ids, ""), True)
        problems += [(f"row {r[ROW]}", str(f), "missing_id: empty sample_id")
                     for r in table.filter(no_id).select([ROW]).to_pylist()]
        tables.append(table.filter(pc.invert(no_id)))
    if not tables:
        return INDEX_SCHEMA.empty_table(), problems
    table, dups = _first_of_each_id(pa.concat_tables(tables), ["file", ROW])
    return table.drop_columns(["file"]), problems + dups


def _read_captions(path: Location) -> tuple[pa.Table, list[Problem]]:
    """``(id, caption)`` of a ``captions.jsonl`` (first line of each id; duplicates are
    problems), read line by line in bytes so one bad line never hides the others. Empty,
    non-UTF-8 and over-long captions become problems under their id (the row is rejected);
    unparseable lines under ``line N``."""
    pairs = _Chunks(pa.schema([(ID, pa.string()), (CAPTION, pa.string()), ("line", pa.int64())]))
    problems: list[Problem] = []
    for n, raw in enumerate(storage.iter_lines(path), 1):
        if not raw.strip():
            continue
        why = ""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line, why = raw.decode("utf-8", errors="replace"), "caption_not_utf8: line {n}"
        try:
            d = json.loads(line)
            sid, cap = d.get("id", d.get("source_id")), d.get("caption")
        except (json.JSONDecodeError, AttributeError):
            sid, cap = None, None
        if sid is None or not isinstance(cap, str):
            problems.append((f"line {n}", str(path), "bad_caption_line: not a JSON object with id and caption"))
            continue
        if not why and not cap.strip():
            why = "empty_caption: line {n}"
        elif not why and len(cap) > MAX_CAPTION_CHARS:
            why = f"caption_too_long: line {{n}} has {len(cap)} characters (> {MAX_CAPTION_CHARS})"
        if why:
            problems.append((str(sid), str(path), why.format(n=n)))
        else:
            pairs.add(str(sid), cap, n)
    table, dups = _first_of_each_id(pairs.table(), ["line"], path_cols=())
    return table.drop_columns(["line"]), problems + [(sid, str(path), why) for sid, _, why in dups]


def _index_captions(root: Location) -> tuple[pa.Table, list[Problem]]:
    path = root if storage.is_file(root) else root / "captions.jsonl"
    if not storage.is_file(path):
        raise SourceError(f"{path}: captions file not found")
    pairs, problems = _read_captions(path)
    n = pairs.num_rows
    rows = pa.table({ID: pairs.column(ID), PATH: pa.repeat("", n), MASK: pa.repeat("", n), ROW: pa.repeat(-1, n),
                     CAPTION: pairs.column(CAPTION)}, schema=INDEX_SCHEMA)
    return rows, problems


def _merge_captions(rows: pa.Table, path: Location) -> tuple[pa.Table, list[Problem]]:
    """Rows without a caption take theirs from the source's ``captions.jsonl``; rows whose
    caption line is bad there are rejected (not re-captioned)."""
    caps, bad = _read_captions(path)
    bad_ids = pa.array(sorted({sid for sid, _, _ in bad}), pa.string())
    listed = pc.is_in(rows.column(ID), bad_ids)
    known = set(rows.filter(listed).column(ID).to_pylist())
    rows = rows.filter(pc.invert(listed))
    joined = rows.join(caps.rename_columns([ID, "from_file"]), keys=ID, join_type="left outer")
    caption = pc.if_else(pc.equal(joined.column(CAPTION), ""), pc.fill_null(joined.column("from_file"), ""),
                         joined.column(CAPTION))
    rows = joined.drop_columns(["from_file", CAPTION]).append_column(CAPTION, caption).select(INDEX_SCHEMA.names)
    return rows, [p for p in bad if p[0] in known]


def index_source(
    path: str | os.PathLike | Location,
    format: str,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    require_masks: bool = True,
) -> SourceIndex:
    """List a source's rows and class names without decoding pixels.

    Class names: ``classes`` if given, else ``classes.txt`` in the source root, else the
    format's own (VOC's 21, ADE20K's 150, the Parquet dataset's ``manifest.json``); a folder
    (or Parquet) source without any class list is an error naming the missing file.
    ``split``: VOC reads ``ImageSets/Segmentation/<split>.txt`` (default ``train``; with no
    split file, every mask present — unless a split was asked for and other split files exist,
    which is an error); ADE20K maps ``train``/``val`` to ``training``/``validation``; a folder
    reads ``images/<split>`` and ``masks/<split>``; Parquet and captions ignore it.
    ADE20K annotations use 0 = "other": :func:`load_pixels` maps 0 to 255 (ignore) and k to
    k-1 (mmseg's ``reduce_zero_label``), so class id 0 is "wall".
    ``require_masks=False`` keeps images without a mask (``source_mask_path`` = "").
    """
    if format not in FORMATS:
        raise SourceError(f"unknown source format {format!r}; expected one of {FORMATS}")
    try:
        root = storage.resolve(path, "source.path")
    except storage.StorageError as e:
        raise SourceError(str(e)) from None
    if not storage.exists(root):
        raise SourceError(f"{root}: source path not found")
    base = root if storage.is_dir(root) else root.parent
    manifest: dict[str, Any] = {}
    if format == "voc":
        rows, problems = _index_voc(root, split, require_masks)
    elif format == "ade20k":
        sub = {"train": "training", "val": "validation"}.get(split or "train", split or "train")
        rows, problems = _index_dirs(root / "images" / sub, root / "annotations" / sub, require_masks)
    elif format == "coco":  # source.classes, else classes.txt, else the panoptic categories
        given = classes if classes is not None else _read_classes(base / "classes.txt")
        rows, problems, found = _index_coco(root, split, given, require_masks)
        classes = given if found is None else found
    elif format == "folder":
        parts = (split,) if split else ()
        rows, problems = _index_dirs(root.join("images", *parts), root.join("masks", *parts), require_masks)
    elif format == "parquet":
        files = _parquet_files(root)
        if not files:
            raise SourceError(f"{root}: no .parquet files found")
        rows, problems = _index_parquet(files)
        mpath = _find_manifest(root)
        if mpath is not None:
            base = mpath.parent
            try:
                manifest = json.loads(storage.read_text(mpath))
            except (OSError, ValueError) as e:
                raise SourceError(f"{mpath}: unreadable manifest ({e})") from e
    else:
        rows, problems = _index_captions(root)

    names = _resolve_classes(format, classes, base, manifest)
    if format != "captions" and storage.is_file(base / "captions.jsonl"):
        rows, bad = _merge_captions(rows, base / "captions.jsonl")
        problems += bad
    background = _background_index(format, names)
    hint = {"voc": "voc", "ade20k": "ade20k"}.get(format) or manifest.get("palette_hint")
    if problems:
        log.warning("%s: %d row problem(s), e.g. %s", root, len(problems), problems[0])
    rows = rows.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA).sort_by(ID).combine_chunks()
    return SourceIndex(format, str(root), rows, names, hint if hint in ("voc", "ade20k") else None,
                       background, problems)


def _background_index(format: str, names: Sequence[str]) -> int | None:
    """The class left out of generated captions: VOC/folder's 0, a first class named like background."""
    if format in ("voc", "folder"):
        return 0
    if format == "ade20k" or not names:
        return None
    return 0 if names[0].lower() in _BACKGROUND_NAMES else None


def _read_classes(path: Location) -> list[str] | None:
    if not storage.is_file(path):
        return None
    return [ln.strip() for ln in storage.read_text(path).splitlines() if ln.strip()]


def _resolve_classes(format: str, classes: Sequence[str] | None, base: Location,
                     manifest: Mapping[str, Any]) -> list[str]:
    if classes is not None:
        return [str(c) for c in classes]
    from_file = _read_classes(base / "classes.txt")
    if from_file:
        return from_file
    if format == "voc":
        return list(VOC_CLASSES)
    if format == "ade20k":
        return list(ADE20K_CLASSES)
    if format == "parquet" and manifest.get("classes"):
        return [c["name"] if isinstance(c, Mapping) else str(c) for c in manifest["classes"]]
    if format == "captions":
        return []
    where = "manifest.json (classes) or classes.txt" if format == "parquet" else "classes.txt"
    raise SourceError(f"{base}: no class list ({where}); write classes.txt there (one name per line, "
                      "id 0 first) or name them in the config: source.classes=[background,cat,dog] "
                      "(real.classes=[...] for train)")


def iter_slices(table: pa.Table, max_rows: int) -> Iterable[pa.Table]:
    """Zero-copy slices of at most ``max_rows`` rows (one at least, for an empty table)."""
    for start in range(0, max(table.num_rows, 1), max_rows):
        yield table.slice(start, max_rows)
