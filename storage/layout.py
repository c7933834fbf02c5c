"""On-disk layout of a cache and the file operations that make commits atomic.

    <root>/manifest.json            written atomically at create, rewritten by finalize()
    <root>/parts/<part>/...         a part's data (moved here by rename when complete)
    <root>/status/<part>.json       the part's commit marker: files, sizes, sha256, counts, report
    <root>/tmp/<part>/<uuid>/       a part being written (discarded when the part is reopened)

A part is visible to readers iff its marker exists. The marker is written last (tmp file, fsync,
os.replace), after the data directory has been renamed into place, so a crash at any point
leaves either no marker (part absent; rewriting it discards the leftovers) or a complete part.

On an object store (root an fsspec URL, storage/objstore.py) there is no rename and no tmp/: a
part is written to a local staging folder, its data objects are uploaded to parts/<part>/ and
checked, and the marker is written last (one PUT). Objects of an attempt that died before its
marker are invisible (no marker) and removed when the part is reopened.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .objstore import Url
from .schema import CacheError, check_part_name

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
STATUS_DIR = "status"
TMP_DIR = "tmp"
MARKER_VERSION = 1


def fsync_enabled() -> bool:
    """fsync makes a commit survive power loss, not just a crash; TEC_CACHE_FSYNC=0 skips it
    (scratch file systems, tests). Atomicity against killed writers does not depend on it."""
    return os.environ.get("TEC_CACHE_FSYNC", "1") != "0"


def manifest_path(root: Path) -> Path:
    return root / MANIFEST


def part_dir(root: Path, part: str) -> Path:
    return root / PARTS_DIR / check_part_name(part)


def marker_path(root: Path, part: str) -> Path:
    return root / STATUS_DIR / (check_part_name(part) + ".json")


def part_tmp_root(root: Path, part: str) -> Path:
    if isinstance(root, Url):  # parts of an object-store cache are staged on local disk
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        base = os.environ.get("TEC_STAGING_DIR") or os.path.join(tempfile.gettempdir(),
                                                                 "tec-staging")
        return Path(base, digest, check_part_name(part))
    return root / TMP_DIR / check_part_name(part)


def new_part_tmp(root: Path, part: str) -> Path:
    d = part_tmp_root(root, part) / uuid.uuid4().hex
    d.mkdir(parents=True)
    return d


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: renames into it) unless TEC_CACHE_FSYNC=0."""
    if fsync_enabled() and not isinstance(path, Url):
        fsync_directory(path)


def fsync_directory(path: Path) -> None:
    """fsync a directory; file systems that cannot (or a missing folder) are not an error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps_readable(obj, width: int = 100, _level: int = 0) -> str:
    """JSON with one line per entry where the whole entry does not fit in `width` columns."""
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or len(flat) + _level <= width:
        return flat
    pad, inner = " " * _level, " " * (_level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(str(k))}: {dumps_readable(v, width, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + dumps_readable(v, width, _level + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a hidden temporary file beside local ``path`` for writing; on a clean exit it is
    flushed, fsynced (unless TEC_CACHE_FSYNC=0) and renamed over ``path``, so readers see the
    old file or the new one, never a partial one. On an error it is removed and ``path`` is left
    as it was. The folder is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync_enabled():
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never a partial one
    (:func:`atomic_file`; an object store's PUT replaces an object atomically)."""
    if isinstance(path, Url):
        path.write_text(text)
        return
    with atomic_file(path) as f:
        f.write(text)


JSON_STYLES = ("readable", "compact", "sorted")


def dumps_json(obj, style: str = "readable") -> str:
    """``obj`` as JSON text with a final newline. style: 'readable' (:func:`dumps_readable`),
    'compact' (no spaces), 'sorted' (indent 2, keys sorted: byte-stable for reports)."""
    if style == "readable":
        text = dumps_readable(obj)
    elif style == "compact":
        text = json.dumps(obj, separators=(",", ":"))
    elif style == "sorted":
        text = json.dumps(obj, indent=2, sort_keys=True)
    else:
        raise ValueError(f"JSON style {style!r} is not one of {', '.join(JSON_STYLES)}")
    return text + "\n"


def write_json_atomic(path: Path, obj, *, style: str = "readable") -> None:
    """Write ``obj`` as JSON (:func:`dumps_json` ``style``) with :func:`write_text_atomic`."""
    write_text_atomic(path, dumps_json(obj, style))


def read_json(path: Path, what: str):
    try:
        if isinstance(path, Url):
            return json.loads(path.read_bytes())
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CacheError(f"{what} {path} is unreadable ({type(e).__name__}: {e}); "
                         f"run `tec cache verify`") from None


def file_sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with (path.open("rb") if isinstance(path, Url) else open(path, "rb")) as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def list_files(directory: Path) -> list[str]:
    """Relative paths (posix) of all regular files under directory, sorted."""
    if isinstance(directory, Url):
        return directory.find()
    out = []
    for dirpath, _, files in os.walk(directory):
        for name in files:
            out.append(Path(dirpath, name).relative_to(directory).as_posix())
    return sorted(out)


def fsync_tree(directory: Path) -> None:
    if not fsync_enabled():
        return
    for dirpath, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def remove_tree(path: Path) -> None:
    if isinstance(path, Url):
        path.rmtree()
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class HashingWriter:
    """A binary file being appended to, with its sha256 and size kept as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb", buffering=1 << 20)
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._f.write(data)
        self._h.update(data)
        n = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            if fsync_enabled():
                os.fsync(self._f.fileno())
            self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def commit_part_dir(root: Path, part: str, tmp: Path, marker: dict) -> None:
    """Move a finished part into place, then write its marker (the commit point)."""
    if isinstance(root, Url):
        _upload_part(root, part, tmp, marker)
        return
    final = part_dir(root, part)
    final.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(tmp)
    if final.exists():
        # leftover of an earlier attempt that died between rename and marker (never visible)
        remove_tree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    write_json_atomic(marker_path(root, part), marker)
    # the per-part tmp root is empty now
    try:
        part_tmp_root(root, part).rmdir()
    except OSError:
        pass


def _upload_part(root: Url, part: str, tmp: Path, marker: dict) -> None:
    """Object-store commit: leftovers of a dead attempt removed, every data object uploaded and
    its size checked, then the marker written (the commit point), then the staging folder
    removed. No rename: until the marker exists readers do not look at parts/<part>/."""
    final = part_dir(root, part)
    remove_tree(final)
    files = marker.get("files", {})
    for rel in sorted(files):
        final.put_file(tmp / rel, rel)
    for rel, info in sorted(files.items()):
        size = (final / rel).stat().st_size
        if size != info.get("bytes"):
            raise CacheError(f"part {part} of {root}: uploaded {rel} is {size} bytes, expected "
                             f"{info.get('bytes')}; the part is not committed, rerun to resume")
    write_json_atomic(marker_path(root, part), marker)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        part_tmp_root(root, part).rmdir()
    except OSError:
        pass


def pread(handle, n: int, offset: int) -> bytes:
    """n bytes at offset of an open file: an os file descriptor, or an object-store Url (one
    ranged GET; thread- and fork-safe: no shared file position)."""
    if isinstance(handle, Url):
        return handle.read_range(offset, n)
    return os.pread(handle, n, offset)
