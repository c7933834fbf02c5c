"""Batched record reads for stage 2: many (sample, view) records straight into stacked arrays.

``read_batch(reader, samples, views, fields)`` returns, per requested field, one array
[n, ...] in the field's *stored* dtype (float16, int8 plus scales, ... whatever the codec's
``stored_fields`` says), decoded from the shard bytes directly into the output (blosc decodes
into the array's memory: no intermediate copy), plus ``pixels``: the n encoded view images.
Dequantising is left to the consumer (stage 2 does it on the training device).

What it saves over ``CacheReader.read`` in a loop: records are visited in storage order (part,
slot) so reads of one part go to the same open files in ascending offsets; only the requested
fields are read (a run without the attention target never reads attn_logits); no per-record dict
of float32 copies is built.

I/O per record (Zarr backend): one pread of each requested field's chunk (its own bytes plus 4
crc bytes) and of its 16-byte shard-index entry. A part's whole shard index of a field (16 B per
record and view of the part) is read instead, once, when the batch itself reads at least 1/16
of the part's records (then the index costs at most 16 entry reads) or when it is already
loaded; random batches over an ImageNet-sized cache (1,000 parts) never load it, so the index
adds 16 B per field and record, not a part's index per record. The WebDataset backend reads
each record's tar members in one pread (all its fields and the tar headers).
"""
from __future__ import annotations

import os

import numpy as np

from . import compact
from .codecs import blosc_decode, decode_view
from .objstore import Url
from .schema import CacheError, index_dtype, stored_fields
from .zarr_backend import ZarrPartReader

try:  # numcodecs' blosc decodes into a given buffer (no copy); absent in old versions
    from numcodecs.blosc import decompress as _blosc_into
except ImportError:  # pragma: no cover
    _blosc_into = None


INDEX_LOAD_RATIO = 16


def fields_for(spec, *, attention: bool = True, views: bool = True) -> list[str]:
    """The stored fields a training step needs: features (+ mean/std, scales), attention
    (logits, index, scales) when used, crop/flip when views are checked."""
    names = [n for n in stored_fields(spec)
             if (attention or not n.startswith("attn_")) and (views or n not in ("crop", "flip"))]
    return names


def allocate(spec, fields: list[str], n: int) -> dict[str, np.ndarray]:
    """Empty output arrays [n, ...] in the stored dtypes (callers may pass their own, e.g. views
    of pinned or shared memory, to ``read_batch(out=...)``)."""
    table = stored_fields(spec)
    return {name: np.empty((n,) + table[name][0], dtype=table[name][1]) for name in fields}


def read_batch(reader, samples, views, fields: list[str] | None = None, *,
               pixels: bool = False, out: dict[str, np.ndarray] | None = None) -> dict:
    """Records (samples[i], views[i]) of an open CacheReader, stacked.

    samples, views: int arrays [n]. fields: stored field names (default: all). pixels: also
    return 'pixels' (list of n encoded images; the cache must store pixels).
    Returns {field: [n, ...] stored dtype, 'pixels': [bytes-like] * n}.
    """
    spec = reader.spec
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    if samples.shape != views.shape:
        raise ValueError(f"samples {samples.shape} and views {views.shape} differ in length")
    n = len(samples)
    table = stored_fields(spec)
    fields = list(table) if fields is None else list(fields)
    unknown = [f for f in fields if f not in table]
    if unknown:
        raise CacheError(f"cache {reader.root}: no stored field(s) {', '.join(unknown)} "
                         f"(codec {spec.codec} stores {', '.join(table)})")
    if pixels and spec.pixels == "none":
        raise CacheError(f"cache {reader.root} stores no view pixels (targets.pixels: none)")
    if views.size and (views.min() < 0 or views.max() >= spec.views):
        raise IndexError(f"view out of range [0, {spec.views})")
    base_views = getattr(reader, "_base_spec", spec).views
    if views.size and views.max() >= base_views:  # views added by `tec cache extend --views`
        return _read_layers(reader, samples, views, fields, pixels, out)
    result = out if out is not None else allocate(spec, fields, n)
    images: list = [None] * n
    located = [reader._locate(int(i)) for i in samples]
    order = sorted(range(n), key=lambda j: (located[j][0],
                                            int(reader._part_slots[located[j][0]][located[j][1]]),
                                            int(views[j])))
    blosc = spec.compression == "blosc"
    per_part = np.bincount([p for p, _ in located], minlength=len(reader.parts)) if n else []
    for j in order:
        p, local = located[j]
        v = int(views[j])
        part = reader._part_reader(p)
        try:
            if isinstance(part, ZarrPartReader):
                slot = int(reader._part_slots[p][local])
                whole = per_part[p] * INDEX_LOAD_RATIO >= part.slots * spec.views
                for name in fields:
                    data = part.read_chunk(name, slot, v,
                                           use_index_cache=whole or name in part._index_cache)
                    _decode_into(memoryview(data)[:-4], result[name][j:j + 1], blosc)
                if pixels:
                    images[j] = np.frombuffer(part.read_chunk(
                        "pixels", slot, v, use_index_cache=whole or "pixels" in part._index_cache
                    )[:-4], np.uint8)
            else:
                stored = _wds_record(part, local, v)
                for name in fields:
                    result[name][j] = stored[name]
                if pixels:
                    images[j] = stored["pixels"]
        except CacheError:
            raise
        except Exception as e:  # a chunk that passed its checksum but does not decode, I/O
            raise CacheError(f"part {reader.parts[p]} of cache {reader.root}: reading record "
                             f"{local} view {v} failed ({type(e).__name__}: {e}); run `tec cache "
                             f"verify`") from None
    if pixels:
        result["pixels"] = images
    return result


def _read_layers(reader, samples: np.ndarray, views: np.ndarray, fields: list[str],
                 pixels: bool, out: dict | None) -> dict:
    """read_batch of a grown cache: each record from the view layer that holds its view (the
    layers hold the same samples, so sample indices carry over; views are shifted)."""
    result = out if out is not None else allocate(reader.spec, fields, len(samples))
    images: list = [None] * len(samples)
    groups = [(0, reader._base_spec.views, reader)] + list(reader._layers)
    for start, stop, layer in groups:
        idx = np.flatnonzero((views >= start) & (views < stop))
        if not idx.size:
            continue
        got = read_batch(layer, samples[idx], views[idx] - start, fields, pixels=pixels)
        for name in fields:
            result[name][idx] = got[name]
        if pixels:
            for j, image in zip(idx.tolist(), got["pixels"]):
                images[j] = image
    if pixels:
        result["pixels"] = images
    return result


def _decode_into(payload: memoryview, dst: np.ndarray, blosc: bool) -> None:
    """Chunk bytes (without crc) -> dst (a C-contiguous array of the record's shape)."""
    if not blosc:
        dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload, np.uint8)
        return
    if _blosc_into is not None and dst.flags.c_contiguous:
        _blosc_into(payload, dst.reshape(-1).view(np.uint8))
    else:
        dst[...] = np.frombuffer(blosc_decode(payload), dst.dtype).reshape(dst.shape)


def _wds_record(part, local: int, view: int) -> dict:
    """One WebDataset record's stored arrays (+ encoded 'pixels') in one read of its members."""
    return part.read_view(local, view)


def device_payload(spec, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Stacked stored arrays -> what the training device dequantises itself, or None when the
    codec has no such form (then use ``decode_records``).

    float16 / int8: the stored arrays as they are (int8 with their float32 row scales). lowrank:
    ``compact.unpack_payload`` (integer factor codes, attention codes and float32 scales: the
    bit unpacking on the CPU, the matmul and the scaling on the device). feature_mean/std and
    attn_index ride along in their stored dtypes.
    """
    if spec.codec in ("float16", "int8"):
        return dict(stored)
    if spec.codec == compact.NAME:
        if "attn_codes" in stored:
            out = compact.unpack_payload(stored)
        else:  # a run without the attention target: the feature factors only
            C, r = stored["feature_mean"].shape[-1], stored["features_u_scale"].shape[-1]
            fb = compact.bits_from_width(stored["features_v"].shape[-1], C)
            offset = np.int16(1 << (fb - 1))
            out = {name: (compact.unpack_codes(stored[name], fb, n).astype(np.int16) - offset
                          ).astype(np.int8) for name, n in (("features_u", r), ("features_v", C))}
            out["features_u_scale"] = stored["features_u_scale"].astype(np.float32)
            out["features_v_scale"] = stored["features_v_scale"].astype(np.float32)
        for name in ("feature_mean", "feature_std", "attn_index"):
            if name in stored:
                out[name] = stored[name]
        return out
    return None


def decode_records(spec, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked stored arrays -> float32 records with the codec's own decoder (any codec), for
    consumers that cannot dequantise on their device. Returns features, attn_logits float32."""
    n = len(next(iter(stored.values())))
    rows = [decode_view({k: v[i] for k, v in stored.items() if k != "pixels"}, True)
            for i in range(n)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def view_order(reader, part: int, view: int) -> np.ndarray:
    """Part-local record numbers of part index ``part`` in the order their records lie in
    ``view-<view>.tar`` (ascending offsets): the order a stream reads them in."""
    if int(view) >= getattr(reader, "_base_spec", reader.spec).views:  # a view layer's tar
        first, layer = reader._layer_of(int(view))
        return view_order(layer, part, int(view) - first)
    table = reader._part_reader(part).records[:, int(view)]  # [samples, 3] offset, length, crc32
    return np.argsort(table[:, 0], kind="stable")


def stream_records(reader, part: int, view: int, records=None, *, block: int = 8 << 20,
                   parse: bool = True, into=None):
    """Stream records of one view of a committed WebDataset part, front to back.

    part: the part's index in ``reader.parts``. records: the part-local record numbers to read,
    in tar order (a subsequence of :func:`view_order`; default: all of them). Yields (sample
    index in the reader, stored arrays + encoded 'pixels') in that order: one sequential pass
    over ``view-<v>.tar`` that seeks over records not asked for, each record's crc32 checked (a
    local file: one unbuffered read per record, in file order, with the kernel's read-ahead; an
    object: buffered reads of ``block`` bytes). parse=False: yield the checked record bytes
    instead of the arrays (:func:`parse_record` makes them arrays; a shuffle buffer holds the
    bytes and parses a record when it leaves). into: n -> a writable buffer of n bytes to read
    the next record into (the caller's reused memory: no allocation per record).
    """
    import zlib

    from .wds_backend import view_tar_name

    spec = reader.spec
    if spec.backend != "webdataset":
        raise CacheError(f"cache {reader.root}: streaming reads WebDataset parts; this cache is "
                         f"{spec.backend} (use random access: read_batch)")
    if int(view) >= getattr(reader, "_base_spec", spec).views:  # a view layer's tar
        first, layer = reader._layer_of(int(view))
        yield from stream_records(layer, part, int(view) - first, records, block=block,
                                  parse=parse, into=into)
        return
    wds = reader._part_reader(part)
    table = wds.records[:, int(view)]  # [samples, 3] offset, length, crc32
    if records is None:
        records = np.argsort(table[:, 0], kind="stable")
    start = reader._starts[part]
    path = wds.dir / view_tar_name(int(view))
    part_name = reader.parts[part]
    with _open_stream(path, block) as f:
        position = 0
        for local in records:
            offset, n, crc = (int(x) for x in table[local])
            if offset != position:
                f.seek(offset)
            if into is None:
                data = f.read(n)
                got = len(data)
            else:
                data = into(n)
                got = f.readinto(data) or 0
            position = offset + n
            if got != n or zlib.crc32(data) != crc:
                raise CacheError(f"part {part_name} of cache {reader.root}: {path.name} record "
                                 f"{int(local)} is damaged or truncated; run `tec cache verify`")
            yield start + int(local), (parse_record(reader, data) if parse else data)


def parse_record(reader, data: bytes) -> dict:
    """A WebDataset record's bytes (its tar members) -> stored arrays + encoded 'pixels'."""
    from .wds_backend import iter_tar_members, members_to_stored

    try:
        members = {name.split(".", 1)[1]: body for name, body in iter_tar_members(data)}
        return members_to_stored(members, index_dtype(reader.spec))[0]
    except Exception as e:  # passed its crc32 but does not decode
        raise CacheError(f"cache {reader.root}: a streamed record does not decode "
                         f"({type(e).__name__}: {e}); run `tec cache verify`") from None


def _open_stream(path, block: int):
    """A file object for one sequential pass over a view tar (see stream_records)."""
    if isinstance(path, Url):
        return path.open("rb", block_size=block)
    f = open(path, "rb", buffering=0)  # records are large: a buffer would only add a copy
    try:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):  # not on every platform; a hint only
        pass
    return f


def stream_view(reader, part: str, view: int, *, block: int = 8 << 20):
    """Stream one view of every record of a committed WebDataset part, front to back.

    Yields (sample index in the reader, stored arrays + encoded 'pixels') in the order the
    records lie in ``view-<v>.tar``: one sequential read of the tar (buffered ``block`` bytes at
    a time), each record's crc32 checked. Bytes read per epoch = the view's tar (records plus
    tar headers), 1/K of the part: the streaming pattern for object stores and disks.
    """
    yield from stream_records(reader, reader.parts.index(part), view, block=block)
