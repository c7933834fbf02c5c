"""Zarr v3 backend: one zarr group per part, one sharded array per stored field.

    parts/<part>/zarr.json                      group; attributes: part, slots, views, codec and
                                                'samples': valid slots, keys, labels, source sizes
    parts/<part>/<field>/zarr.json              array [slots, K, ...], created once, final shape
    parts/<part>/<field>/c/0/0/...              ONE shard file holding the whole part
    parts/<part>/valid|label|source_size/...    per-slot arrays (one chunk each)
    parts/<part>/pixels.bin                     view pixels (targets.pixels: jpeg|png) only:
                                                encoded images in the shard byte layout below


Every array uses the sharding codec with inner chunk = one (sample, view) record
([1, 1, ...]) and shard = the whole part, inner codecs bytes(little) -> blosc -> crc32c and
index codecs bytes -> crc32c at the end of the shard: a part is ~2 files per field, and reading
one record reads one 16-byte index entry and that record's chunk, not the part.

zarr-python writes all metadata (zarr.json) and reads these arrays as any zarr v3 array (the tests
check it returns the same values). The record data itself is encoded and decoded here, in
exactly that format, because zarr-python costs about 1 ms per array per record access (7-9 ms
per ViT-B record here, against ~1.5 ms this way) and cannot append to a shard: writing a shard
in one go would mean holding a whole part (GBs for ImageNet) in memory. Here a part writer
appends each record's chunks to the shard files as they come and writes the shard index at
commit, so memory is O(index) and records may arrive in any slot order.

View pixels are variable-length encoded images, for which zarr v3 has no standard codec, so they
are not a zarr array: ``pixels.bin`` uses the same byte layout as a shard (each view's bytes
followed by their crc32c, then the [slots, K, 2] (offset, nbytes) index and its crc32c at the
end) and is read the same way.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import google_crc32c  # zarr's own crc32c implementation (a dependency of zarr 3)
import numpy as np

from .codecs import Compressor, blosc_decode, blosc_params
from .layout import HashingWriter, pread
from .schema import CacheError, CacheSpec, stored_fields

PIXELS_RELPATH = "pixels.bin"
EMPTY = np.uint64(2**64 - 1)
_EMPTY = 2**64 - 1
_DIM_NAMES = {
    "features": ["slot", "view", "patch", "channel"],
    "features_scale": ["slot", "view", "patch"],
    "feature_mean": ["slot", "view", "channel"],
    "feature_std": ["slot", "view", "channel"],
    "attn_logits": ["slot", "view", "head", "row", "patch"],
    "attn_logits_scale": ["slot", "view", "head", "row"],
    "attn_index": ["slot", "view", "rank"],
    "crop": ["slot", "view", "box"],
    "flip": ["slot", "view"],
    # lowrank codec (storage/compact.py)
    "features_u": ["slot", "view", "patch", "byte"],
    "features_u_scale": ["slot", "view", "component"],
    "features_v": ["slot", "view", "component", "byte"],
    "features_v_scale": ["slot", "view", "component"],
    "attn_codes": ["slot", "view", "head", "row", "byte"],
    "attn_max": ["slot", "view", "head", "row"],
    "attn_step": ["slot", "view", "head", "row"],
}


def crc32c_bytes(data: bytes) -> bytes:
    """The 4 checksum bytes zarr's crc32c codec appends (little-endian crc32c)."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def shard_relpath(field: str, ndim: int) -> str:
    """Path of the single shard of an array (default chunk key encoding, '/' separator)."""
    return "/".join([field, "c"] + ["0"] * ndim)


def _create_metadata(directory: Path, spec: CacheSpec, part: str, slots: int) -> None:
    """Create the group and arrays (metadata only) with zarr-python, in their final shape."""
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    K = spec.views
    group = zarr.open_group(store=str(directory), mode="w", zarr_format=3, attributes={
        "tec_part": part, "slots": slots, "views": K, "codec": spec.codec,
        "compression": spec.compression, "layout": "see storage/zarr_backend.py"})
    for name, (shape, dt) in stored_fields(spec).items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        inner = [BytesCodec()]
        if spec.compression == "blosc":
            inner.append(BloscCodec(**blosc_params(dt, nbytes)))
        inner.append(Crc32cCodec())
        sharding = ShardingCodec(chunk_shape=(1, 1) + shape, codecs=inner,
                                 index_codecs=[BytesCodec(), Crc32cCodec()], index_location="end")
        group.create_array(name, shape=(slots, K) + shape, chunks=(max(slots, 1), K) + shape,
                           serializer=sharding, compressors=None, filters=None, dtype=dt,
                           fill_value=0, dimension_names=_DIM_NAMES[name],
                           chunk_key_encoding={"name": "default", "separator": "/"})
    n = max(slots, 1)
    group.create_array("valid", shape=(slots,), chunks=(n,), dtype="bool", fill_value=False,
                       dimension_names=["slot"])
    group.create_array("label", shape=(slots,), chunks=(n,), dtype="<i8", fill_value=-1,
                       dimension_names=["slot"])
    group.create_array("source_size", shape=(slots, 2), chunks=(n, 2), dtype="<i4", fill_value=0,
                       dimension_names=["slot", "hw"])


class ZarrPartWriter:
    """Appends records to the shards of one part in a temp directory (see module docstring)."""

    def __init__(self, directory: Path, spec: CacheSpec, part: str, slots: int):
        self.dir, self.spec, self.part, self.slots = directory, spec, part, slots
        _create_metadata(directory, spec, part, slots)
        self._fields = stored_fields(spec)
        self._writers: dict[str, HashingWriter] = {}
        self._index: dict[str, np.ndarray] = {}
        self._comp: dict[str, Compressor] = {}
        for name, (shape, dt) in self._fields.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            self._comp[name] = Compressor(spec.compression, dt, nbytes)
            if slots:
                path = directory / shard_relpath(name, 2 + len(shape))
                path.parent.mkdir(parents=True, exist_ok=True)
                self._writers[name] = HashingWriter(path)
                self._index[name] = np.full((slots, spec.views, 2), EMPTY, dtype="<u8")
        self._pixels = spec.pixels != "none" and slots > 0
        if self._pixels:
            self._writers["pixels"] = HashingWriter(directory / PIXELS_RELPATH)
            self._index["pixels"] = np.full((slots, spec.views, 2), EMPTY, dtype="<u8")

    def write(self, slot: int, stored: dict[str, np.ndarray]) -> None:
        """stored: field -> [K, ...] arrays in their stored dtypes."""
        for name in self._fields:
            w, idx, comp = self._writers[name], self._index[name], self._comp[name]
            for v in range(self.spec.views):
                chunk = comp.encode(stored[name][v])
                offset = w.tell()
                w.write(chunk)
                w.write(crc32c_bytes(chunk))
                idx[slot, v] = (offset, len(chunk) + 4)
        if self._pixels:  # encoded images (bytes per view), stored as they are
            w, idx = self._writers["pixels"], self._index["pixels"]
            for v in range(self.spec.views):
                chunk = bytes(stored["pixels"][v])
                offset = w.tell()
                w.write(chunk)
                w.write(crc32c_bytes(chunk))
                idx[slot, v] = (offset, len(chunk) + 4)

    def finish(self, slots: np.ndarray, labels: np.ndarray, sizes: np.ndarray,
               samples: dict) -> dict[str, dict]:
        """Write shard indexes, per-slot arrays and the sample list (group attribute 'samples');
        returns {relpath: {bytes, sha256}} of the shards."""
        import zarr

        hashed = {}
        for name, w in self._writers.items():
            index = self._index[name].tobytes()
            w.write(index)
            w.write(crc32c_bytes(index))
            w.close()
            hashed[w.path.relative_to(self.dir).as_posix()] = {"bytes": w.size, "sha256": w.sha256}
        group = zarr.open_group(store=str(self.dir), mode="r+")
        group.update_attributes({"samples": samples})
        if self.slots:
            valid = np.zeros(self.slots, dtype=bool)
            valid[slots] = True
            label = np.full(self.slots, -1, dtype="<i8")
            label[slots] = labels
            size = np.zeros((self.slots, 2), dtype="<i4")
            size[slots] = sizes
            group["valid"][:] = valid
            group["label"][:] = label
            group["source_size"][:] = size
        return hashed

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()


class ZarrPartReader:
    """Reads records of one committed part straight from its shard files."""

    def __init__(self, directory: Path, spec: CacheSpec, part: str, slots: int, files: dict,
                 fds, root_label: str):
        self.dir, self.spec, self.part, self.slots = directory, spec, part, slots
        self._fds, self._files, self._label = fds, files, root_label
        self._fields = stored_fields(spec)
        self._index_cache: dict[str, np.ndarray] = {}
        # per field: (relative path, absolute path, size from the marker, index offset)
        self._shards: dict[str, tuple[str, str, int, int]] = {}
        index_bytes = slots * spec.views * 16
        for name, (shape, dt) in self._fields.items():
            self._check_metadata(name, shape, dt)
            rel = shard_relpath(name, 2 + len(shape))
            size = files.get(rel, {}).get("bytes")
            if size is None or size < index_bytes + 4:
                raise self._fail(f"{rel} is not listed in the part's commit marker or too small")
            self._shards[name] = (rel, str(directory / rel), size, size - 4 - index_bytes)
        self.has_pixels = spec.pixels != "none"
        if self.has_pixels:
            size = files.get(PIXELS_RELPATH, {}).get("bytes")
            if size is None or size < index_bytes + 4:
                raise self._fail(f"{PIXELS_RELPATH} is not listed in the part's commit marker or "
                                 f"too small")
            self._shards["pixels"] = (PIXELS_RELPATH, str(directory / PIXELS_RELPATH), size,
                                      size - 4 - index_bytes)

    def _fail(self, what: str) -> CacheError:
        return CacheError(f"part {self.part} of cache {self._label}: {what}; "
                          f"run `tec cache verify` and rewrite the part with "
                          f"`tec cache repair {self._label}`")

    def _check_metadata(self, name: str, shape: tuple, dt: np.dtype) -> None:
        path = self.dir / name / "zarr.json"
        try:
            meta = json.loads(path.read_bytes())
            cfg = meta["codecs"][0]["configuration"]
            ok = (meta["codecs"][0]["name"] == "sharding_indexed"
                  and list(meta["shape"]) == [self.slots, self.spec.views, *shape]
                  and list(cfg["chunk_shape"]) == [1, 1, *shape]
                  and cfg.get("index_location", "end") == "end"
                  and np.dtype(meta["data_type"]) == dt)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise self._fail(f"array metadata {name}/zarr.json is unreadable "
                             f"({type(e).__name__})") from None
        if not ok:
            raise self._fail(f"array {name} does not have the layout this code writes")

    def _pread(self, name: str, n: int, offset: int) -> bytes:
        rel, path, expected, _ = self._shards[name]
        fd, size = self._fds.get(path, expected, self._fail, rel)
        if offset < 0 or offset + n > size:
            raise self._fail(f"{rel}: byte range {offset}+{n} lies outside the file ({size} bytes)")
        data = pread(fd, n, offset)
        if len(data) != n:
            raise self._fail(f"{rel}: short read at {offset} (file truncated)")
        return data

    def load_index(self, name: str) -> np.ndarray:
        """The whole shard index of a field [slots, K, 2] (offset, nbytes), crc-checked."""
        if name not in self._index_cache:
            n = self.slots * self.spec.views * 16
            data = self._pread(name, n + 4, self._shards[name][3])
            if crc32c_bytes(data[:n]) != data[n:]:
                raise self._fail(f"{self._shards[name][0]}: shard index checksum mismatch")
            self._index_cache[name] = np.frombuffer(data[:n], dtype="<u8").reshape(
                self.slots, self.spec.views, 2)
        return self._index_cache[name]

    def read_view(self, slot: int, view: int, *,
                  use_index_cache: bool = False) -> dict[str, np.ndarray]:
        """Stored arrays of record (slot, view): field -> array in its stored dtype.

        use_index_cache: load each field's whole shard index once (streaming a part) instead of
        reading the record's 16-byte index entry (random access).
        """
        out = {}
        compressed = self.spec.compression == "blosc"
        for name, (shape, dt) in self._fields.items():
            data = self.read_chunk(name, slot, view, use_index_cache=use_index_cache)
            try:
                payload = blosc_decode(data[:-4]) if compressed else data[:-4]
                out[name] = np.frombuffer(payload, dtype=dt).reshape(shape)
            except Exception as e:  # a chunk that passed its checksum but does not decode
                raise self._fail(f"{self._shards[name][0]}: record slot {slot} view {view} "
                                 f"does not decode ({type(e).__name__})") from None
        if self.has_pixels:
            out["pixels"] = np.frombuffer(
                self.read_chunk("pixels", slot, view, use_index_cache=use_index_cache)[:-4],
                np.uint8)
        return out

    def _chunk_range(self, name: str, slot: int, view: int,
                     use_index_cache: bool) -> tuple[int, int]:
        """(offset, nbytes with the 4 checksum bytes) of record (slot, view)'s chunk of a field."""
        if use_index_cache:
            offset, n = self.load_index(name)[slot, view].tolist()
        else:
            entry_at = (slot * self.spec.views + view) * 16
            offset, n = struct.unpack("<QQ",
                                      self._pread(name, 16, self._shards[name][3] + entry_at))
        if offset == _EMPTY or n < 4:
            raise self._fail(f"{self._shards[name][0]}: record slot {slot} view {view} is missing "
                             f"from the shard")
        return offset, n

    def stored_nbytes(self, slot: int, view: int, fields: list[str] | None = None) -> int:
        """Bytes of record (slot, view)'s stored chunks of ``fields`` (default: every field and
        the pixels), compressed as on disk, without their checksums; nothing but the shard
        indexes is read."""
        names = list(self._shards) if fields is None else fields
        return sum(self._chunk_range(n, slot, view, True)[1] - 4 for n in names)

    def read_chunk(self, name: str, slot: int, view: int, *,
                   use_index_cache: bool = False) -> bytes:
        """The stored chunk of record (slot, view) of one field (or 'pixels'), its crc32c checked;
        the 4 checksum bytes are left at the end."""
        offset, n = self._chunk_range(name, slot, view, use_index_cache)
        data = self._pread(name, n, offset)
        if google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise self._fail(f"{self._shards[name][0]}: record slot {slot} view {view} is damaged "
                             f"(checksum mismatch)")
        return data
