"""Test helpers: small WebDataset shards of generated images, good and bad.

make_shards(dir, n_shards, per_shard, size_range)  -> list of shard paths (seeded, reproducible)
make_bad_shard(path) -> BadShardExpectation: {key: None (good or convertible) | reason substring}

Reusable by every test that needs image data; nothing here touches the network.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from stages.synthetic import encode, smooth_image, write_tar

__all__ = ["smooth_image", "encode", "write_tar", "make_shards", "make_bad_shard",
           "BadShardExpectation", "png_header_only"]


def make_shards(
    directory: str | Path,
    n_shards: int = 2,
    per_shard: int = 8,
    size_range: tuple[int, int] = (24, 64),
    *,
    seed: int = 0,
    prefix: str = "shard",
    num_classes: int = 10,
) -> list[str]:
    """Write `n_shards` WebDataset tars `{prefix}-{s:06d}.tar` of `per_shard` RGB images each.

    Keys 's{s:03d}_{i:05d}'; images alternate JPEG (.jpg) and PNG (.png), sides drawn from
    size_range (inclusive); label (.cls) = global index % num_classes. Same seed, same bytes.
    Returns the shard paths in order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            h, w = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
            image = smooth_image(rng, h, w)
            key = f"s{s:03d}_{i:05d}"
            if (s * per_shard + i) % 2 == 0:
                members.append((f"{key}.jpg", encode(image, "JPEG", quality=90)))
            else:
                members.append((f"{key}.png", encode(image, "PNG")))
            members.append((f"{key}.cls", str((s * per_shard + i) % num_classes).encode()))
        path = directory / f"{prefix}-{s:06d}.tar"
        write_tar(path, members)
        paths.append(str(path))
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR claims width x height RGB but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


class BadShardExpectation(dict):
    """{key: None | reason substring} for every candidate sample, in shard order.

    The value describes the key's FIRST occurrence. Extra facts for tests:
    duplicates: {key: reason} for keys that occur again later (the repeat is rejected);
    labels: {key: expected label} and sizes: {key: (height, width) after decoding} for good keys;
    ignored: keys present in the tar that are not candidates (no image field).
    """

    def __init__(self) -> None:
        super().__init__()
        self.duplicates: dict[str, str] = {}
        self.labels: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.ignored: list[str] = []

    @property
    def good(self) -> list[str]:
        return [k for k, v in self.items() if v is None]

    @property
    def bad(self) -> dict[str, str]:
        return {k: v for k, v in self.items() if v is not None}


def make_bad_shard(path: str | Path, *, seed: int = 1) -> BadShardExpectation:
    """Write one WebDataset tar full of odd and broken samples, cut in the middle of its last
    member.

    Kinds: good JPEG/PNG/WebP; convertible grayscale, RGBA, LA, palette+transparency, CMYK,
    16-bit PNG, 1x1, EXIF-rotated, GIF named .jpg, unparsable .cls, an image next to a .pth
    member; bad truncated JPEG, corrupt PNG data, bad magic, zero bytes, text named .jpg,
    EPS named .jpg (format not allowed), 20000x20000 PNG header (decompression bomb),
    zero-width PNG header, a duplicate key, and the truncated last member. Non-candidates:
    a key with only a .pickle member and a key with only a .txt member.
    """
    rng = np.random.default_rng(seed)
    expected = BadShardExpectation()
    members: list[tuple[str, bytes]] = []

    def add(key: str, ext: str, data: bytes, reason: str | None, label: int | None = 0,
            size: tuple[int, int] | None = None) -> None:
        members.append((f"{key}.{ext}", data))
        if label is not None:
            members.append((f"{key}.cls", str(label).encode()))
        expected[key] = reason
        if reason is None:
            expected.labels[key] = -1 if label is None else label
            if size is not None:
                expected.sizes[key] = size

    rgb = smooth_image(rng, 30, 40)
    add("good_jpg", "jpg", encode(rgb, "JPEG", quality=95), None, 1, (30, 40))
    add("good_png", "png", encode(rgb, "PNG"), None, 2, (30, 40))
    add("good_webp", "webp", encode(rgb, "WEBP", lossless=True), None, 3, (30, 40))
    add("gray_jpg", "jpg", encode(Image.fromarray(rgb).convert("L"), "JPEG"), None, 4, (30, 40))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)], axis=2)
    add("rgba_png", "png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), None, 5, (30, 40))
    add("la_png", "png", encode(Image.fromarray(rgba, "RGBA").convert("LA"), "PNG"), None, 6,
        (30, 40))
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    add("palette_trns_png", "png", encode(pal, "PNG", transparency=0), None, 7, (30, 40))
    add("cmyk_jpg", "jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None, 8, (30, 40))
    gray16 = (rng.integers(0, 65536, (30, 40))).astype(np.uint16)
    add("png16", "png", encode(Image.fromarray(gray16), "PNG"), None, 9, (30, 40))
    add("tiny_1x1", "png", encode(rgb[:1, :1], "PNG"), None, 0, (1, 1))
    exif_img = Image.fromarray(rgb)
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    add("exif_rotated", "jpg", encode(exif_img, "JPEG", exif=exif.tobytes()), None, 1, (40, 30))
    add("gif_named_jpg", "jpg", encode(Image.fromarray(rgb).convert("P"), "GIF"), None, 2, (30, 40))
    add("bad_cls", "jpg", encode(rgb, "JPEG"), None, None, (30, 40))
    members.append(("bad_cls.cls", b"not-a-number"))
    # An image next to a pickle member: the image is fine, the pickle is never loaded.
    add("with_pickle", "jpg", encode(rgb, "JPEG"), None, 3, (30, 40))
    members.append(("with_pickle.pth", pickle.dumps({"never": "loaded"})))
    members.append(("only_pickle.pickle", pickle.dumps([1, 2, 3])))
    expected.ignored.append("only_pickle")
    members.append(("only_txt.txt", b"just some text"))
    expected.ignored.append("only_txt")

    jpeg = encode(smooth_image(rng, 64, 64), "JPEG", quality=90)
    add("truncated_jpg", "jpg", jpeg[: len(jpeg) // 2], "corrupt image data")
    png = bytearray(encode(smooth_image(rng, 32, 32), "PNG"))
    idat = png.find(b"IDAT")
    png[idat + 8 : idat + 40] = b"\xff" * 32  # garbage deflate stream
    add("corrupt_png", "png", bytes(png), "corrupt image data")
    add("bad_magic", "jpg", b"\x00\x01\x02\x03" + jpeg[4:], "not an image")
    add("zero_bytes", "jpg", b"", "empty data")
    add("text_as_jpg", "jpg", b"hello, I am not a JPEG\n" * 10, "not an image")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    add("eps_as_jpg", "jpg", eps, "not an image")
    add("bomb_png", "png", png_header_only(20000, 20000), "too many pixels")
    add("zero_width_png", "png", png_header_only(0, 16), "not an image")
    # The same key again, later in the shard: the repeat is rejected.
    members.append(("good_jpg.jpg", encode(rgb, "JPEG")))
    members.append(("good_jpg.cls", b"1"))
    expected.duplicates["good_jpg"] = "duplicate key"
    # Last member, cut in the middle of its data.
    big = encode(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), "PNG")
    members.append(("cut_last.cls", b"5"))
    members.append(("cut_last.png", big))
    expected["cut_last"] = "truncated tar shard"

    infos = write_tar(path, members)
    last = infos[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)
    return expected
