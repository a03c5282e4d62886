"""Run and sweep directories on any file system: a local path or a URI (``s3://``, ``gs://``, ...).

One module for the run directory of ``train``, ``finetune`` and textual inversion: where it is
(:func:`locate`), its checkpoints (:func:`checkpoints`, :func:`checkpoint_name`), metrics.csv
(:func:`append_metrics`, :func:`truncate_metrics`; each command names its columns), the small
JSON/text records, and the Ray Train ``RunConfig`` that puts checkpoints in it
(:func:`run_config`). events.jsonl, TensorBoard and best/ are written by :mod:`training.runlog`.

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

import csv
import io
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



# --- checkpoints ------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint_"
STATE_FILE = "train_state.pt"  # in every checkpoint of every command: step (and optimizer state)


def checkpoint_name(step: int) -> str:
    """The checkpoint directory of a step (Ray Train's ``checkpoint_dir_name``)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoints(run_dir: str | os.PathLike | Location, marker: str = STATE_FILE) -> list[Location]:
    """Complete checkpoints of a run (those holding ``marker``), oldest first."""
    run = locate(run_dir, "output.path")
    return [c for c in subdirs(run, CHECKPOINT_PREFIX) if storage.is_file(c / marker)]


def write_config(run: Location, dump: dict[str, Any]) -> None:
    """``config.yaml``: the resolved config the run trains with."""
    import yaml

    storage.makedirs(run)
    storage.write_text(run / "config.yaml", yaml.safe_dump(dump, sort_keys=False))


# --- metrics.csv ------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike | Location) -> list[dict[str, str]]:
    """metrics.csv's rows ([] when there is none yet)."""
    text = read_text(locate(path))
    return list(csv.DictReader(io.StringIO(text, newline=""))) if text else []


def _csv_text(rows: list[dict[str, Any]], columns: list[str], header: bool) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns)
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def truncate_metrics(path: str | os.PathLike | Location, after_step: int, columns: list[str]) -> None:
    """Drop rows past ``after_step`` (a resumed or restarted run re-does those steps)."""
    loc = locate(path)
    kept = [r for r in read_rows(loc) if int(r["step"]) <= after_step]
    storage.write_text(loc, _csv_text(kept, columns, header=True))


def append_metrics(path: str | os.PathLike | Location, metrics: dict[str, Any], columns: list[str]) -> None:
    """Append one row (floats as ``%.6g``); a step at or before the last row (a restart) first
    drops the later rows."""
    loc = locate(path)
    rows = read_rows(loc)
    if not rows or int(rows[-1]["step"]) >= metrics["step"]:
        truncate_metrics(loc, metrics["step"] - 1, columns)
    row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items() if k in columns}
    append_text(loc, _csv_text([row], columns, header=False))


# --- Ray Train ----------------------------------------------------------------------------------


def run_config(run_dir: str | os.PathLike | Location, *, max_failures: int, keep: int, callbacks=(), **kwargs):
    """Ray Train's ``RunConfig`` with its storage in ``run_dir`` (checkpoints land in it; on a
    URI Ray Train uploads them through the run directory's pyarrow file system)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    run = locate(run_dir, "output.path")
    where = {} if run.is_local else {"storage_filesystem": run.fs}  # local: Ray resolves the path itself
    return RunConfig(name=run.name, storage_path=run.parent.path, **where,
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=list(callbacks), **kwargs)
