"""Codecs: how a record's tensors are encoded (float16 / int8 / lowrank) and compressed.

The compact lossy ``lowrank`` codec (a ViT-B view in <= 48 KiB) lives in ``compact.py``; its
rate-distortion table is benchmarks/results/storage.json (benchmarks/storage_bench.py).

Value codecs
------------
float16 (default): ``features`` and ``attn_logits`` rounded to float16 (relative L2 error about
2e-4 on ViT-B-like targets); everything else exact.

int8: symmetric per-row quantisation, q = round(x / s) clipped to [-127, 127], s = absmax / 127:
``features`` one scale per patch row (absmax over C), ``attn_logits`` one scale per (head, row)
(absmax over L). Scales are float32. Measured relative L2 error on synthetic ViT-B-shaped
targets (tests/storage_helpers.realistic_targets: L=196, C=768, H=12, k_max=16; spatially
correlated patch-normalised features with an outlier patch, logits q.k^T/sqrt(d) ~ N(0, 5^2) of
correlated tokens; 16 views): features 0.78%, attn_logits 0.37% (float16: 0.021% for both).
The tests bound it at 1%.

Compression (lossless, applied per (sample, view) record so random access stays one read)
------------------------------------------------------------------------------------------
Chosen by measurement on the same 16 synthetic views, one record per call, numcodecs 0.16, one
core of a loaded 2-core machine (ratio = raw / compressed; encode / decode MB/s, noisy):

    float16 record                      features              attn_logits
    zstd-1 (no shuffle)                 1.088  449 / 1054     1.097  222 /  930
    zstd-3                              1.088  753 /  585     1.097  673 / 1051
    blosc lz4, byte shuffle             1.000 4109 / 9438     1.044 1172 / 3596
    blosc zstd-1, shuffle, auto blocks  1.086  361 /  775     1.119  356 /  582
    blosc zstd-1, shuffle, one block    1.155 1102 / 1711     1.111  474 /  832   <- chosen
    blosc zstd clevel 3, one block      1.155  760 / 1784     1.154  189 /  802
    blosc zstd-1, bit shuffle, 1 block  1.083  651 / 1189     1.146  184 / 1342
    int8 record, blosc zstd-1           1.085                 1.017  (shuffle is a no-op)

float16 values of N(0,1)-like data carry ~14 bits of entropy in 16, so ~1.15x is about the
ceiling; byte shuffle over the whole record as one blosc block is what reaches it. clevel 3
gains 4% on the (smaller) logits at 2.5x the encode cost, so the default is blosc zstd level 1,
byte shuffle, blocksize = the record's bytes. Whole records on disk (8 samples x 2 views,
tests' generator), bytes per view and disk / raw stored-tensor bytes:

    zarr        float16  338,827 B  0.875  (uncompressed 1.0022: framing overhead 0.2%)
    zarr        int8     186,282 B  0.939  (uncompressed 1.0051)
    webdataset  float16  343,410 B  0.887  (uncompressed 1.0133: tar headers 1.3%)
    webdataset  int8     192,466 B  0.971  (uncompressed 1.0336)

(raw float16 record 387,217 B; the same record as float32 is 768,320 B.)
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
from numcodecs import Blosc

from . import compact
from .schema import CacheError, CacheSpec, index_dtype, stored_fields

BLOSC_CNAME = "zstd"
BLOSC_CLEVEL = 1

_blosc_decoder = Blosc()


def codec_config(spec: CacheSpec) -> dict:
    """The codec section of the manifest (what a reader needs to know, in words and numbers)."""
    cfg: dict = {"values": spec.codec}
    if spec.codec == compact.NAME:
        cfg[compact.NAME] = compact.describe(spec.codec_params, spec.num_patches, spec.channels,
                                             spec.heads, spec.rows)
    if spec.codec == "int8":
        cfg["int8"] = {"scheme": "symmetric absmax/127", "features_scale": "per patch row (over C)",
                       "attn_logits_scale": "per (head, row) (over L)", "scale_dtype": "float32"}
    if spec.compression == "blosc":
        cfg["compression"] = {"id": "blosc", "cname": BLOSC_CNAME, "clevel": BLOSC_CLEVEL,
                              "shuffle": "byte", "blocksize": "one block per record"}
    else:
        cfg["compression"] = {"id": "none"}
    return cfg


def blosc_params(dtype: np.dtype, nbytes: int) -> dict:
    """Blosc settings for one record of an array: zstd-1, byte shuffle, the record as one block."""
    return {"cname": BLOSC_CNAME, "clevel": BLOSC_CLEVEL,
            "shuffle": "shuffle" if dtype.itemsize > 1 else "noshuffle",
            "typesize": int(dtype.itemsize), "blocksize": int(max(nbytes, 1))}


class Compressor:
    """Compresses the bytes of one record of one array; decompression needs no settings."""

    def __init__(self, compression: str, dtype: np.dtype, nbytes: int):
        self.enabled = compression == "blosc"
        if self.enabled:
            p = blosc_params(dtype, nbytes)
            self._codec = Blosc(cname=p["cname"], clevel=p["clevel"],
                                shuffle=(Blosc.SHUFFLE if p["shuffle"] == "shuffle"
                                         else Blosc.NOSHUFFLE),
                                blocksize=p["blocksize"], typesize=p["typesize"])

    def encode(self, arr: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(arr).tobytes()
        return bytes(self._codec.encode(raw)) if self.enabled else raw


def blosc_decode(data) -> bytes:
    return _blosc_decoder.decode(data)


# ---------------------------------------------------------------------------------------------
# int8 rows

def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: x [..., N] float -> (q [..., N] int8, scale [...] float32)."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q [..., N] int8, scale [...] float32 -> [..., N] float32."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


# ---------------------------------------------------------------------------------------------
# writing: caller's view records -> stored arrays

def prepare_views(spec: CacheSpec, key: str, view_records: dict, *,
                  first_view: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Validate one sample's K view records and encode them to stored arrays.

    view_records: features [K,L,C], feature_mean [K,C], feature_std [K,C],
        attn_logits [K,H,k_max+1,L], attn_index [K,k_max], crop [K,4], flip [K],
        source_size (h, w), label int (optional, default -1).
        Or, for the lowrank codec, already encoded (stage 1 encoding on the base model's device,
        ``storage.compact_torch``): the codec's stored arrays (``compact.PAYLOAD_FIELDS``, [K, ...]
        in their stored dtypes) instead of features and attn_logits, plus ``features_finite``
        and ``attn_logits_finite`` (bool [K]: the encoder's finiteness check of each view's
        input) and optionally ``encoder`` (its name). Every check of the float path applies, with
        the same one-line errors.
    first_view: the view index of the first record (seeds the lowrank codec's dither per view:
        a caller encoding views one at a time passes each view's index).
    Returns (stored: name -> [K, ...] arrays in the stored dtypes of ``stored_fields``,
             sample: {'label': int, 'source_size': [h, w]}).
    """
    K, L, C, H, R = spec.views, spec.num_patches, spec.channels, spec.heads, spec.rows
    encoded = is_encoded(view_records)
    if encoded and spec.codec != compact.NAME:
        raise CacheError(f"record {key!r}: already encoded as {compact.NAME}, but the cache's "
                         f"codec is {spec.codec}")
    want = {"features": (K, L, C), "feature_mean": (K, C), "feature_std": (K, C),
            "attn_logits": (K, H, R, L), "attn_index": (K, spec.k_max), "crop": (K, 4),
            "flip": (K,)}
    fields = stored_fields(spec)
    if encoded:
        del want["features"], want["attn_logits"]
        want.update({name: (K, *fields[name][0]) for name in compact.PAYLOAD_FIELDS})
        want.update(features_finite=(K,), attn_logits_finite=(K,))
    missing = sorted(set(want) - set(view_records))
    if missing:
        raise CacheError(f"record {key!r}: missing field(s) {', '.join(missing)}")
    arrs = {}
    for name, shape in want.items():
        a = np.asarray(view_records[name])
        if a.shape != shape:
            raise CacheError(f"record {key!r}: {name} has shape {list(a.shape)}, "
                             f"expected {list(shape)}")
        arrs[name] = a
    if encoded:
        for name in compact.PAYLOAD_FIELDS:
            if arrs[name].dtype != fields[name][1]:
                raise CacheError(f"record {key!r}: {name} has dtype {arrs[name].dtype}, expected "
                                 f"{fields[name][1]} (codec {compact.NAME})")
    for name in ("features", "feature_mean", "feature_std", "attn_logits"):
        if encoded and name in ("features", "attn_logits"):  # checked by the encoder
            if not np.asarray(arrs[f"{name}_finite"], dtype=bool).all():
                raise CacheError(f"record {key!r}: {name} holds NaN or inf values")
            continue
        if arrs[name].dtype.kind not in "fiu":
            raise CacheError(f"record {key!r}: {name} has dtype {arrs[name].dtype}, "
                             "expected a float array")
        if not np.isfinite(arrs[name]).all():
            raise CacheError(f"record {key!r}: {name} holds NaN or inf values")
    idx = arrs["attn_index"]
    if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= L)):
        raise CacheError(f"record {key!r}: attn_index must be integers in [0, {L})")
    crop = arrs["crop"]
    if crop.dtype.kind not in "iu" or (crop.size and crop.min() < 0):
        raise CacheError(f"record {key!r}: crop must be non-negative integers "
                         "(top, left, height, width)")
    try:
        h, w = (int(v) for v in view_records["source_size"])
    except (KeyError, TypeError, ValueError):
        raise CacheError(f"record {key!r}: source_size must be (height, width)") from None
    label = view_records.get("label", -1)
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise CacheError(f"record {key!r}: label {label!r} is not an integer") from None

    out: dict[str, np.ndarray] = {
        "feature_mean": arrs["feature_mean"].astype(fields["feature_mean"][1]),
        "feature_std": arrs["feature_std"].astype(fields["feature_std"][1]),
        "attn_index": arrs["attn_index"].astype(index_dtype(spec)),
        "crop": arrs["crop"].astype("<i4"),
        "flip": arrs["flip"].astype(bool),
    }
    if spec.codec == "float16":
        for name in ("features", "attn_logits"):
            with np.errstate(over="ignore"):
                a = arrs[name].astype("<f2")
            if not np.isfinite(a).all():
                raise CacheError(f"record {key!r}: {name} overflows float16 (|x| > 65504); "
                                 "use codec int8")
            out[name] = a
    elif spec.codec == compact.NAME:
        for name in ("feature_mean", "feature_std"):
            if not np.isfinite(out[name]).all():
                raise CacheError(f"record {key!r}: {name} overflows float16 (|x| > 65504)")
        if encoded:
            if not np.isfinite(arrs["attn_max"]).all():
                raise CacheError(f"record {key!r}: {compact.ROW_MAX_OVERFLOW}")
            out.update({name: arrs[name] for name in compact.PAYLOAD_FIELDS})
        else:
            try:
                views = [compact.encode_view(arrs["features"][v], arrs["attn_logits"][v],
                                             spec.codec_params, key=key, view=first_view + v)
                         for v in range(K)]
            except ValueError as e:
                raise CacheError(f"record {key!r}: {e}") from None
            for name in views[0]:
                out[name] = np.stack([v[name] for v in views])
    else:
        out["features"], out["features_scale"] = quantize_rows(arrs["features"])
        out["attn_logits"], out["attn_logits_scale"] = quantize_rows(arrs["attn_logits"])
    for name, (_shape, dt) in fields.items():
        out[name] = np.ascontiguousarray(out[name], dtype=dt)
    return out, {"label": label, "source_size": [h, w]}


def is_encoded(view_records: dict) -> bool:
    """Whether a record holds the lowrank codec's stored arrays (encoded on the base model's
    device) rather than float features and attention logits."""
    return "features_u" in view_records


def encoder_of(view_records: dict) -> str:
    """The name of the encoder a record's lowrank arrays come from (``numpy``: the writer's)."""
    if not is_encoded(view_records):
        return "numpy"
    return str(view_records.get("encoder") or "pre-encoded")


# ---------------------------------------------------------------------------------------------
# reading: stored arrays of one view -> record

def decode_view(stored: dict[str, np.ndarray], decode: bool | str) -> dict[str, np.ndarray]:
    """Stored arrays of one view -> the record the reader returns.

    decode=True: features [L,C] and attn_logits [H,k_max+1,L] float32 (int8 / lowrank
    dequantised, scales dropped), attn_index int64, crop int64, flip bool (0-d).
    decode=False: the stored arrays as is. decode='payload': the lowrank codec's quantised payload
    unpacked to integer codes and float32 scales (``compact.unpack_payload``), to be dequantised
    on the training device; other codecs as decode=True.
    """
    if not decode:
        return dict(stored)
    if "features_u" in stored:
        out = {"feature_mean": stored["feature_mean"].astype(np.float32),
               "feature_std": stored["feature_std"].astype(np.float32),
               "attn_index": stored["attn_index"].astype(np.int64),
               "crop": stored["crop"].astype(np.int64),
               "flip": np.asarray(stored["flip"], dtype=bool)}
        payload = compact.unpack_payload(stored)
        if decode == "payload":
            out.update(payload)
        else:
            out["features"], out["attn_logits"] = compact.dequantize_payload(payload)
        return out
    out = {
        "feature_mean": stored["feature_mean"].astype(np.float32),
        "feature_std": stored["feature_std"].astype(np.float32),
        "attn_index": stored["attn_index"].astype(np.int64),
        "crop": stored["crop"].astype(np.int64),
        "flip": np.asarray(stored["flip"], dtype=bool),
    }
    if "features_scale" in stored:
        out["features"] = dequantize_rows(stored["features"], stored["features_scale"])
        out["attn_logits"] = dequantize_rows(stored["attn_logits"], stored["attn_logits_scale"])
    else:
        out["features"] = stored["features"].astype(np.float32)
        out["attn_logits"] = stored["attn_logits"].astype(np.float32)
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
_npy_layouts: dict[bytes, tuple[tuple, bool, np.dtype]] = {}


def npy_load(data) -> np.ndarray:
    """An .npy payload -> a new, writable array (as ``np.load(..., allow_pickle=False)``).

    The header of each distinct layout is parsed once and remembered: np.load parses it with
    ``ast.literal_eval`` on every call (~130 us, more than copying a ViT-B record's features),
    and a cache's records share a handful of layouts. Object arrays are refused as np.load
    refuses them; a payload shorter than its header says raises ValueError."""
    view = memoryview(data)
    if len(view) < 10 or view[:6] != _NPY_MAGIC or view[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)
    width = 2 if view[6] == 1 else 4
    start = 8 + width + int.from_bytes(view[8:8 + width], "little")
    header = bytes(view[:start])
    layout = _npy_layouts.get(header)
    if layout is None:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        layout = read(f)
        if layout[2].hasobject:
            return np.load(io.BytesIO(data), allow_pickle=False)  # refuses object arrays
        if len(_npy_layouts) < 1024:
            _npy_layouts[header] = layout
    shape, fortran, dtype = layout
    count = math.prod(shape)
    flat = np.frombuffer(view, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
