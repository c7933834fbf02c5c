"""View pixels in the cache (``targets.pixels``): encode in stage 1, decode in both stages.

A cache with pixels stores, per (sample, view), the rendered uint8 view [S, S, 3] as one encoded
image: JPEG (lossy, ``pixels_quality``) or PNG (lossless). With JPEG a view's pixels are *by
definition* the decode of the stored bytes: stage 1 encodes the rendered view, decodes it with
:func:`decode_pixels` and feeds the base model exactly that, and stage 2 decodes the same bytes
with the same function, so replay stays bit-identical. (PNG is lossless: its decode is the
rendered view itself.)

Decoding is libjpeg-turbo / zlib through Pillow, integer IDCT (Pillow's default, 'islow'),
which gives the same pixels on every x86/ARM machine for the same library versions; the manifest
records the versions that wrote the cache (``codec.pixels``).

Measured on this machine (2-core AMD EPYC VM, shared; Pillow 13.0, libjpeg-turbo 6.2 API): on
40 opencv-doc photos centre-cropped and resized to 224 x 224, JPEG quality 90 decodes in
0.3-0.5 ms, PNG (compress_level 1) in 1.5-2.2 ms. ``estimated_bytes`` (what `tec plan` shows) is
the mean size over the 439 opencv-doc photos of at least 200 px, centre-cropped to 224 x 224:
JPEG 4:2:0 quality 50: 6.6 KB, 75: 9.2 KB, 85: 11.8 KB, 90: 14.4 KB, 95: 19.8 KB, 100: 35.1 KB;
PNG 60.7 KB; scaled by the pixel count for other view sizes.
"""
from __future__ import annotations

import io

import numpy as np

from .schema import PIXEL_FORMATS, CacheError

EXTENSIONS = {"jpeg": "jpg", "png": "png"}  # webdataset member extension per format
_MAGIC = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
PNG_COMPRESS_LEVEL = 1  # level 6 saves ~6% at ~3x the encode time; decode speed is the same
JPEG_SUBSAMPLING = "4:2:0"

# bytes per 224 x 224 view, measured on real photos (see module docstring); keyed by quality
_JPEG_BYTES_224 = {50: 6_576, 75: 9_210, 85: 11_843, 90: 14_430, 95: 19_780, 100: 35_141}
_PNG_BYTES_224 = 60_728


def _pil():
    from PIL import Image

    return Image


def pixel_config(fmt: str, quality: int) -> dict:
    """The manifest's description of the pixel codec (``codec.pixels``)."""
    from PIL import __version__ as pil_version
    from PIL import features

    out = {"format": fmt, "layout": "uint8 [S,S,3] RGB, one encoded image per (sample, view)",
           "library": f"Pillow {pil_version}"}
    if fmt == "jpeg":
        out.update(quality=int(quality), subsampling=JPEG_SUBSAMPLING, dct="islow",
                   libjpeg=str(features.version("libjpeg_turbo") or features.version("jpg")),
                   libjpeg_turbo=bool(features.check_feature("libjpeg_turbo")))
    else:
        out.update(compress_level=PNG_COMPRESS_LEVEL, zlib=str(features.version("zlib")))
    return out


def check_format(fmt: str) -> None:
    if fmt not in PIXEL_FORMATS or fmt == "none":
        raise CacheError(f"pixel format {fmt!r} is not one of jpeg, png")


def encode_pixels(view: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """uint8 [3,S,S] (CHW, as stages.views.render_view returns) or [S,S,3] -> encoded bytes."""
    check_format(fmt)
    a = np.asarray(view)
    if a.dtype != np.uint8 or a.ndim != 3 or 3 not in (a.shape[0], a.shape[2]):
        raise CacheError(f"view pixels must be uint8 [3,S,S] or [S,S,3], got {a.dtype} "
                         f"{list(a.shape)}")
    if a.shape[0] == 3 and a.shape[2] != 3:
        a = a.transpose(1, 2, 0)
    image = _pil().fromarray(np.ascontiguousarray(a), "RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=int(quality), subsampling=JPEG_SUBSAMPLING, optimize=False)
    else:
        image.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_pixels(data, out: np.ndarray | None = None) -> np.ndarray:
    """Encoded view -> uint8 [S,S,3] (HWC). ``out``: a writable uint8 [S,S,3] to fill instead.

    Raises CacheError for bytes that are not a JPEG/PNG image of RGB pixels.
    """
    try:
        with _pil().open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                raise CacheError(f"stored view pixels are {image.mode}, expected RGB")
            image.load()
            array = np.asarray(image) if out is not None else np.array(image)
    except CacheError:
        raise
    except Exception as e:  # PIL raises many types for damaged data
        raise CacheError(f"stored view pixels do not decode ({type(e).__name__}: {e})") from None
    if out is None:
        return array
    if out.shape != array.shape:
        raise CacheError(f"stored view pixels are {list(array.shape)}, expected {list(out.shape)}")
    out[...] = array
    return out


def looks_like(fmt: str, data) -> bool:
    """Whether ``data`` starts like an image of ``fmt`` (a cheap check at write time)."""
    return bytes(data[: len(_MAGIC[fmt])]) == _MAGIC[fmt]


def estimated_bytes(fmt: str, quality: int, image_size: int) -> int:
    """Planning estimate of the stored bytes of one view's pixels (0 for 'none')."""
    if fmt == "none":
        return 0
    check_format(fmt)
    scale = (int(image_size) / 224.0) ** 2
    if fmt == "png":
        return int(round(_PNG_BYTES_224 * scale))
    qs = sorted(_JPEG_BYTES_224)
    q = min(max(int(quality), qs[0]), qs[-1])
    lo = max(x for x in qs if x <= q)
    hi = min(x for x in qs if x >= q)
    frac = 0.0 if hi == lo else (q - lo) / (hi - lo)
    per = _JPEG_BYTES_224[lo] + frac * (_JPEG_BYTES_224[hi] - _JPEG_BYTES_224[lo])
    if q < qs[0]:
        per *= int(quality) / qs[0]
    return int(round(per * scale))
