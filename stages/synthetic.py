"""Synthetic images and tar shards (the tests' shards and the benchmarks' datasets): smooth
random RGB images, encoded with PIL, written as WebDataset tars."""
from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["smooth_image", "encode", "write_tar"]


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random but natural-ish uint8 RGB [H, W, 3]: upsampled low-res noise plus a gradient."""
    low = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR), dtype=np.int16)
    ramp = np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
    return np.clip(img + ramp, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str, **save_kwargs) -> bytes:
    """Encode a uint8 array or PIL image with PIL ('JPEG', 'PNG', 'WEBP', ...)."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def write_tar(path: str | Path, members: Sequence[tuple[str, bytes]]) -> list[tarfile.TarInfo]:
    """Write (name, data) members to a tar at `path`; returns their TarInfos (with offsets)."""
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, mode="r:") as tar:
        return tar.getmembers()
