"""Schema v1 of the target cache: the record layout, the cache spec and the manifest.

One logical record per (sample, view). Its tensors, as the caller writes them (K = views):

    features      [K, L, C]          patch-normalised base-model features
    feature_mean  [K, C]             float32, so the raw target is recoverable
    feature_std   [K, C]             float32
    attn_logits   [K, H, k_max+1, L] pre-softmax logits: cls row, then the top-k_max rows
    attn_index    [K, k_max]         patch indices of the selected rows (int)
    crop          [K, 4]             crop box in source pixels: top, left, height, width
    flip          [K]                horizontal flip (bool)

plus, per sample, ``key`` (str), ``label`` (int, -1 if none) and ``source_size`` (h, w).

What is stored per view depends on the codec (see ``stored_fields``): float16 keeps
``features``/``attn_logits`` as float16; int8 keeps them as int8 with one float32 scale per row
(``features_scale`` [L], ``attn_logits_scale`` [H, k_max+1]); lowrank (schema v2, see
``storage/compact.py``) keeps quantised low-rank feature factors, packed attention codes and
float16 feature statistics.

Schema versions: v1 (float16 and int8 only) and v2 (adds the lowrank codec, ``spec.codec_params``
and the ``targets`` manifest section: the stage-1 precision, part of the identity, and the measured
target error). float16 / int8 records are laid out the same in both; this code reads both and
writes v2.

The manifest (``manifest.json`` at the cache root) is plain JSON: format name, schema version,
spec, base-model fingerprint, view policy, source fingerprint, codec, the part list and, after
``CacheWriter.finalize()``, per-part completion and checksums.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from . import compact

FORMAT_NAME = "tec-target-cache"
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

CODECS = ("float16", "int8", compact.NAME)
BACKENDS = ("zarr", "webdataset")
PIXEL_FORMATS = ("none", "jpeg", "png")
COMPRESSIONS = ("blosc", "none")

# Manifest sections that define a cache's identity (resume compares exactly these).
IDENTITY_KEYS = ("format", "schema_version", "spec", "base_model", "view_policy", "source", "parts")
# v2 adds the stage-1 settings that shape the targets (the base model's forward precision)
IDENTITY_KEYS_V2 = IDENTITY_KEYS + ("targets",)


def identity_keys(manifest: dict) -> tuple[str, ...]:
    """The identity sections of a manifest of its schema version (v1 caches keep theirs)."""
    return IDENTITY_KEYS if manifest.get("schema_version") == 1 else IDENTITY_KEYS_V2

_PART_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


class CacheError(ValueError):
    """A target cache that cannot be used as asked; the message is one line naming what and why."""


class PartCommittedError(CacheError):
    """The part being opened or committed is already committed (by another writer, e.g. a retried
    or orphaned task of the same cache). Parts are deterministic, so a caller that only wants the
    part to exist may treat this as done; the committed copy is left untouched."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part

    def __reduce__(self):
        return type(self), (str(self), self.part)


@dataclass(frozen=True)
class CacheSpec:
    """Shapes and encoding of a cache.

    num_patches: L; channels: C; heads: H; k_max: attention rows besides cls; views: K per sample.
    codec: 'float16' (default), 'int8' (per-row absmax scales) or 'lowrank' (compact, lossy;
    ``codec_params`` as in storage/compact.py, defaults filled in; None for the other codecs).
    backend: 'zarr' (random access) or 'webdataset' (streaming tar shards).
    compression: 'blosc' (zstd level 1 with byte shuffle, lossless; default) or 'none'.
    """

    num_patches: int
    channels: int
    heads: int
    k_max: int
    views: int
    codec: str = "float16"
    backend: str = "zarr"
    compression: str = "blosc"
    codec_params: dict | None = None
    # view pixels (storage/pixels.py): 'none' | 'jpeg' | 'png'; quality for jpeg; image_size S
    pixels: str = "none"
    pixels_quality: int = 90
    image_size: int = 0

    def __post_init__(self) -> None:
        for name in ("num_patches", "channels", "heads", "k_max", "views"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise CacheError(f"CacheSpec.{name}={value!r} must be a positive integer")
        if self.k_max > self.num_patches:
            raise CacheError(f"CacheSpec.k_max={self.k_max} exceeds num_patches={self.num_patches}")
        if self.codec not in CODECS:
            raise CacheError(f"CacheSpec.codec={self.codec!r} is not one of {', '.join(CODECS)}")
        if self.codec == compact.NAME:
            try:
                params = compact.check_params(self.codec_params)
                compact.rank_for(params, int(self.num_patches), int(self.channels))
            except compact.CodecParamError as e:
                raise CacheError(str(e)) from None
            object.__setattr__(self, "codec_params", params)
        elif self.codec_params:
            raise CacheError(f"CacheSpec.codec_params: codec {self.codec} takes no parameters "
                             f"(got {', '.join(sorted(self.codec_params))})")
        else:
            object.__setattr__(self, "codec_params", None)
        if self.backend not in BACKENDS:
            raise CacheError(f"CacheSpec.backend={self.backend!r} is not one of "
                             f"{', '.join(BACKENDS)}")
        if self.compression not in COMPRESSIONS:
            raise CacheError(
                f"CacheSpec.compression={self.compression!r} is not one of "
                f"{', '.join(COMPRESSIONS)}")
        if self.pixels not in PIXEL_FORMATS:
            raise CacheError(f"CacheSpec.pixels={self.pixels!r} is not one of "
                             f"{', '.join(PIXEL_FORMATS)}")
        if self.pixels != "none":
            q, s = self.pixels_quality, self.image_size
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 100:
                raise CacheError(f"CacheSpec.pixels_quality={q!r} must be an integer in [1, 100]")
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise CacheError(f"CacheSpec.image_size={s!r} must be a positive integer when "
                                 f"pixels are stored")

    @property
    def rows(self) -> int:
        """Attention rows per head: the cls query plus k_max selected patches."""
        return self.k_max + 1

    def to_dict(self) -> dict:
        d = {k: (int(v) if isinstance(v, (int, np.integer)) else v)
             for k, v in asdict(self).items()}
        if self.pixels == "none":  # a cache without pixels keeps the spec (identity) it always had
            for k in ("pixels", "pixels_quality", "image_size"):
                d.pop(k)
        if self.codec_params is None:  # likewise a float16 / int8 cache (no codec parameters)
            d.pop("codec_params")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CacheSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CacheError(f"unknown CacheSpec field(s) {', '.join(unknown)} in manifest")
        return cls(**d)


def index_dtype(spec: CacheSpec) -> np.dtype:
    """Stored dtype of attn_index: the smallest signed int that holds a patch index."""
    return np.dtype("<i2") if spec.num_patches <= np.iinfo(np.int16).max else np.dtype("<i4")


def stored_fields(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-view stored arrays: name -> (shape without the [slot, view] axes, little-endian
    dtype)."""
    L, C, H, R = spec.num_patches, spec.channels, spec.heads, spec.rows
    if spec.codec == compact.NAME:
        out = {"feature_mean": ((C,), np.dtype("<f2")), "feature_std": ((C,), np.dtype("<f2"))}
        out.update(compact.stored_fields(L, C, H, R, spec.codec_params))
        out.update({"attn_index": ((spec.k_max,), index_dtype(spec)),
                    "crop": ((4,), np.dtype("<i4")), "flip": ((), np.dtype("bool"))})
        return out
    big = np.dtype("<f2") if spec.codec == "float16" else np.dtype("i1")
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "features": ((L, C), big),
        "feature_mean": ((C,), np.dtype("<f4")),
        "feature_std": ((C,), np.dtype("<f4")),
        "attn_logits": ((H, R, L), big),
        "attn_index": ((spec.k_max,), index_dtype(spec)),
        "crop": ((4,), np.dtype("<i4")),
        "flip": ((), np.dtype("bool")),
    }
    if spec.codec == "int8":
        out["features_scale"] = ((L,), np.dtype("<f4"))
        out["attn_logits_scale"] = ((H, R), np.dtype("<f4"))
    return out


def record_nbytes(spec: CacheSpec) -> int:
    """Bytes of one (sample, view) record's stored tensors, before compression or any framing."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize
               for shape, dt in stored_fields(spec).values())


def decoded_nbytes(spec: CacheSpec) -> int:
    """Bytes of one record decoded to float32 tensors (features, stats, attn_logits, int64
    index)."""
    L, C, H, R = spec.num_patches, spec.channels, spec.heads, spec.rows
    return 4 * (L * C + 2 * C + H * R * L) + 8 * spec.k_max


def check_part_name(name: str) -> str:
    """Part names become directory and file names: letters, digits, '_', '.', '-' (<= 200)."""
    if not isinstance(name, str) or not _PART_NAME.match(name):
        raise CacheError(
            f"part name {name!r} is not usable as a file name; use letters, digits, '_', '.', '-' "
            f"(see storage.part_name_for)")
    return name


def part_name_for(shard: str) -> str:
    """A valid part name derived from a source shard id (its base name, extension dropped)."""
    base = str(shard).rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".-") or "part"
    return base[:200]


def jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def record_schema(spec: CacheSpec) -> dict:
    """Human-readable description of the stored record, written into the manifest."""
    names = {"features": "[L,C]", "feature_mean": "[C]", "feature_std": "[C]",
             "attn_logits": "[H,k_max+1,L]", "attn_index": "[k_max]",
             "crop": "[4] top,left,height,width",
             "flip": "[]", "features_scale": "[L] absmax/127 over C",
             "attn_logits_scale": "[H,k_max+1] absmax/127 over L",
             "features_u": "[L,ceil(r*fb/8)] packed codes of A (Y ~ A B)",
             "features_u_scale": "[r] per column of A",
             "features_v": "[r,ceil(C*fb/8)] packed codes of B",
             "features_v_scale": "[r] per row of B",
             "attn_codes": "[H,k_max+1,ceil(L*ab/8)] packed codes of row max - logit",
             "attn_max": "[H,k_max+1] row maxima", "attn_step": "[H,k_max+1] row steps"}
    return {name: {"shape": list(shape), "dtype": dt.name, "axes": names[name]}
            for name, (shape, dt) in stored_fields(spec).items()}


def build_manifest(spec: CacheSpec, *, base_model: dict, view_policy: dict, source: dict,
                   parts: list[tuple[str, int]], codec_config: dict,
                   targets: dict | None = None) -> dict:
    """The manifest written at create time (no part status yet).

    targets: the stage-1 settings that shape the targets besides the base model (e.g.
    ``{'precision': 'float32'}``); part of the identity."""
    seen: set[str] = set()
    part_list = []
    for entry in parts:
        try:
            name, slots = entry
        except (TypeError, ValueError):
            raise CacheError(f"parts entry {entry!r} must be a (part name, slots) pair") from None
        check_part_name(name)
        if name in seen:
            raise CacheError(f"part {name!r} is listed twice in parts")
        seen.add(name)
        if not isinstance(slots, (int, np.integer)) or isinstance(slots, bool) or slots < 0:
            raise CacheError(f"part {name!r}: slots={slots!r} must be a non-negative integer")
        part_list.append({"name": name, "slots": int(slots)})
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "spec": spec.to_dict(),
        "base_model": jsonable(dict(base_model)),
        "view_policy": jsonable(dict(view_policy)),
        "source": jsonable(dict(source)),
        "parts": part_list,
        "targets": jsonable(dict(targets or {})),
        "codec": codec_config,
        "record": record_schema(spec),
        "complete": False,
        "part_status": {},
    }


def _canonical_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_identity(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys) of the manifest's identity sections.

    Every commit marker records it (``manifest_identity``), so a manifest edited after a part was
    committed (view policy, base model, spec, source, part list) is detected by `verify_cache`
    and refused by `open_cache`.
    """
    return _canonical_sha256({key: manifest.get(key) for key in identity_keys(manifest)})


def manifest_section_digests(manifest: dict) -> dict[str, str]:
    """sha256 of each identity section alone (markers keep them to name an edited section)."""
    return {key: _canonical_sha256(manifest.get(key)) for key in identity_keys(manifest)}


def identity_mismatch(existing: dict, wanted: dict) -> list[str]:
    """Dotted names of the identity fields that differ between two manifests ([] = same cache)."""
    diffs: list[str] = []
    keys = identity_keys(existing)
    for key in keys + tuple(k for k in identity_keys(wanted) if k not in keys):
        _diff(key, existing.get(key, "<absent>"), wanted.get(key, "<absent>"), diffs)
    return diffs


def _diff(prefix: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(f"{prefix}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>"), out)
    elif prefix == "parts" and isinstance(a, list) and isinstance(b, list) and a != b:
        an = {p.get("name"): p.get("slots") for p in a if isinstance(p, dict)}
        bn = {p.get("name"): p.get("slots") for p in b if isinstance(p, dict)}
        changed = sorted(n for n in set(an) | set(bn) if an.get(n) != bn.get(n))
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        out.append(f"parts ({shown})" if changed else "parts (order)")
    elif a != b:
        out.append(prefix)


def fingerprint_mismatch(manifest_base_model: dict, expected: dict) -> list[str]:
    """One 'field: cache=X expected=Y' line per base-model field that differs ([] = match).

    Values are compared as they read back from JSON, so a tuple equals the list it was saved as.
    A field present on one side only is reported with '<absent>' on the other.
    """
    a, b = jsonable(dict(manifest_base_model)), jsonable(dict(expected))
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: cache={_short(va)} expected={_short(vb)}")
    return out


def _short(v: Any, limit: int = 80) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_manifest_readable(manifest: Any, where: str) -> None:
    """Refuse a manifest of another format or of a schema version this code does not read."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{where} is not a {FORMAT_NAME} manifest (format={fmt!r})")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CacheError(
            f"{where}: unknown cache schema version {version!r}; this code reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} - rebuild the cache or use the "
            f"pipeline version that wrote it")
    spec = manifest.get("spec")
    codec = spec.get("codec") if isinstance(spec, dict) else None
    if codec not in CODECS:
        raise CacheError(
            f"{where}: the cache's codec {codec!r} cannot be decoded by this version (it decodes "
            f"{', '.join(CODECS)}) - use the pipeline version that wrote it")
