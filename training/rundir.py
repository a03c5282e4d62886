"""Run and sweep directories on any file system: a local path or a URI (``s3://``, ``gs://``, ...).

Checkpoints are written by Ray Train itself (``RunConfig(storage_path, storage_filesystem)``
uploads each reported checkpoint). The small records the driver and the Train controller
write (config.yaml, metrics.csv, events.jsonl, final.json, ...) go through
:mod:`core.storage`: whole objects on an object store, temp + rename on a file system.
Directories that libraries can only write locally (``save_pretrained``, TensorBoard) are made in
a local temporary directory and copied up with ``pyarrow.fs.copy_files``; a model read from a
URI is copied down to a local cache once and loaded from there.

Local paths behave as before: resolved like ``pathlib.Path.resolve()``, same files, same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from core import storage
from core.config import ConfigError
from core.storage import Location


def locate(path: str | os.PathLike | Location, key: str = "path") -> Location:
    """``path`` → :class:`Location`; a local path is resolved as ``Path.resolve()`` did (its
    ``uri`` is that absolute path, so messages and final.json read as before). Bad paths or URIs
    raise :class:`ConfigError` naming ``key``."""
    if isinstance(path, Location):
        return path
    text = os.fspath(path)
    if text.strip() and "://" not in text:
        from pyarrow.fs import LocalFileSystem

        local = str(Path(text).expanduser().resolve())
        return Location(LocalFileSystem(), local, local)
    try:
        return storage.resolve(text, key)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None


def writable(path: str | os.PathLike | Location, key: str) -> Location:
    """:func:`locate`, then fail early (one line naming the URI) on a missing or forbidden bucket."""
    loc = locate(path, key)
    try:
        storage.check_writable_root(loc)
    except storage.StorageError as e:
        raise ConfigError(f"{key}: {e}") from None
    return loc


def read_json(loc: Location) -> Any | None:
    """A JSON file's content, or None when it does not exist."""
    try:
        return json.loads(storage.read_text(loc))
    except FileNotFoundError:
        return None


def write_json(loc: Location, obj: Any, indent: int = 1) -> None:
    """Whole and atomic (a sweep reads ``final.json`` as "this trial is done")."""
    storage.write_text(loc, json.dumps(obj, indent=indent))


def read_text(loc: Location) -> str | None:
    try:
        return storage.read_text(loc)
    except FileNotFoundError:
        return None


def append_text(loc: Location, text: str) -> None:
    """Append to a small log file: in place on a file system; an object is rewritten whole
    (objects cannot be appended to; these files hold one line per report or event)."""
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        with open(loc.path, "a", newline="") as f:
            f.write(text)
        return
    storage.write_text(loc, (read_text(loc) or "") + text)


def subdirs(loc: Location, prefix: str = "") -> list[Location]:
    """Directories directly under ``loc`` whose names start with ``prefix``, sorted by name."""
    from pyarrow.fs import FileType

    try:  # no permission, unreachable endpoint: one line naming the URI
        infos = list(storage.iter_file_infos(loc, recursive=False))
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None
    names = sorted(i.base_name for i in infos if i.type == FileType.Directory and i.base_name.startswith(prefix))
    return [loc.join(n) for n in names]


def upload_dir(local: str | Path, dest: Location) -> None:
    """Copy a local directory's files to ``dest`` (on a local ``dest``: a plain copy)."""
    from pyarrow import fs as pafs

    if dest.is_local:
        shutil.copytree(local, dest.path, dirs_exist_ok=True)
        return
    pafs.copy_files(str(local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)


def fetch_dir(path: str | Location) -> Path:
    """A local directory with ``path``'s files: the directory itself when local, else a copy in
    the node's model cache, made once per content (``core.storage.local_copy``)."""
    loc = locate(path, "checkpoint")
    if loc.is_local:
        return Path(loc.path)
    try:
        return Path(storage.local_copy(loc, "checkpoint", by_content=True))
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None

