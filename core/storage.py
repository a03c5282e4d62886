"""Every path a user gives, local or a URI, resolved once to a ``pyarrow.fs`` file system.

``resolve("s3://bucket/data")``, ``resolve("/mnt/data")``, ``resolve("file:///mnt/data")``,
``gs://``, ``abfs://``, ``hdfs://``: one :class:`Location` (file system + path in it + the text
the user gave, for messages), and small helpers the rest of the code uses instead of
``pathlib``. Local behaviour and bytes are what ``pathlib``/``pq.write_table`` gave before.

Why ``pyarrow.fs`` and not fsspec: Ray Data's readers and writers and Ray Train's
``RunConfig(storage_filesystem=...)`` take a ``pyarrow.fs.FileSystem``; Parquet reads/writes go
through the same object (no double buffering via an fsspec wrapper); ``from_uri`` covers the
schemes we document, honours ``AWS_ENDPOINT_URL``/standard credentials, and pickles to workers.

Atomicity: on a file system (local, HDFS) a file is written under a temporary name and renamed,
so a reader never sees half a file. On an object store (S3, GCS, Azure) an object becomes visible
only when its upload completes (S3 PutObject / CompleteMultipartUpload, GCS/Azure commits), so
it is written whole under its final key: no rename (which object stores do as copy + delete).
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OBJECT_STORES = {"s3", "gcs", "abfs"}  # pyarrow type_name of file systems without atomic rename
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file", "local")


class StorageError(ValueError):
    """A path or URI that cannot be used (unknown scheme, missing bucket, no permission...).

    One line naming the URI; the CLI maps it to exit 2.
    """


@dataclass(frozen=True)
class Location:
    """A file or directory: ``fs`` + ``path`` inside it; ``uri`` is what to show a person."""

    fs: Any  # pyarrow.fs.FileSystem (typed loosely so importing this module stays cheap)
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    @property
    def is_object_store(self) -> bool:
        return self.fs.type_name in OBJECT_STORES

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), _parent_uri(self.uri))

    def join(self, *parts: str) -> Location:
        """A child location (``/``-joined; works the same on every file system)."""
        parts = tuple(str(p).strip("/") for p in parts if str(p))
        if not parts:
            return self
        return Location(self.fs, posixpath.join(self.path, *parts), self.uri.rstrip("/") + "/" + "/".join(parts))

    def __truediv__(self, part: str) -> Location:
        return self.join(part)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """Only local locations are OS paths (``open(loc)``, ``Path(loc)``)."""
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path


def _parent_uri(uri: str) -> str:
    head, sep, _ = uri.rstrip("/").rpartition("/")
    return head if sep else "."


def resolve(path: str | os.PathLike | Location, what: str = "path") -> Location:
    """``path`` (local path or URI) → :class:`Location`; ``what`` names the key in errors.

    Raises :class:`StorageError` for an empty path, an unknown scheme or a file system this
    pyarrow build cannot open (e.g. GCS without GCS support).
    """
    if isinstance(path, Location):
        return path
    text = os.fspath(path) if not isinstance(path, str) else path
    if not text or not text.strip():
        raise StorageError(f"{what}: required (a local path or a URI such as s3://bucket/prefix)")
    from pyarrow import fs as pafs

    if "://" not in text:
        local = os.path.abspath(os.path.expanduser(text))
        return Location(pafs.LocalFileSystem(), local, text)
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{what}={text}: unknown URI scheme {scheme!r}; use a local path or one of "
                           "s3://, gs://, abfs://, hdfs://, file://")
    try:
        fs, inner = pafs.FileSystem.from_uri(text)
    except Exception as e:  # ArrowInvalid (bad URI), ArrowNotImplemented (not built in), OSError
        raise StorageError(f"{what}={text}: cannot open ({_one_line(e)})") from None
    if fs.type_name in OBJECT_STORES and not inner.strip("/"):
        raise StorageError(f"{what}={text}: names no bucket (expected {scheme}://bucket/prefix)")
    return Location(fs, inner.rstrip("/") or inner, text)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) < 300 else text[:297] + "..."


def _info(loc: Location):
    try:
        return loc.fs.get_file_info(loc.path)
    except Exception as e:  # OSError from the store: no permission, unreachable endpoint
        raise StorageError(f"{loc.uri}: cannot access ({_one_line(e)})") from None


def exists(loc: Location) -> bool:
    from pyarrow.fs import FileType

    return _info(loc).type != FileType.NotFound


def is_dir(loc: Location) -> bool:
    from pyarrow.fs import FileType

    return _info(loc).type == FileType.Directory


def is_file(loc: Location) -> bool:
    from pyarrow.fs import FileType

    return _info(loc).type == FileType.File


def size(loc: Location) -> int:
    return int(_info(loc).size or 0)


def check_writable_root(loc: Location) -> None:
    """Fail early, naming the URI, when an object store's bucket is missing or not ours.

    (A local or HDFS directory is simply created.) pyarrow's S3 client retries an
    unreachable endpoint for a while before this raises; the message names the URI either way.
    """
    if not loc.is_object_store:
        return
    from pyarrow.fs import FileType

    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except Exception as e:
        raise StorageError(f"{loc.uri}: bucket {bucket!r} unreachable or access denied ({_one_line(e)})") from None
    if info.type == FileType.NotFound:
        raise StorageError(f"{loc.uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


def listdir(loc: Location, suffix: str = "", recursive: bool = False) -> list[Location]:
    """Files under a directory (sorted by path; hidden names skipped; ``[]`` if it is missing)."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = loc.fs.get_file_info(FileSelector(loc.path, recursive=recursive, allow_not_found=True))
    except Exception as e:
        raise StorageError(f"{loc.uri}: cannot list ({_one_line(e)})") from None
    out = []
    for info in infos:
        rel = info.path[len(loc.path):].lstrip("/")
        if info.type != FileType.File or any(p.startswith(".") for p in rel.split("/")):
            continue
        if info.path.endswith(suffix):
            out.append(loc.join(rel))
    return sorted(out, key=lambda x: x.path)


def iter_file_infos(loc: Location, recursive: bool = True) -> Iterator[Any]:
    """Raw ``pyarrow.fs.FileInfo`` of every entry under ``loc`` (for listings of many files)."""
    from pyarrow.fs import FileSelector

    try:
        yield from loc.fs.get_file_info(FileSelector(loc.path, recursive=recursive, allow_not_found=True))
    except Exception as e:
        raise StorageError(f"{loc.uri}: cannot list ({_one_line(e)})") from None


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            raise FileNotFoundError(f"{loc.uri}: not found") from None
        raise StorageError(f"{loc.uri}: cannot read ({_one_line(e)})") from None


def read_text(loc: Location, encoding: str = "utf-8") -> str:
    return read_bytes(loc).decode(encoding)


def makedirs(loc: Location) -> None:
    """Create a directory (no-op on object stores, where prefixes need no creating)."""
    if not loc.is_object_store:
        loc.fs.create_dir(loc.path, recursive=True)


def _temp_of(loc: Location) -> Location:
    return loc.parent.join(f".{loc.name}.tmp")


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole file atomically (temp + rename on file systems; one PUT on object stores)."""
    if loc.is_object_store:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    makedirs(loc.parent)
    tmp = _temp_of(loc)
    with tmp.fs.open_output_stream(tmp.path) as f:
        f.write(data)
    loc.fs.move(tmp.path, loc.path)


def write_text(loc: Location, text: str, encoding: str = "utf-8") -> None:
    write_bytes(loc, text.encode(encoding))


def write_parquet(table, loc: Location, **kwargs: Any) -> None:
    """``pq.write_table`` made atomic (see the module docstring); same bytes as before locally."""
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    if loc.is_object_store:
        pq.write_table(table, loc.path, filesystem=loc.fs, **kwargs)
        return
    makedirs(loc.parent)
    tmp = _temp_of(loc)
    pq.write_table(table, tmp.path, filesystem=tmp.fs, **kwargs)
    loc.fs.move(tmp.path, loc.path)


def remove(loc: Location, missing_ok: bool = True) -> None:
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as e:
        if not (missing_ok and "not found" in str(e).lower()):
            raise


def remove_tree(loc: Location) -> None:
    """A directory and everything in it (gone already is fine)."""
    if exists(loc):
        loc.fs.delete_dir(loc.path)


def local_path(loc: Location) -> str | None:
    """The OS path of a local location, else None (for code that needs a real file)."""
    return loc.path if loc.is_local else None


def iter_lines(loc: Location, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a file (without line ends), read in chunks: a 10-million-line file is
    never held whole in memory."""
    try:
        f = loc.fs.open_input_stream(loc.path)
    except Exception as e:
        if isinstance(e, FileNotFoundError) or "not found" in str(e).lower():
            raise FileNotFoundError(f"{loc.uri}: not found") from None
        raise StorageError(f"{loc.uri}: cannot read ({_one_line(e)})") from None
    with f:
        rest = b""
        while chunk := f.read(chunk_bytes):
            lines = (rest + chunk).splitlines(keepends=True)
            # hold back an unfinished last line (and a lone "\r" that may be half of "\r\n")
            rest = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
            for line in lines:
                yield line.rstrip(b"\r\n")
        if rest:
            yield rest


@functools.lru_cache(maxsize=16)
def _root_fs(root: str):
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(root)


def resolve_file(path: str) -> Location:
    """Like :func:`resolve` for the many files of one source (a worker reading rows): the file
    system of each ``scheme://authority`` is made once per process, not once per file."""
    if "://" not in path:
        return resolve(path)
    scheme, rest = path.split("://", 1)
    if scheme.lower() in ("file", "local"):
        return resolve(path)
    authority, slash, key = rest.partition("/")
    try:
        fs, inner = _root_fs(f"{scheme}://{authority}")
    except Exception as e:
        raise StorageError(f"{path}: cannot open ({_one_line(e)})") from None
    return Location(fs, inner.rstrip("/") + "/" + key if slash else inner, path)


def model_cache_dir() -> str:
    """Where :func:`local_copy` keeps models fetched from object storage (one copy per node)."""
    return os.environ.get("SEGFACTORY_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "segfactory", "models")


def local_copy(path: str | Location, what: str = "local_path", by_content: bool = False) -> str:
    """``path`` itself when it is local; for a URI (a model folder or checkpoint file on object
    storage) a copy in :func:`model_cache_dir`, fetched once per node: the actors of a pool share
    it through a file lock, and a ``.complete`` marker makes a half-fetched copy invisible.
    ``by_content``: the copy is keyed by the files' sizes and times too (a run's ``best/`` or a
    checkpoint that may be rewritten under the same URI), not by the URI alone."""
    src = resolve(path, what)
    if src.is_local:
        return src.path
    import hashlib
    import json

    from filelock import FileLock
    from pyarrow import fs as pafs

    key = [src.uri]
    if by_content:
        files = sorted((i.path, i.size, i.mtime_ns) for i in iter_file_infos(src) if i.type == pafs.FileType.File)
        if not files:
            raise StorageError(f"{what}={src.uri}: no files there")
        key += files
    name = f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}-{src.name or 'model'}"
    dest = os.path.join(model_cache_dir(), name)
    marker = dest + ".complete"
    if os.path.exists(marker):
        return dest
    os.makedirs(model_cache_dir(), exist_ok=True)
    with FileLock(dest + ".lock"):
        if os.path.exists(marker):  # another actor on this node fetched it meanwhile
            return dest
        if not exists(src):
            raise StorageError(f"{what}={src.uri}: not found")
        tmp = dest + ".partial"
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)
        log.info("fetching %s into %s", src.uri, dest)
        if is_dir(src):  # pyarrow makes the sub-folders, not the top one
            os.makedirs(tmp)
        try:
            pafs.copy_files(src.path, tmp, source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem(),
                            use_threads=True)
        except Exception as e:
            raise StorageError(f"{what}={src.uri}: cannot fetch ({_one_line(e)})") from None
        os.replace(tmp, dest)
        open(marker, "w").close()
    return dest
