"""Image sources: shard readers (WebDataset tars, image folders) and the image decoder.

A source splits its samples into *shards* (the unit of work and of a cache part). For every shard
it can say cheaply how many candidate samples it holds (`count`, from tar headers or a directory
listing, without reading image data) and stream them (`samples`) in a stable order, so a sample's
position in its shard is its slot in the cache. Damage never raises from `samples`: a sample that
cannot be read is yielded with `error` set, and `samples(shard)` yields exactly `count(shard)`
items.

`decode_image` turns encoded bytes into uint8 RGB pixels or raises `BadSample(reason)`; callers
skip and report such samples.

Security: members with pickle extensions (.pyd, .pickle, .pkl, .pth) are never unpickled (they
are ignored with a warning), image formats are restricted to an allow-list (no EPS/Ghostscript
etc.), and image sizes are checked from the header before any pixel data is decoded.
"""

from __future__ import annotations

import collections
import glob
import io
import logging
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PICKLE_EXTENSIONS",
    "BadSample",
    "ShardSpecError",
    "MissingShardsError",
    "Sample",
    "expand_shards",
    "decode_image",
    "WebDatasetSource",
    "TarGroup",
    "group_tar_members",
    "ImageFolderSource",
    "open_source",
    "folder_key",
    "unique_keys",
]

# PIL's own default limit (Image.MAX_IMAGE_PIXELS), about 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Formats PIL may identify. MPO is how PIL reports many camera JPEGs.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
# Field extensions that hold the image, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Extensions whose loaders would unpickle: never read.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth"})
# Files an ImageFolderSource picks up (lower-case suffixes).
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class BadSample(Exception):
    """A sample that cannot become an image; `reason` is a short one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ShardSpecError(ValueError):
    """A shard specification that names no usable shards (one line, naming the pattern)."""


class MissingShardsError(ShardSpecError, FileNotFoundError):
    """Named shard files do not exist (both a ValueError and a FileNotFoundError)."""


@dataclass
class Sample:
    """One candidate sample of a shard.

    key: stable sample key (WebDataset convention / relative path without extension).
    data: encoded image bytes, or None when `error` is set.
    label: class index, -1 when unknown.
    error: why the sample cannot be used (None = readable; decoding may still fail).
    """

    key: str
    data: bytes | None
    label: int = -1
    error: str | None = None


# ----------------------------------------------------------------------------- shard specs


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec to a list of existing files.

    spec: a path, a brace pattern ("train-{000000..001023}.tar"), a glob ("train-*.tar"), a
    directory (all *.tar directly inside, sorted), several of these joined by "::", or a list.
    Order: as written (brace order, sorted glob/directory matches); duplicates (the same file
    by another path too) dropped.
    Raises ShardSpecError (a ValueError) if a pattern matches nothing, MissingShardsError (a
    ShardSpecError and a FileNotFoundError) if a literal or brace-expanded path does not exist.
    """
    import braceexpand  # a webdataset dependency

    items: list[str]
    if isinstance(spec, (str, os.PathLike)):
        items = [p for p in str(spec).split("::") if p]
    else:
        items = [str(p) for p in spec]
    if not items:
        raise ShardSpecError(
            f"empty shard specification {spec!r}; give a path, directory, glob or brace pattern"
        )

    out: list[str] = []
    for item in items:
        if is_url(item):  # shards on an object store (s3://bucket/train-{0000..0099}.tar)
            out.extend(_expand_url(item))
            continue
        pattern = os.path.expanduser(item)
        matched: list[str] = []
        missing: list[str] = []
        for path in braceexpand.braceexpand(pattern):
            if glob.has_magic(path):
                matched.extend(sorted(glob.glob(path)))
            elif os.path.isdir(path):
                matched.extend(sorted(str(p) for p in Path(path).glob("*.tar") if p.is_file()))
            elif os.path.exists(path):
                matched.append(path)
            else:
                missing.append(path)
        if missing:
            raise MissingShardsError(
                f"{len(missing)} shard(s) named by {item!r} do not exist (first: {missing[0]}); "
                "check the path"
            )
        if not matched:
            raise ShardSpecError(
                f"shard pattern {item!r} matches no files; check the path or pattern"
            )
        out.extend(matched)
    # one file named twice (a relative and an absolute path, a link) is one shard: the first name
    first: dict[str, str] = {}
    for path in out:
        first.setdefault(path if is_url(path) else os.path.realpath(path), path)
    return list(first.values())


def is_url(path) -> bool:
    from storage.objstore import is_url as _is_url

    return _is_url(path)


def _expand_url(item: str) -> list[str]:
    """An object-store shard spec -> object URLs (braces expanded; a glob or a prefix listed)."""
    import braceexpand

    from storage.objstore import Url, call, filesystem

    fs, _ = filesystem(item)
    proto = item.split("://", 1)[0]
    matched: list[str] = []
    missing: list[str] = []
    for url in braceexpand.braceexpand(item):
        key = filesystem(url)[1]
        if glob.has_magic(key):
            matched.extend(f"{proto}://{k.lstrip('/')}" for k in sorted(call(url, fs.glob, key)))
        elif call(url, fs.isdir, key):
            matched.extend(str(Url(url) / k.rsplit("/", 1)[-1]) for k in
                           sorted(call(url, fs.ls, key, detail=False)) if k.endswith(".tar"))
        elif call(url, fs.exists, key):
            matched.append(url)
        else:
            missing.append(url)
    if missing:
        raise MissingShardsError(
            f"{len(missing)} shard(s) named by {item!r} do not exist (first: {missing[0]}); "
            "check the path")
    if not matched:
        raise ShardSpecError(f"shard pattern {item!r} matches no objects; check the URL or pattern")
    return matched


def _open_shard(shard: str):
    """A shard for reading: a local file, or an object read through fsspec (buffered ranged
    reads, seekable, so tarfile walks its headers as on disk)."""
    if is_url(shard):
        from storage.objstore import Url

        return Url(shard).open("rb", block_size=8 << 20)
    return open(shard, "rb")


def _file_size(f) -> int:
    size = getattr(f, "size", None)  # fsspec file objects know their size
    return int(size) if isinstance(size, int) else os.fstat(f.fileno()).st_size


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB pixels [H, W, 3] (EXIF orientation applied).

    Mode handling: L/1 replicated to 3 channels; P converted through its palette; CMYK/YCbCr
    converted by PIL; 16-bit grayscale (I;16*, I) scaled 0..65535 -> 0..255 with rounding;
    F clipped to 0..255. Alpha (RGBA, LA, P with transparency) is composited onto white, so
    transparent regions do not show whatever colour happens to be stored under them.
    Truncated data is an error (PIL's LOAD_TRUNCATED_IMAGES is never consulted as a way out).
    max_pixels: images with more pixels are rejected from the header, before decoding. PIL's
    own bomb limit (2 x Image.MAX_IMAGE_PIXELS) still applies above that.
    Raises BadSample(reason).
    """
    if data is None or len(data) == 0:
        raise BadSample("empty data (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except UnidentifiedImageError:
        raise BadSample(
            f"not an image in an allowed format ({len(data)} bytes, first bytes {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise BadSample(f"too many pixels (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise BadSample(f"corrupt image header: {_one_line(exc)}") from None

    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise BadSample(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise BadSample(
                f"too many pixels: {width}x{height} > max_pixels {max_pixels} "
                "(decompression bomb guard)"
            )
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise BadSample(f"too many pixels (decompression bomb guard): {exc}") from None
        except (
            OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error, MemoryError
        ) as exc:
            raise BadSample(f"corrupt image data: {_one_line(exc)}") from None
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # a broken EXIF block should not cost an otherwise good image
            logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        try:
            return _to_rgb_array(img)
        except (OSError, ValueError) as exc:
            raise BadSample(f"unsupported image mode {img.mode!r}: {_one_line(exc)}") from None


def _allowed_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this PIL build can open (plugins such as MPO register lazily)."""
    global _ALLOWED_OPENABLE
    if _ALLOWED_OPENABLE is None:
        Image.init()
        _ALLOWED_OPENABLE = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
    return _ALLOWED_OPENABLE


_ALLOWED_OPENABLE: tuple[str, ...] | None = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in ("P", "RGB", "L") and "transparency" in img.info):
        arr = _composite_on_white(np.asarray(img.convert("RGBA")))
    elif mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("L", "1"):
        arr = np.repeat(np.asarray(img.convert("L"))[:, :, None], 3, axis=2)
    elif mode in _UINT16_MODES or mode == "I":
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "F":
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        arr = np.asarray(img.convert("RGB"))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"conversion gave {arr.dtype} {list(arr.shape)}")
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3]: rgb * a + 255 * (1 - a), exact integer rounding."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------- WebDataset


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = path up to the first dot of the basename, field = the rest."""
    dirname, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0 or dot == len(base) - 1:
        return None
    key = posixpath.join(dirname, base[:dot]) if dirname else base[:dot]
    return key, base[dot + 1 :].lower()


@dataclass
class TarGroup:
    """Tar members of one sample (consecutive members sharing a key): fields by extension, the
    preferred image field, and the error that makes it a bad sample (None when readable)."""

    key: str
    fields: dict[str, tarfile.TarInfo]
    error: str | None = None
    image_field: str | None = None


def _parse_label(raw: bytes | None) -> int:
    if raw is None:
        return -1
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1


class WebDatasetSource:
    """WebDataset tar shards (uncompressed .tar): samples are consecutive members sharing a key.

    pattern: anything expand_shards accepts. image_extensions: field names that hold the image,
    in order of preference. Labels come from the '.cls' field (int; -1 when absent or not an int).
    Shard ids are the shard file paths, sorted.

    Candidates are the samples with an image field. Damage is reported, never raised:
    - a key seen earlier in the shard (or a field repeated within a sample): error 'duplicate key';
    - a tar cut (or corrupt) part-way: samples before the damage are yielded normally, then the
      sample at the damage (the cut member's, or the last one before a cut header, which may have
      lost fields) with error 'truncated tar shard: ...'; a file that is not a tar at all is a
      single error sample 'unreadable tar shard: ...';
    - pickle fields (.pth, .pkl, .pickle, .pyd) are skipped, never loaded (warned once per source).
    """

    kind = "webdataset"

    def __init__(
        self, pattern: str | Sequence[str], *, image_extensions: Sequence[str] = IMAGE_EXTENSIONS
    ) -> None:
        self.pattern = pattern
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self._shards = sorted(expand_shards(pattern))
        self._warned_pickle = False

    def shards(self) -> list[str]:
        return list(self._shards)

    def describe(self) -> dict[str, Any]:
        """Source fingerprint for a cache manifest (kind and shard list)."""
        return {"kind": self.kind, "shards": self.shards()}

    def count(self, shard: str) -> int:
        """Candidate samples in `shard` (== number of items samples(shard) yields); headers only."""
        return self.scan(shard)[0]

    def scan(self, shard: str) -> tuple[int, list[str]]:
        """(candidate samples, keys of the candidates without a header-level error) of `shard`,
        from tar headers only: what :func:`unique_keys` needs to spot keys repeated across
        shards."""
        count, keys = 0, []
        with _open_shard(shard) as f:
            for group in self._groups(shard, f, log=False):
                count += 1
                if group.error is None:
                    keys.append(group.key)
        return count, keys

    def samples(self, shard: str) -> Iterator[Sample]:
        """Candidate samples of `shard` in tar order; unreadable ones carry `error` (never raises
        for damaged data). A key seen earlier in the shard is yielded with error 'duplicate key'."""
        with _open_shard(shard) as f:
            tar: tarfile.TarFile | None = None
            for group, tar in self._groups(shard, f, with_tar=True):
                if group.error is not None:
                    yield Sample(group.key, None, -1, group.error)
                    continue
                try:
                    data = self._read(tar, group.fields[group.image_field])
                    label = (_parse_label(self._read(tar, group.fields["cls"]))
                             if "cls" in group.fields else -1)
                except (OSError, tarfile.TarError, EOFError) as exc:
                    yield Sample(group.key, None, -1, f"unreadable tar member: {_one_line(exc)}")
                    continue
                yield Sample(group.key, data, label, None)

    @staticmethod
    def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        handle = tar.extractfile(member)
        if handle is None:
            raise tarfile.ReadError(f"member {member.name} is not a regular file")
        with handle:
            return handle.read()

    def _groups(self, shard: str, f, *, with_tar: bool = False, log: bool = True) -> Iterator[Any]:
        """:func:`group_tar_members` of an open shard (damage marked on the samples); yields
        the groups, or (group, TarFile) pairs when with_tar.

        log: report damage and skipped members (samples() does; count() stays quiet)."""
        def pickle_warning(member: str) -> None:
            if log and not self._warned_pickle:
                logger.warning("shard %s: ignoring member %s; pickle-based fields are never loaded",
                               shard, member)
                self._warned_pickle = True

        for group, tar in group_tar_members(f, shard, image_extensions=self.image_extensions,
                                            mark_damage=True, log=log, on_pickle=pickle_warning):
            yield (group, tar) if with_tar else group


def group_tar_members(f, shard: str, *, image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
                      mark_damage: bool = True, log: bool = True,
                      on_pickle: Callable[[str], None] | None = None,
                      ) -> Iterator[tuple[TarGroup, tarfile.TarFile | None]]:
    """The samples of an open tar shard ``f`` (``shard``: its name, for messages): consecutive
    regular members sharing a key, from the tar headers only. Yields (TarGroup, TarFile) in tar
    order; the one grouping of stage 1's :class:`WebDatasetSource` and stage 2's source index.

    A sample without an image field (``image_extensions``, in order of preference) is skipped
    unless it carries an error; a key seen earlier in the shard (or a field repeated within a
    sample) gets error 'duplicate key'. Pickle fields (.pth, .pkl, .pickle, .pyd) are passed
    over (``on_pickle(member name)`` is called for each). Damage ends the walk; what it does to
    the samples is ``mark_damage``:

    - True: a file that is not a tar is one error sample ``<name>@0`` 'unreadable tar shard'
      (TarFile None); the sample at a cut member, or the last one before a cut or corrupt header
      or a missing end-of-archive marker (it may have lost fields), carries 'truncated tar
      shard: ...'.
    - False: a file that is not a tar raises tarfile.TarError; the samples keep the members they
      have, a cut member included: the caller checks byte ranges against the file size.

    log: warn about damage and skipped samples (else they go to the debug log).
    """
    warn = logger.warning if log else logger.debug
    size = _file_size(f)
    shard_name = os.path.basename(shard)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if not mark_damage:
            raise
        hint = (" (compressed shards are not supported; decompress them)"
                if shard_name.endswith((".gz", ".tgz")) else "")
        group = TarGroup(f"{shard_name}@0", {}, f"unreadable tar shard: {_one_line(exc)}{hint}")
        warn("shard %s: %s", shard, group.error)
        yield group, None
        return

    seen: set[str] = set()
    current: TarGroup | None = None
    skipped_no_image = 0

    def close(group: TarGroup | None) -> TarGroup | None:
        nonlocal skipped_no_image
        if group is None:
            return None
        group.image_field = next((e for e in image_extensions if e in group.fields), None)
        duplicate = group.key in seen
        seen.add(group.key)
        if group.error is None and group.image_field is None:
            skipped_no_image += 1
            return None
        if duplicate and group.error is None:
            group.error = "duplicate key (an earlier sample of this shard has the same key)"
        return group

    with tar:
        end_offset = 0
        tail_error: str | None = None
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError):
                member = None  # read past the end of a cut member, or a corrupt header: see below
            if member is None:
                if mark_damage:
                    tail_error = _tail_error(f, size, end_offset)
                break
            end_offset = member.offset_data + member.size
            cut = None
            if end_offset > size:
                have = max(0, size - member.offset_data)
                cut = (f"truncated tar shard: member {member.name} cut at {have} of "
                       f"{member.size} bytes")
            split = _split_member_name(member.name) if member.isreg() else None
            if split is not None and split[1].rsplit(".", 1)[-1] in PICKLE_EXTENSIONS:
                if on_pickle is not None:
                    on_pickle(member.name)
                split = None
            if split is None:
                if cut is not None:
                    tail_error = cut
                    break
                continue
            key, ext = split
            if current is None or key != current.key or ext in current.fields:
                done = close(current)
                if done is not None:
                    yield done, tar
                current = TarGroup(key, {})
            current.fields[ext] = member
            if cut is not None:
                if mark_damage:
                    current.error = cut  # the whole sample is lost; nothing after it is readable
                    warn("shard %s: %s", shard, cut)
                break
        if tail_error is not None and mark_damage:
            # The sample before the damage may have lost members (its label, say): it is
            # reported with the damage instead of being passed on incomplete.
            warn("shard %s: %s", shard, tail_error)
            if current is None:
                current = TarGroup(f"{shard_name}@{end_offset}", {})
            current.error = current.error or tail_error
        done = close(current)
        if done is not None:
            yield done, tar
    if skipped_no_image and log:
        logger.info("shard %s: %d sample(s) without an image field skipped", shard,
                    skipped_no_image)


def _tail_error(f, size: int, end_offset: int) -> str | None:
    """An error unless the last complete member is followed by the end-of-archive marker."""
    header_at = (end_offset + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
    if header_at >= size:
        # Every tar writer ends the archive with zero blocks; without them, members may be lost.
        return (f"truncated tar shard: no end-of-archive marker after byte "
                f"{min(end_offset, size)} of {size}")
    f.seek(header_at)
    block = f.read(tarfile.BLOCKSIZE)
    if block.count(0) == len(block):
        return None  # the end-of-archive marker
    return f"truncated tar shard: cut or corrupt tar header at byte {header_at} of {size}"


# ----------------------------------------------------------------------------- image folders


class ImageFolderSource:
    """A torchvision-style ImageFolder: root/<class>/<...>/<image>.

    Classes are the sorted subfolder names (label = position); files are walked recursively and
    sorted; the sorted list is cut into shards of `shard_size` ('imagefolder-00000', ...).
    A root without subfolders is read as one flat folder with label -1.
    Key: path relative to root, '/'-separated, without the file extension; files that share a
    stem (``x.jpg`` beside ``x.png``) keep their extension (``x.jpg``, ``x.png``), so every file
    has its own key.
    """

    kind = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike,
        shard_size: int = 1000,
        *,
        extensions: Sequence[str] = FOLDER_EXTENSIONS,
    ) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory"
            )
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = int(shard_size)
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self._files: list[tuple[str, int]] = self._list_files()
        # stems shared by several files ('x.jpg' beside 'x.png'): keys keep the extension
        stems = collections.Counter(os.path.splitext(rel)[0] for rel, _ in self._files)
        self._stems = {stem for stem, n in stems.items() if n > 1}
        if not self._files:
            raise ShardSpecError(
                f"image folder {self.root} holds no images with suffixes {list(self.extensions)}"
            )
        n = (len(self._files) + self.shard_size - 1) // self.shard_size
        self._shards = [f"imagefolder-{i:05d}" for i in range(n)]
        self._index = {s: i for i, s in enumerate(self._shards)}

    def _list_files(self) -> list[tuple[str, int]]:
        files: list[tuple[str, int]] = []
        tops = [(c, label) for label, c in enumerate(self.classes)] if self.classes else [("", -1)]
        for top, label in tops:
            base = self.root / top
            found = []
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                if not self.classes and Path(dirpath) != base:
                    continue
                for name in filenames:
                    if (not name.startswith(".")
                            and os.path.splitext(name)[1].lower() in self.extensions):
                        found.append(Path(dirpath, name).relative_to(self.root).as_posix())
            files.extend((rel, label) for rel in sorted(found))
        return files

    def shards(self) -> list[str]:
        return list(self._shards)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root), "shard_size": self.shard_size,
                "shards": self.shards()}

    def _chunk(self, shard: str) -> list[tuple[str, int]]:
        if shard not in self._index:
            raise ValueError(
                f"unknown shard {shard!r} of image folder {self.root}; "
                "expected one of imagefolder-NNNNN"
            )
        i = self._index[shard]
        return self._files[i * self.shard_size : (i + 1) * self.shard_size]

    def count(self, shard: str) -> int:
        return len(self._chunk(shard))

    def scan(self, shard: str) -> tuple[int, list[str]]:
        return self.count(shard), [folder_key(rel, self._stems) for rel, _ in self._chunk(shard)]

    def keyed_files(self) -> list[tuple[str, str, int]]:
        """(key, path relative to root, label) of every image, in source order."""
        return [(folder_key(rel, self._stems), rel, label) for rel, label in self._files]

    def samples(self, shard: str) -> Iterator[Sample]:
        for rel, label in self._chunk(shard):
            key = folder_key(rel, self._stems)
            try:
                data = (self.root / rel).read_bytes()
            except OSError as exc:
                yield Sample(key, None, label, f"unreadable file: {_one_line(exc)}")
                continue
            yield Sample(key, data, label, None)


def folder_key(rel: str, shared_stems: set[str] | frozenset[str] = frozenset()) -> str:
    """Sample key of an image-folder file: its relative path without the extension, or with it
    when another file has the same stem."""
    stem = os.path.splitext(rel)[0]
    return rel if stem in shared_stems else stem


def unique_keys(keys_by_shard: Sequence[Sequence[str]],
                names: Sequence[str]) -> list[dict[str, str | None]]:
    """Renames that make sample keys unique across shards: ``[{key: new key or None}]`` per shard.

    Shards cut from separate folders often repeat member names (``s0000.jpg`` in every shard). A
    key found in more than one shard is qualified by its shard's part name in each of them
    (``train-000001/s0000``); a qualified key that is still taken (a member really named so) is
    None: the sample is reported as bad. Keys repeated within one shard are left alone (the
    source reports the later samples as bad). Stage 1 and stage 2 apply the same renames, so a
    sample's key is the same in the cache and in the training index. Keys of sources whose keys
    are unique already come back unchanged (empty dicts).
    """
    seen_in = collections.Counter()
    for keys in keys_by_shard:
        seen_in.update(set(keys))
    repeated = {k for k, n in seen_in.items() if n > 1}
    renames: list[dict[str, str | None]] = []
    for keys, name in zip(keys_by_shard, names):
        renames.append({k: f"{name}/{k}" for k in dict.fromkeys(keys) if k in repeated})
    if repeated:
        taken = {k for k in seen_in if k not in repeated}
        for shard in renames:
            for k, new in shard.items():
                if new in taken:
                    shard[k] = None
    return renames


def open_source(
    kind: str, path: str | os.PathLike | Sequence[str], **kwargs: Any
) -> WebDatasetSource | ImageFolderSource:
    """Source factory: kind 'webdataset' (path = shard spec) or 'imagefolder' (path = root)."""
    if kind == "webdataset":
        return WebDatasetSource(path, **kwargs)
    if kind == "imagefolder":
        return ImageFolderSource(path, **kwargs)
    raise ValueError(f"unknown source kind {kind!r}; use 'webdataset' or 'imagefolder'")
