"""Object storage (any fsspec URL: s3://, gs://, memory://, ...) for caches and source shards.

A cache root given as a URL is a :class:`Url`: a ``str`` that joins with ``/`` and answers the
few ``pathlib.Path`` questions the cache code asks (``exists``, ``is_dir``, ``stat().st_size``,
``iterdir``, ``read_bytes``, ``unlink``, ...) through the URL's fsspec filesystem. Local paths stay
``pathlib.Path`` and keep the rename-based commit of layout.py; on an object store there is no
rename: a part's data objects are uploaded first and its commit marker is written last (one PUT,
atomic on S3/GCS), so the marker stays the only visibility point (layout.commit_part_dir).

Credentials and endpoints come from the standard environment of each filesystem (AWS_* /
AWS_ENDPOINT_URL for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, fsspec's own
``FSSPEC_<PROTOCOL>_<KWARG>`` variables) or from ``storage_options`` in pipeline.yaml, a mapping
protocol -> filesystem keyword arguments applied with :func:`configure` in every process that
touches the store (the driver and each stage-1 worker).
"""
from __future__ import annotations

import logging
import os
import posixpath
import uuid
from pathlib import PurePosixPath
from types import SimpleNamespace

from .schema import CacheError
from .util import first_line

log = logging.getLogger(__name__)

# fsspec protocols that are the local file system: handled as plain paths
_LOCAL = ("file", "local")
# the package each well-known protocol needs, for the "not installed" message
_PACKAGES = {"s3": "s3fs (pip install -e '.[s3]')", "s3a": "s3fs (pip install -e '.[s3]')",
             "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
             "hf": "huggingface_hub"}
_configured: dict[str, dict] = {}


class StorageError(CacheError):
    """A URL that cannot be used: unknown scheme, package missing, unreachable, refused."""


def is_url(path) -> bool:
    """True for an fsspec URL of a non-local filesystem ('s3://b/x', 'memory://x')."""
    if isinstance(path, Url):
        return True
    s = str(path)
    if "://" not in s:
        return False
    return s.split("://", 1)[0].lower() not in _LOCAL


def protocol_of(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def configure(storage_options: dict | None) -> None:
    """Apply pipeline.yaml's ``storage_options`` ({protocol: {kwarg: value}}) to this process:
    every filesystem made afterwards for that protocol gets these keyword arguments."""
    import fsspec.config

    for proto, opts in (storage_options or {}).items():
        if not isinstance(opts, dict):
            raise StorageError(f"storage_options.{proto}: expected a mapping of filesystem "
                               f"options (e.g. endpoint_url, key, secret), got {opts!r:.60}")
        merged = {**fsspec.config.conf.get(proto, {}), **opts}
        fsspec.config.conf[proto] = merged
        _configured[proto] = dict(opts)
    if storage_options:
        _fs_cache.clear()


def configured() -> dict:
    """The storage_options this process was configured with (to hand to worker processes)."""
    return {k: dict(v) for k, v in _configured.items()}


_fs_cache: dict[str, tuple[int, object]] = {}  # protocol -> (pid that made it, filesystem)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; StorageError naming the URL if its scheme is
    unknown or its package is not installed."""
    import fsspec

    proto = protocol_of(url)
    pid, fs = _fs_cache.get(proto, (None, None))
    if pid != os.getpid():  # a forked child (DataLoader worker) makes its own client
        fs = None
    if fs is None:
        try:
            cls = fsspec.get_filesystem_class(proto)
        except ValueError:
            raise StorageError(f"{url}: unknown URL scheme {proto}:// (no fsspec filesystem "
                               f"implements it); use a local path or s3://, gs://, memory://")\
                from None
        except ImportError:
            need = _PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
            raise StorageError(f"{url}: the {proto}:// scheme needs {need}, which is not "
                               f"installed") from None
        try:
            # listings are not cached: other processes commit parts while this one looks
            fs = cls(use_listings_cache=False, skip_instance_cache=True)
        except Exception as e:
            raise StorageError(f"{url}: cannot set up the {proto}:// filesystem "
                               f"({type(e).__name__}: {first_line(e)})") from None
        _fs_cache[proto] = (os.getpid(), fs)
    return fs, fs._strip_protocol(url)


def _classify(url: str, e: BaseException) -> StorageError:
    """A one-line StorageError for an exception raised by a filesystem call on `url`."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if isinstance(e, PermissionError) or any(s in low for s in (
            "accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch",
            "forbidden", "403", "credentials", "unauthorized", "invalidtoken")):
        return StorageError(f"{url}: access refused ({first_line(e)}); check the credentials "
                            f"(environment or storage_options)")
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket" in low:
        return StorageError(f"{url}: the bucket does not exist; create it or fix the URL")
    if any(s in low for s in ("connect", "timeout", "timed out", "unreachable", "name or service",
                              "nodename", "refused", "endpoint")):
        return StorageError(f"{url}: cannot reach the storage endpoint ({first_line(e)}); check "
                            f"the endpoint (AWS_ENDPOINT_URL / storage_options) and the network")
    return StorageError(f"{url}: storage error ({type(e).__name__}: {first_line(e)})")


def call(url: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) with filesystem errors other than FileNotFoundError turned into one
    StorageError line naming `url`."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError:
        raise
    except CacheError:
        raise
    except Exception as e:
        raise _classify(url, e) from None


def check_location(url: str, *, write: bool = False, what: str = "location") -> None:
    """Fail fast (one StorageError line naming the URL) if `url` cannot be used: scheme unknown
    or its package missing, endpoint unreachable, credentials refused, bucket missing; with
    write=True also writes and deletes a probe object. Local paths are not checked here."""
    if not is_url(url):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        if protocol_of(url) not in ("memory",) and bucket:
            try:
                fs.info(bucket)  # raises (unlike exists) on refused credentials or no connection
            except FileNotFoundError:
                raise StorageError(
                    f"{url}: the bucket {bucket!r} does not exist (or these "
                    f"credentials cannot see it); create it or fix the URL"
                ) from None
        if write:
            probe = posixpath.join(path.rstrip("/"), f".tec-write-probe-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        else:
            fs.exists(path)
    except StorageError:
        raise
    except Exception as e:
        raise _classify(url, e) from None
    log.debug("storage %s: %s reachable%s", what, url, " and writable" if write else "")


class Url(str):
    """An object-store location that answers the pathlib questions the cache code asks."""

    def __new__(cls, url):
        s = str(url)
        return super().__new__(cls, s.rstrip("/") if not s.endswith("://") else s)

    # -- names ------------------------------------------------------------------------------
    def __truediv__(self, other) -> Url:
        return Url(f"{self}/{str(other).strip('/')}")

    @property
    def fs(self):
        return filesystem(self)[0]

    @property
    def key(self) -> str:
        """The path inside the filesystem (bucket/...)."""
        return filesystem(self)[1]

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Url:
        return Url(self.rsplit("/", 1)[0])

    def with_name(self, name: str) -> Url:
        return self.parent / name

    def relative_to(self, other) -> PurePosixPath:
        other = str(other).rstrip("/") + "/"
        if not self.startswith(other):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self[len(other):])

    def as_posix(self) -> str:
        return str(self)

    # -- questions ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(call(self, self.fs.exists, self.key))

    def is_dir(self) -> bool:
        return bool(call(self, self.fs.isdir, self.key))

    def is_file(self) -> bool:
        return bool(call(self, self.fs.isfile, self.key))

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> SimpleNamespace:
        try:
            info = call(self, self.fs.info, self.key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self} does not exist") from None
        return SimpleNamespace(st_size=int(info.get("size") or 0))

    def iterdir(self):
        try:
            entries = call(self, self.fs.ls, self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        own = self.key.rstrip("/")
        return iter(sorted(self / posixpath.basename(e.rstrip("/")) for e in entries
                           if e.rstrip("/") != own))

    # -- data ---------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return call(self, self.fs.cat_file, self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        call(self, self.fs.pipe_file, self.key, bytes(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_range(self, offset: int, n: int) -> bytes:
        return call(self, self.fs.cat_file, self.key, start=offset, end=offset + n)

    def open(self, mode: str = "rb", **kwargs):
        return call(self, self.fs.open, self.key, mode, **kwargs)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            call(self, self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Remove everything under this prefix (nothing there is not an error)."""
        try:
            call(self, self.fs.rm, self.key, recursive=True)
        except FileNotFoundError:
            pass

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: nothing to make."""

    def find(self) -> list[str]:
        """Relative paths (posix) of all objects under this prefix, sorted."""
        try:
            found = call(self, self.fs.find, self.key)
        except FileNotFoundError:
            return []
        own = self.key.rstrip("/") + "/"
        return sorted(f[len(own):] for f in found if f.startswith(own))

    def put_file(self, local, rel: str | None = None) -> None:
        target = self / rel if rel else self
        call(target, self.fs.put_file, str(local), target.key)


def as_root(path):
    """A cache root: a Url for an object-store URL, else a pathlib.Path."""
    from pathlib import Path

    if isinstance(path, (Url,)):
        return path
    if is_url(path):
        return Url(path)
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s)


def resolved(path) -> str:
    """A location as recorded in manifests and compared: a URL as given, a path made absolute."""
    from pathlib import Path

    root = as_root(path)
    return str(root) if isinstance(root, Url) else str(Path(root).resolve())
