"""Small real datasets converted to WebDataset shards.

Fashion-MNIST (Debian package `dataset-fashion-mnist`, IDX files under
/usr/share/datasets/fashion-mnist) becomes tars of `<key>.png` (28x28 grayscale) + `<key>.cls`,
keys like 'train_000123', shards `{split}-{i:06d}.tar`. Shards are written atomically (temporary
file, then rename) and are reproducible byte for byte (fixed member metadata), so a rerun skips
shards that already hold exactly the expected members.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from storage.layout import atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "IdxError", "read_idx", "fashion_mnist_to_shards",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxError(ValueError):
    """An IDX file that cannot be read (one line naming the file)."""


def _find_idx(idx_dir: Path, name: str) -> Path:
    for candidate in (idx_dir / name, idx_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST IDX file {idx_dir / name}[.gz] not found; install with: "
        "apt-get install dataset-fashion-mnist"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip'd) into an array of its declared shape and dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise IdxError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"IDX file {path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxError(
            f"IDX file {path} holds {len(raw) - header} data bytes, header shape {list(shape)} "
            f"needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def _shard_is_complete(path: Path, expected_names: list[str]) -> bool:
    try:
        with tarfile.open(path, mode="r:") as tar:
            return tar.getnames() == expected_names
    except (tarfile.TarError, OSError, EOFError):
        return False


def _write_shard(path: Path, keys: list[str], images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_file(path, "wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in zip(keys, images, labels):
            _add_member(tar, f"{key}.png", _png_bytes(image))
            _add_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))


def fashion_mnist_to_shards(
    idx_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    shard_size: int = 10000,
    *,
    limit: int | None = None,
    splits: Sequence[str] = ("train", "test"),
) -> list[str]:
    """Convert Fashion-MNIST IDX files to WebDataset shards; returns one shard pattern per split.

    idx_dir: folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz];
    None = FASHION_MNIST_DIR.
    out_dir: where `{split}-{i:06d}.tar` go. limit: first `limit` samples of each split.
    Returns e.g. ['<out>/train-{000000..000005}.tar', '<out>/test-000000.tar'] (for expand_shards).
    """
    idx_dir = Path(idx_dir) if idx_dir is not None else Path(FASHION_MNIST_DIR)
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    unknown = [s for s in splits if s not in _SPLIT_PREFIX]
    if unknown:
        raise ValueError(f"unknown Fashion-MNIST split(s) {unknown}; use {sorted(_SPLIT_PREFIX)}")
    for split in splits:  # fail before creating anything when the IDX files are missing
        for kind in ("images-idx3", "labels-idx1"):
            _find_idx(idx_dir, f"{_SPLIT_PREFIX[split]}-{kind}-ubyte")
    out_dir.mkdir(parents=True, exist_ok=True)

    patterns: list[str] = []
    for split in splits:
        prefix = _SPLIT_PREFIX[split]
        images_path = _find_idx(idx_dir, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(idx_dir, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxError(
                f"{images_path} should hold uint8 images [N, H, W], got {images.dtype} "
                f"{list(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise IdxError(
                f"{labels_path} holds {labels.shape} labels for {len(images)} images in "
                f"{images_path}"
            )
        n = len(images) if limit is None else min(limit, len(images))
        num_shards = (n + shard_size - 1) // shard_size
        written = 0
        for i in range(num_shards):
            lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
            keys = [f"{split}_{j:06d}" for j in range(lo, hi)]
            path = out_dir / f"{split}-{i:06d}.tar"
            names = [name for key in keys for name in (f"{key}.png", f"{key}.cls")]
            if path.exists() and _shard_is_complete(path, names):
                continue
            _write_shard(path, keys, images[lo:hi], labels[lo:hi])
            written += 1
        logger.info(
            "fashion-mnist %s: %d samples in %d shard(s) (%d written) under %s",
            split, n, num_shards, written, out_dir,
        )
        if num_shards == 1:
            patterns.append(str(out_dir / f"{split}-000000.tar"))
        else:
            patterns.append(str(out_dir / f"{split}-{{000000..{num_shards - 1:06d}}}.tar"))
    return patterns
