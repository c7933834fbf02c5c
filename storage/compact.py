"""The compact ``lowrank`` codec: a ViT-B/16 view in <= 48 KiB (float16: 332 KiB).

Per (sample, view) record, with L patches, C channels, H heads, R = k_max + 1 attention rows:

features [L, C] (patch-normalised) -> a rank-r factorisation Y ~ A B, computed per view from the
    eigenvectors of the smaller Gram matrix (Y Y^T or Y^T Y), A [L, r], B [r, C]. A is quantised to
    ``factor_bits`` signed levels with one scale per column (component), then B is refitted by
    least squares to the quantised A (which absorbs most of A's rounding) and quantised with one
    scale per row. The rank is ``rank`` when given, else the largest r whose factors fit in
    ``feature_bits`` bits per feature value: r = floor(feature_bits * L * C / (factor_bits * (L + C)
    + 32)). A bit budget transfers between geometries; a rank fraction does not (the miniature's
    49 x 96 features keep 99.9% of their energy at rank 24, ViT-B's 196 x 768 need far more).
attn_logits [H, R, L] -> per row: the row maximum m (float16), then d = m - x clamped at
    ``attn_floor`` (logit units: exp(-16) of the top weight at tau 1 is ~1e-7, below anything a
    softmax target can express at tau >= 1) and quantised to ``attn_bits`` unsigned levels over
    [0, min(max d, attn_floor)] with one step per row (float16). Rounding the row maximum shifts
    the whole row, which softmax ignores.
feature_mean, feature_std [C] -> float16 (relative error <= 5e-4; used only by the channel/none
    feature modes to undo the normalisation).

Rounding (``rounding``): ``nearest`` (default) rounds to the nearest level; ``stochastic`` draws
q = floor(x / step + u), u ~ U[0, 1) from a generator seeded by sha256(key, view), so
E[q * step] = x (zero-mean noise: the squared feature loss sees extra variance, not bias) and a
record is bit-identical whenever it is encoded again (a rerun, a transcode). On the learned
miniature targets stochastic rounding raised the feature error from 0.23 to 0.26 and doubled the
attention error at the same bits (benchmarks/README.md "Storage"), so nearest is the default.

Stored fields (codes are unsigned, packed MSB-first per row; signed factor codes are offset by
2^(b-1)):

    features_u        [L, ceil(r * fb / 8)]    uint8   A's codes
    features_u_scale  [r]                      float16 A's column scales
    features_v        [r, ceil(C * fb / 8)]    uint8   B's codes
    features_v_scale  [r]                      float16 B's row scales
    attn_codes        [H, R, ceil(L * ab / 8)] uint8   d's codes
    attn_max          [H, R]                   float16 row maxima
    attn_step         [H, R]                   float16 row steps
    feature_mean, feature_std [C] float16; attn_index, crop, flip as in every codec

Decoding: ``unpack_payload`` gives the integer codes and scales (for dequantisation on the training
device), ``dequantize_payload`` the float32 tensors:

    features    = ((u - 2^(fb-1)) * u_scale) @ ((v - 2^(fb-1)) * v_scale[:, None])     [L, C]
    attn_logits = attn_max[..., None] - attn_codes * attn_step[..., None]               [H, R, L]

The bit widths follow from the stored shapes (ceil(n * b / 8) is strictly increasing in b for
n >= 8, and the codec requires L, C >= 8), so a reader needs no parameters.

Where encoding happens (``targets.encode_on``): this module is the reference encoder, numpy on
one CPU core, ~6.5 ms of CPU time per ViT-B view (one thread on a loaded 2-core VM; ~40% of it
the float64 eigendecomposition). Stage 1 runs it in the shard task's writer on a
CPU-only run, and ``tec cache transcode`` always. A GPU base model does thousands of ViT-B views
per second, which this encoder would need 10+ cores per GPU to follow, and its float32 input
(768,320 B a ViT-B view) would cross Ray's object store before shrinking to ~46 KB. So when the
base-model actors have GPUs, stage 1 encodes in the actor right after the forward pass with
:mod:`storage.compact_torch` (the same algorithm and format in torch, batched over the views of
a forward pass) and sends only the stored arrays. Both encoders write this format and decode
to the same error statistics; the bytes differ (eigenvector signs, last-ulp rounding), which is
why a part records the encoder that wrote it and is never written by both.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

NAME = "lowrank"

DEFAULTS: dict = {
    "feature_bits": 1.2,    # bits per feature value for the factors (sets the rank)
    "rank": None,           # an explicit rank instead of feature_bits
    "factor_bits": 4,
    "attn_bits": 4,
    "attn_floor": 16.0,
    "rounding": "nearest",  # lower error than stochastic on learned targets (storage benchmark)
}

ALLOWED: dict[str, str] = {
    "feature_bits": "a number in [0.05, 16]",
    "rank": "null or an integer >= 1 (at most min(L, C) of the base model)",
    "factor_bits": "an integer in 2..8",
    "attn_bits": "an integer in 2..8",
    "attn_floor": "a number in [1, 1000] (logit units)",
    "rounding": "stochastic or nearest",
}

# the one-line error of a view whose attention row maximum does not fit float16 (both encoders)
ROW_MAX_OVERFLOW = "attn_logits overflow float16 row maxima (|x| > 65504)"

PAYLOAD_FIELDS = ("features_u", "features_u_scale", "features_v", "features_v_scale",
                  "attn_codes", "attn_max", "attn_step")


class CodecParamError(ValueError):
    """A codec parameter that is unknown or out of range (message: key and allowed values)."""


def check_params(params: dict | None) -> dict:
    """Validate ``params`` and return the full parameter set (defaults filled in)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise CodecParamError(f"codec_params.{unknown[0]}: unknown parameter of codec {NAME}; "
                              f"allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **params}

    def bad(key: str) -> CodecParamError:
        return CodecParamError(f"codec_params.{key}={out[key]!r} is out of range for codec "
                               f"{NAME}; allowed: {ALLOWED[key]}")

    def number(key: str, lo: float, hi: float) -> float:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise bad(key)
        return float(v)

    def integer(key: str, lo: int, hi: int) -> int:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise bad(key)
        return int(v)

    out["feature_bits"] = number("feature_bits", 0.05, 16.0)
    if out["rank"] is not None:
        out["rank"] = integer("rank", 1, 1 << 20)
    out["factor_bits"] = integer("factor_bits", 2, 8)
    out["attn_bits"] = integer("attn_bits", 2, 8)
    out["attn_floor"] = number("attn_floor", 1.0, 1000.0)
    if out["rounding"] not in ("stochastic", "nearest"):
        raise bad("rounding")
    return out


def rank_for(params: dict, num_patches: int, channels: int) -> int:
    """The factorisation rank at geometry (L, C): ``rank`` if given, else from feature_bits."""
    L, C = num_patches, channels
    if min(L, C) < 8:
        raise CodecParamError(f"codec {NAME} needs at least 8 patches and 8 channels "
                              f"(got L={L}, C={C}); use codec float16 or int8")
    if params["rank"] is not None:
        if params["rank"] > min(L, C):
            raise CodecParamError(f"codec_params.rank={params['rank']} is out of range for codec "
                                  f"{NAME}; allowed: 1..{min(L, C)} (min(L, C) of the base model)")
        return int(params["rank"])
    # codes of one column of A and row of B + 2 scales
    per_rank = params["factor_bits"] * (L + C) + 32
    return int(min(max(1, math.floor(params["feature_bits"] * L * C / per_rank)), min(L, C)))


def packed_width(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def stored_fields(
    L: int, C: int, H: int, R: int, params: dict
) -> dict[str, tuple[tuple, np.dtype]]:
    """The codec's own stored arrays per view: name -> (shape, dtype)."""
    r = rank_for(params, L, C)
    fb, ab = params["factor_bits"], params["attn_bits"]
    u8, f2 = np.dtype("u1"), np.dtype("<f2")
    return {
        "features_u": ((L, packed_width(r, fb)), u8),
        "features_u_scale": ((r,), f2),
        "features_v": ((r, packed_width(C, fb)), u8),
        "features_v_scale": ((r,), f2),
        "attn_codes": ((H, R, packed_width(L, ab)), u8),
        "attn_max": ((H, R), f2),
        "attn_step": ((H, R), f2),
    }


# ---------------------------------------------------------------------------------------------
# bit packing

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., N] (< 2**bits) -> bytes [..., ceil(N * bits / 8)], MSB first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    n = codes.shape[-1]
    if bits == 4:
        if n % 2:
            codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
        return ((codes[..., 0::2] << 4) | codes[..., 1::2]).astype(np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (codes[..., None] >> shifts) & 1  # [..., N, bits]
    return np.packbits(planes.reshape(codes.shape[:-1] + (n * bits,)), axis=-1)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_codes: bytes [..., W] -> uint8 codes [..., n]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :n]
    if bits == 4:
        out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
        out[..., 0::2] = packed >> 4
        out[..., 1::2] = packed & 15
        return out[..., :n]
    # other widths: 8 codes fill ``bits`` bytes exactly; read each such group as one big-endian
    # integer and shift the codes out (3.5x faster than unpackbits + a weighted sum at 3 bits)
    groups = -(-n // 8)
    need = groups * bits
    lead = packed.shape[:-1]
    if packed.shape[-1] < need:  # the last group's missing bytes: zero padding
        packed = np.concatenate([packed, np.zeros(lead + (need - packed.shape[-1],), np.uint8)],
                                axis=-1)
    g = packed[..., :need].reshape(lead + (groups, bits)).astype(np.uint64)
    value = g[..., 0]
    for j in range(1, bits):
        value = (value << np.uint64(8)) | g[..., j]
    shifts = np.uint64(bits) * np.arange(7, -1, -1, dtype=np.uint64)
    codes = (value[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(lead + (groups * 8,))[..., :n].astype(np.uint8)


def bits_from_width(width: int, n: int) -> int:
    """The bit width b with ceil(n * b / 8) == width (unique for n >= 8)."""
    for b in range(1, 9):
        if packed_width(n, b) == width:
            return b
    raise ValueError(f"no bit width packs {n} values into {width} bytes")


# ---------------------------------------------------------------------------------------------
# encoding

def record_seed(key: str, view: int) -> int:
    """The dither seed of record (key, view): the same on every machine and every encode."""
    return int.from_bytes(hashlib.sha256(f"{key}\0{int(view)}".encode()).digest()[:8], "little")


def _round(x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if rng is None:
        return np.rint(x)
    return np.floor(x + rng.random(x.shape, dtype=np.float32))


def _signed(x: np.ndarray, scale_axis: int, bits: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantisation with one absmax scale per slice along scale_axis (float16 scales).

    Returns (unsigned codes = q + 2^(bits-1), scales float16)."""
    qmax = (1 << (bits - 1)) - 1
    reduce_axis = 1 - scale_axis
    absmax = np.abs(x).max(axis=reduce_axis)
    scale = (absmax / qmax).astype(np.float16)
    s = scale.astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    q = _round(x / np.expand_dims(safe, reduce_axis), rng)
    q = np.clip(q, -qmax, qmax)
    q = np.where(np.expand_dims(s, reduce_axis) > 0, q, 0)
    return (q + (1 << (bits - 1))).astype(np.uint8), scale


def factorize(y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-r factorisation y ~ a @ b of y [L, C] (float32): a [L, r], b [r, C]."""
    L, C = y.shape
    y64 = y.astype(np.float64)
    if L <= C:
        _, vec = np.linalg.eigh(y64 @ y64.T)
        a = vec[:, ::-1][:, :rank]          # orthonormal columns
        return a.astype(np.float32), (a.T @ y64).astype(np.float32)
    _, vec = np.linalg.eigh(y64.T @ y64)
    v = vec[:, ::-1][:, :rank]
    return (y64 @ v).astype(np.float32), v.T.astype(np.float32)


def encode_features(y: np.ndarray, params: dict, rank: int, rng) -> dict[str, np.ndarray]:
    """y [L, C] -> features_u, features_u_scale, features_v, features_v_scale."""
    fb = params["factor_bits"]
    a, _ = factorize(np.asarray(y, np.float32), rank)
    ua, sa = _signed(a, 1, fb, rng)                       # per column of A
    a_hat = (ua.astype(np.float32) - (1 << (fb - 1))) * sa.astype(np.float32)
    # least-squares refit of B to the quantised A: B = argmin |Y - A_hat B|
    a64 = a_hat.astype(np.float64)
    b = np.linalg.pinv(a64.T @ a64) @ (a64.T @ np.asarray(y, np.float64))
    ub, sb = _signed(b.astype(np.float32), 0, fb, rng)    # per row of B
    return {"features_u": pack_codes(ua, fb), "features_u_scale": sa,
            "features_v": pack_codes(ub, fb), "features_v_scale": sb}


def encode_attention(x: np.ndarray, params: dict, rng) -> dict[str, np.ndarray]:
    """x [H, R, L] logits -> attn_codes, attn_max, attn_step."""
    ab = params["attn_bits"]
    levels = (1 << ab) - 1
    x = np.asarray(x, np.float32)
    top = x.max(axis=-1)
    top16 = top.astype(np.float16)
    if not np.isfinite(top16).all():
        raise ValueError(ROW_MAX_OVERFLOW)
    d = top16.astype(np.float32)[..., None] - x  # >= -(rounding of the max), ~0 at the top
    span = np.minimum(np.maximum(d.max(axis=-1), 0.0), params["attn_floor"])
    step = (span / levels).astype(np.float16)
    s = step.astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.clip(_round(np.maximum(d, 0.0) / safe[..., None], rng), 0, levels)
    q = np.where(s[..., None] > 0, q, 0).astype(np.uint8)
    return {"attn_codes": pack_codes(q, ab), "attn_max": top16, "attn_step": step}


def encode_view(features: np.ndarray, attn_logits: np.ndarray, params: dict, *, key: str,
                view: int) -> dict[str, np.ndarray]:
    """One view's features [L, C] and attn_logits [H, R, L] -> the codec's stored arrays."""
    L, C = features.shape
    rng = np.random.default_rng(record_seed(key, view)) if params["rounding"] == "stochastic" \
        else None
    out = encode_features(features, params, rank_for(params, L, C), rng)
    out.update(encode_attention(attn_logits, params, rng))
    return out


# ---------------------------------------------------------------------------------------------
# decoding

def unpack_payload(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The quantised payload of one view (or of a batch: leading axes are kept) as integers and
    scales, ready to be dequantised on the training device:

    features_u int8 [..., L, r], features_u_scale float32 [..., r], features_v int8 [..., r, C],
    features_v_scale float32 [..., r], attn_codes uint8 [..., H, R, L], attn_max and attn_step
    float32 [..., H, R]. Dequantise with ``dequantize_payload`` (or its two lines in torch).
    """
    r = stored["features_u_scale"].shape[-1]
    C = stored["feature_mean"].shape[-1]
    L = stored["features_u"].shape[-2]
    fb = bits_from_width(stored["features_v"].shape[-1], C)
    ab = bits_from_width(stored["attn_codes"].shape[-1], L)
    offset = np.int16(1 << (fb - 1))
    u = (unpack_codes(stored["features_u"], fb, r).astype(np.int16) - offset).astype(np.int8)
    v = (unpack_codes(stored["features_v"], fb, C).astype(np.int16) - offset).astype(np.int8)
    return {
        "features_u": u, "features_u_scale": stored["features_u_scale"].astype(np.float32),
        "features_v": v, "features_v_scale": stored["features_v_scale"].astype(np.float32),
        "attn_codes": unpack_codes(stored["attn_codes"], ab, L),
        "attn_max": stored["attn_max"].astype(np.float32),
        "attn_step": stored["attn_step"].astype(np.float32),
    }


def dequantize_payload(payload: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """unpack_payload's arrays -> (features [..., L, C], attn_logits [..., H, R, L]) float32."""
    a = payload["features_u"].astype(np.float32) * payload["features_u_scale"][..., None, :]
    b = payload["features_v"].astype(np.float32) * payload["features_v_scale"][..., :, None]
    attn = payload["attn_max"][..., None] - \
        payload["attn_codes"].astype(np.float32) * payload["attn_step"][..., None]
    return np.matmul(a, b), attn


def describe(params: dict, L: int, C: int, H: int, R: int) -> dict:
    """The codec section of the manifest for this geometry (parameters, rank, bits per value)."""
    r = rank_for(params, L, C)
    fields = stored_fields(L, C, H, R, params)
    nbytes = {k: int(np.prod(s)) * dt.itemsize for k, (s, dt) in fields.items()}
    feat = nbytes["features_u"] + nbytes["features_u_scale"] + nbytes["features_v"] + \
        nbytes["features_v_scale"]
    attn = nbytes["attn_codes"] + nbytes["attn_max"] + nbytes["attn_step"]
    return {"params": dict(params), "rank": r,
            "bits_per_feature_value": round(8 * feat / (L * C), 4),
            "bits_per_attention_value": round(8 * attn / (H * R * L), 4),
            "feature_stats": "float16", "dither_seed": "sha256(key \\0 view)[:8] little-endian"
            if params["rounding"] == "stochastic" else None}
