"""Input checks that run before Ray starts: paths exist, have the layout their format expects
(with a hint when the path is one level off), buckets answer, and run directories are accepted
where a file inside one is meant (``aligndiff.bank=RUN``).

Every check returns one-line problems instead of raising, so ``--dry-run`` can list them all and
still print the plan; a real run raises the first one (exit 2 in the CLI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core import storage
from core.storage import Location, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """What a source format needs under its root: every name in ``needs`` (dirs end in ``/``)."""

    needs: tuple[str, ...]
    example: str


LAYOUTS = {
    "voc": Layout(("JPEGImages/",), "VOC2012/ holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/"),
    "ade20k": Layout(("images/", "annotations/"), "ADEChallengeData2016/ holding images/{training,validation}/, "
                     "annotations/{training,validation}/"),
    "coco": Layout(("images/", "annotations/"), "a COCO root holding images/{train2017,val2017}/ and annotations/ "
                   "(panoptic_*.json + PNG folders, or COCO-Stuff's {train2017,val2017}/*_labelTrainIds.png)"),
    "folder": Layout(("images/",), "a folder holding images/, masks/ and classes.txt"),
    "captions": Layout(("captions.jsonl",), "a folder holding captions.jsonl"),
}
# directory names a person may give instead of the root (one level too deep)
INNER_NAMES = {"JPEGImages", "SegmentationClass", "ImageSets", "images", "annotations", "masks"}


def _has(root: Location, name: str) -> bool:
    return storage.is_dir(root / name.rstrip("/")) if name.endswith("/") else storage.is_file(root / name)


def _layout_ok(root: Location, layout: Layout) -> bool:
    return all(_has(root, n) for n in layout.needs)


def _one_level_off(root: Location, layout: Layout) -> Location | None:
    """A child (``VOCdevkit/`` given, ``VOCdevkit/VOC2012/`` meant) or the parent
    (``VOC2012/JPEGImages/`` given) that has the expected layout."""
    if root.name in INNER_NAMES and root.parent.path and _layout_ok(root.parent, layout):
        return root.parent
    children = [c for c in _subdirs(root) if _layout_ok(c, layout)]
    return children[0] if len(children) == 1 else None


def _subdirs(root: Location) -> list[Location]:
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = root.fs.get_file_info(FileSelector(root.path, recursive=False))
    except Exception:  # noqa: BLE001 - a listing we cannot make gives no hint, not an error
        return []
    return sorted((Location(root.fs, i.path, root.uri.rstrip("/") + "/" + i.base_name) for i in infos
                   if i.type == FileType.Directory and not i.base_name.startswith(".")), key=lambda x: x.path)[:50]


def bucket_problem(loc: Location) -> str | None:
    """One line when ``loc`` is on an object store whose bucket does not answer."""
    try:
        storage.check_writable_root(loc)
    except StorageError as e:
        return str(e)
    return None


def source_problems(path: str | None, fmt: str, key: str = "source.path",
                    classes: list[str] | None = None) -> list[str]:
    """Problems of a source dataset given as ``key=path`` in format ``fmt`` (empty: none);
    a folder source also needs a class list (``classes`` or its classes.txt)."""
    if not path or not str(path).strip():
        return [f"{key}: required (a local directory or a URI such as s3://bucket/prefix)"]
    try:
        root = storage.resolve(path, key)
        if problem := bucket_problem(root):
            return [problem]
        if not storage.exists(root):
            return [f"{key}={path}: not found" + _sibling_hint(root, key)]
        if fmt == "parquet":
            return _parquet_problems(root, key, path)
        if fmt in ("captions", "images") and storage.is_file(root):  # a captions.jsonl / one image given as is
            return []
        if fmt == "images":
            return []
        layout = LAYOUTS.get(fmt)
        if layout is None or _layout_ok(root, layout):
            return _class_list_problems(root, fmt, classes)
        names = ", ".join(layout.needs)
        off = _one_level_off(root, layout)
        hint = f"; did you mean {key}={off.uri}? (one level {'up' if off.path == root.parent.path else 'down'})" \
            if off else ""
        return [f"{key}={path}: not a {fmt} dataset (no {names} inside; expected {layout.example}){hint}"]
    except StorageError as e:
        return [str(e)]


def _class_list_problems(root: Location, fmt: str, classes: list[str] | None) -> list[str]:
    """A folder source names its classes in classes.txt or the config (the index would refuse it
    after Ray started)."""
    if fmt != "folder" or classes:
        return []
    from pipelines.source_index import _resolve_classes
    from pipelines.sources import SourceError

    try:
        _resolve_classes(fmt, classes, root, {})
    except SourceError as e:
        return [str(e)]
    return []


def _parquet_problems(root: Location, key: str, path: str) -> list[str]:
    if storage.is_file(root) or storage.listdir(root / "shards", ".parquet") or storage.listdir(root, ".parquet"):
        return []
    return [f"{key}={path}: no .parquet files (expected a segfactory dataset with shards/, or .parquet files)"]


def _sibling_hint(root: Location, key: str) -> str:
    """``; did you mean KEY=...?`` when the parent holds a close name (a typo in the last part)."""
    import difflib

    parent = root.parent
    if not parent.path or not storage.is_dir(parent):
        return ""
    names = {c.name: c for c in _subdirs(parent)}
    close = difflib.get_close_matches(root.name, list(names), n=1, cutoff=0.75)
    return f"; did you mean {key}={names[close[0]].uri}?" if close else ""


def output_problems(path: str | None, key: str = "output.path") -> list[str]:
    """Problems of an output location: required, openable, its bucket answering."""
    if not path or not str(path).strip():
        return [f"{key}: required (a local directory or a URI such as s3://bucket/prefix)"]
    try:
        problem = bucket_problem(storage.resolve(path, key))
    except StorageError as e:
        return [str(e)]
    return [problem] if problem else []


def file_in_run(path: str, names: tuple[str, ...], key: str, what: str, suffix: str = "") -> tuple[str, list[str]]:
    """``key=RUN`` where a file inside a run directory is meant: (the file, problems).

    The file is the first of ``names`` found in the directory, else its only ``*suffix`` file;
    a file given as it is stays as it is."""
    try:
        loc = storage.resolve(path, key)
        if storage.is_file(loc):
            return path, []
        if not storage.is_dir(loc):
            return path, [f"{key}={path}: not found (give {what}, or the run directory holding it)"]
        for name in names:
            if storage.is_file(loc / name):
                return (loc / name).uri, []
        found = storage.listdir(loc, suffix) if suffix else []
        if len(found) == 1:
            return found[0].uri, []
        return path, [f"{key}={path}: a directory without {' or '.join(names)} (give {what}, or the run "
                      "directory of the command that writes it)"]
    except StorageError as e:
        return path, [str(e)]


# --- generate ------------------------------------------------------------------------------------

BANK_NAMES = ("bank.safetensors",)  # training.finetune's textual_inversion.bank_name default
BANK_WHAT = "the bank.safetensors of `segfactory finetune --config textual-inversion-*`"
PLACEHOLDER = "<not given>"


def check_generate(cfg):
    """(the config to run, problems, notes) of a generation config, before Ray starts.

    ``aligndiff.bank=RUN`` becomes ``RUN/bank.safetensors``. An empty ``source.path`` or
    ``output.path`` is a note (a dry run of a shipped config shows its plan; the run itself
    refuses them); an empty required bank is a problem, and the plan gets a placeholder."""
    from pipelines.graphs import get_graph

    problems: list[str] = []
    notes: list[str] = []
    for key, path, check in (("source.path", cfg.source.path, lambda: source_problems(cfg.source.path,
                                                                                     cfg.source.format,
                                                                                     classes=cfg.source.classes)),
                             ("output.path", cfg.output.path, lambda: output_problems(cfg.output.path))):
        if str(path or "").strip():
            problems += check()
        else:
            notes.append(f"{key}: not given (a run needs it: {key}=DIR or a URI)")
    if "aligndiff" in get_graph(cfg.pipeline).sections:
        cfg, bank_problems = _check_bank(cfg)
        problems += bank_problems
    return cfg, problems, notes


def _check_bank(cfg):
    bank = cfg.aligndiff.bank
    if not str(bank or "").strip():
        fixed = cfg.aligndiff.model_copy(update={"bank": PLACEHOLDER})
        return cfg.model_copy(update={"aligndiff": fixed}), [f"aligndiff.bank: required ({BANK_WHAT}, or its run "
                                                             "directory)"]
    path, problems = file_in_run(bank, BANK_NAMES, "aligndiff.bank", BANK_WHAT, ".safetensors")
    if not problems and (bad := _not_a_bank(path)):
        problems = [f"aligndiff.bank={bank}: {bad}"]
    if path != bank:
        log.info("aligndiff.bank: %s", path)
        cfg = cfg.model_copy(update={"aligndiff": cfg.aligndiff.model_copy(update={"bank": path})})
    return cfg, problems


def _not_a_bank(path: str) -> str | None:
    """Why ``path`` is not an embedding bank (safetensors with 'instances' metadata), or None."""
    import json

    try:
        data = storage.read_bytes(storage.resolve(path, "aligndiff.bank"))
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n]) if 0 < n < len(data) else None
    except (StorageError, ValueError, OSError) as e:
        return f"unreadable ({e})"
    if not isinstance(header, dict):
        return "not a safetensors file"
    if "instances" not in (header.get("__metadata__") or {}):
        return "a safetensors file without 'instances' metadata: not an embedding bank of textual inversion"
    return None
