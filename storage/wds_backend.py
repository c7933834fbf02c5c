"""WebDataset backend: per part, one tar shard per view, plus an offsets index.

    parts/<part>/view-<v>.tar      a valid webdataset shard: view v of every sample of the
                                   source shard, in the order written (stage 1: source order)
    parts/<part>/records.npy       int64 [samples, K, 3]: (offset, length, crc32) of each record's
                                   members in view-<v>.tar, rows in slot order
    parts/<part>/samples.json      valid slots with their key, label, source size

Members of one record (sample key with '%' and '.' percent-escaped, so webdataset groups it):

    <key>.features.npy[.blosc]     features [L,C] float16 | int8 (npy; blosc-compressed if .blosc)
    <key>.attn_logits.npy[.blosc]  attn_logits [H,k_max+1,L]
    <key>.feature_mean.npy         [C] float32
    <key>.feature_std.npy          [C] float32
    <key>.features_scale.npy       [L] float32          (int8 codec only)
    <key>.attn_logits_scale.npy    [H,k_max+1] float32  (int8 codec only)
    <key>.lowrank.npy[.blosc]      lowrank codec only, instead of the members above: one
                                   structured npy record holding every stored array of the codec
                                   (storage/compact.py) and feature_mean / feature_std
    <key>.jpg | <key>.png          the view's pixels (targets.pixels: jpeg | png) only
    <key>.meta.json                key, view, slot, crop, flip, attn_index, label, source_size

A record's members are contiguous, so reading one view of a sample is one read of about the
record's own size (tar framing is ~0.8 KB per member, ~1% of a ViT-B record): an epoch that uses
one view per sample reads about 1/K of the part. ``decode_wds_sample`` turns a sample read by
the webdataset library into the same record ``CacheReader.read`` returns.
"""
from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .codecs import Compressor, blosc_decode, decode_view, json_bytes, npy_bytes, npy_load
from .layout import HashingWriter, pread, write_json_atomic
from .pixels import EXTENSIONS as PIXEL_EXTENSIONS
from .schema import CacheError, CacheSpec, index_dtype, stored_fields

RECORDS_FILE = "records.npy"
SAMPLES_FILE = "samples.json"
_BIG = ("features", "attn_logits")
# members stored inside meta.json instead of as arrays
_IN_META = ("crop", "flip", "attn_index")
# codecs whose arrays are stored as one structured npy member <key>.<codec>.npy[.blosc]
PACKED_CODEC = "lowrank"


def view_tar_name(view: int) -> str:
    return f"view-{view}.tar"


def tar_key(key: str) -> str:
    """Sample key as used in member names: '%' and '.' escaped so webdataset splits it right."""
    return key.replace("%", "%25").replace(".", "%2E").lstrip("/")


# Fixed member metadata: two runs that compute the same records write byte-identical tars
# (as the Zarr backend does), whatever the clock, user or umask of the writer.
MEMBER_MTIME = 0
MEMBER_MODE = 0o644


def _member(name: str, data: bytes, mtime: int = MEMBER_MTIME) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    pad = (-len(data)) % tarfile.BLOCKSIZE
    return header + data + b"\0" * pad


class WdsPartWriter:
    """Appends each record to its view's tar in a temp directory; offsets go to records.npy."""

    def __init__(self, directory: Path, spec: CacheSpec, part: str, slots: int):
        self.dir, self.spec, self.part, self.slots = directory, spec, part, slots
        self._fields = stored_fields(spec)
        self._tars = [HashingWriter(directory / view_tar_name(v)) for v in range(spec.views)]
        self._comp = {}
        self._big = [n for n in _BIG if n in self._fields]
        self._small = [n for n in self._fields if n not in self._big and n not in _IN_META]
        self._packed = None
        if spec.codec == PACKED_CODEC:
            # one member for all of the codec's arrays: a tar member costs ~0.8 KB of framing,
            # which would add a quarter to a 47 KB lowrank record spread over nine members
            self._packed = np.dtype([(n, dt, shape) for n, (shape, dt) in self._fields.items()
                                     if n not in _IN_META])
            self._comp[PACKED_CODEC] = Compressor(spec.compression, np.dtype("u1"),
                                                  self._packed.itemsize + 1024)
            self._big, self._small = [], []
        for name in self._big:
            shape, dt = self._fields[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize + 128
            self._comp[name] = Compressor(spec.compression, dt, nbytes)
        self._rows: list[tuple[int, np.ndarray]] = []
        self._mtime = MEMBER_MTIME

    def write(self, slot: int, key: str, stored: dict[str, np.ndarray], sample: dict) -> None:
        tkey = tar_key(key)
        rows = np.zeros((self.spec.views, 3), dtype=np.int64)
        for v in range(self.spec.views):
            parts = []
            if self._packed is not None:
                rec = np.zeros((), self._packed)
                for name in self._packed.names:
                    rec[name] = stored[name][v]
                raw = npy_bytes(rec)
                parts.append(_member(f"{tkey}.{PACKED_CODEC}.npy.blosc",
                                     self._comp[PACKED_CODEC].encode(np.frombuffer(raw, np.uint8)),
                                     self._mtime) if self.spec.compression == "blosc" else
                             _member(f"{tkey}.{PACKED_CODEC}.npy", raw, self._mtime))
            for name in self._big:
                raw = npy_bytes(stored[name][v])
                if self.spec.compression == "blosc":
                    parts.append(_member(f"{tkey}.{name}.npy.blosc",
                                         self._comp[name].encode(np.frombuffer(raw, np.uint8)),
                                         self._mtime))
                else:
                    parts.append(_member(f"{tkey}.{name}.npy", raw, self._mtime))
            for name in self._small:
                if name in stored:
                    parts.append(_member(f"{tkey}.{name}.npy", npy_bytes(stored[name][v]),
                                         self._mtime))
            if self.spec.pixels != "none":  # the view's encoded image, a standard .jpg/.png member
                parts.append(_member(f"{tkey}.{PIXEL_EXTENSIONS[self.spec.pixels]}",
                                     bytes(stored["pixels"][v]), self._mtime))
            meta = {"key": key, "view": v, "slot": slot, "crop": stored["crop"][v].tolist(),
                    "flip": bool(stored["flip"][v]), "attn_index": stored["attn_index"][v].tolist(),
                    "label": sample["label"], "source_size": sample["source_size"]}
            parts.append(_member(f"{tkey}.meta.json", json_bytes(meta), self._mtime))
            record = b"".join(parts)
            tar = self._tars[v]
            rows[v] = (tar.tell(), len(record), zlib.crc32(record))
            tar.write(record)
        self._rows.append((slot, rows))

    def finish(self, slots: np.ndarray, labels: np.ndarray, sizes: np.ndarray,
               samples: dict) -> dict[str, dict]:
        """Close the tars, write records.npy and samples.json; {relpath: {bytes, sha256}} of
        tars."""
        write_json_atomic(self.dir / SAMPLES_FILE, samples, style="compact")
        hashed = {}
        for tar in self._tars:
            tar.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            tar.close()
            hashed[tar.path.name] = {"bytes": tar.size, "sha256": tar.sha256}
        by_slot = dict(self._rows)
        table = np.zeros((len(slots), self.spec.views, 3), dtype="<i8")
        for i, slot in enumerate(slots):
            table[i] = by_slot[int(slot)]
        np.save(self.dir / RECORDS_FILE, table, allow_pickle=False)
        return hashed

    def abort(self) -> None:
        for tar in self._tars:
            tar.abort()


def iter_tar_members(buf: bytes):
    """(name, data) of each regular member in a run of tar blocks (PAX names honoured); data is
    a slice of ``buf`` (a view when buf is a memoryview)."""
    pos, n, long_name = 0, len(buf), None
    while pos + tarfile.BLOCKSIZE <= n:
        header = bytes(buf[pos:pos + tarfile.BLOCKSIZE])
        if header.count(0) == tarfile.BLOCKSIZE:
            break
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        start = pos + tarfile.BLOCKSIZE
        data = buf[start:start + size]
        if len(data) != size:
            raise ValueError("member runs past the end of the record")
        pos = start + size + ((-size) % tarfile.BLOCKSIZE)
        if kind == b"x":
            for line in bytes(data).decode("utf-8", "surrogateescape").splitlines():
                length_kv = line.split(" ", 1)
                if len(length_kv) == 2 and length_kv[1].startswith("path="):
                    long_name = length_kv[1][5:]
            continue
        if kind not in (b"0", b"\0"):
            continue
        name = long_name or header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        long_name = None
        yield name, data


def _member_value(ext: str, data):
    """Decode one member's bytes by its extension (webdataset may have decoded it already)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return data
    if ext.endswith(".blosc"):
        return npy_load(blosc_decode(data))
    if ext.endswith(".npy"):
        return npy_load(data)
    if ext.endswith(".json"):
        import json
        return json.loads(bytes(data))
    return bytes(data)


def members_to_stored(members: dict, idx_dtype=np.int64) -> tuple[dict[str, np.ndarray], dict]:
    """{extension: bytes or decoded value} of one record -> (stored arrays, meta dict)."""
    stored, meta = {}, None
    for ext, data in members.items():
        field = ext.split(".", 1)[0]
        value = _member_value(ext, data)
        if field == "meta":
            meta = value
        elif ext in ("jpg", "png"):  # view pixels: kept encoded (storage.pixels.decode_pixels)
            stored["pixels"] = np.frombuffer(bytes(data), np.uint8) if isinstance(
                data, (bytes, bytearray, memoryview)) else data
        elif ext.endswith((".npy", ".blosc")):
            stored[field] = value
    if meta is None:
        raise ValueError("record has no meta.json member")
    packed = stored.pop(PACKED_CODEC, None)
    if packed is not None:  # the lowrank codec's arrays in one structured member
        packed = np.asarray(packed).reshape(())  # npy keeps a 0-d structured record as [1]
        for name in packed.dtype.names:
            stored[name] = np.asarray(packed[name])
    stored["crop"] = np.asarray(meta["crop"], dtype="<i4")
    stored["flip"] = np.asarray(bool(meta["flip"]))
    stored["attn_index"] = np.asarray(meta["attn_index"], dtype=idx_dtype)
    return stored, meta


def decode_wds_sample(sample: dict, *, decode: bool = True) -> dict:
    """A sample from ``webdataset.WebDataset(parts/<part>/view-<v>.tar)`` -> a cache record.

    Accepts raw bytes members or members webdataset already decoded. Returns the dict
    ``CacheReader.read`` returns: features [L,C], feature_mean [C], feature_std [C],
    attn_logits [H,k_max+1,L] (float32 when decode), attn_index, crop, flip, label,
    source_size, key, view.
    """
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    stored, meta = members_to_stored(members)
    rec = decode_view(stored, decode)
    if "pixels" in stored:
        rec["pixels"] = stored["pixels"]
    rec.update(key=meta["key"], view=int(meta["view"]),
               label=np.asarray(meta["label"], dtype=np.int64),
               source_size=np.asarray(meta["source_size"], dtype=np.int64))
    return rec


class WdsPartReader:
    """Reads records of one committed part by seeking into its view tars."""

    def __init__(self, directory: Path, spec: CacheSpec, part: str, num_samples: int, files: dict,
                 fds, root_label: str):
        self.dir, self.spec, self.part = directory, spec, part
        self._fds, self._files, self._label = fds, files, root_label
        self._idx_dtype = index_dtype(spec)
        rel = RECORDS_FILE
        expected = files.get(rel, {}).get("bytes")
        try:
            raw = (directory / rel).read_bytes()  # a local file or an object (objstore.Url)
            size = len(raw)
            if expected is not None and size != expected:
                raise self._fail(f"{rel} is {size} bytes, expected {expected} "
                                 f"(truncated or replaced)")
            table = np.load(io.BytesIO(raw), allow_pickle=False)
        except CacheError:
            raise
        except (OSError, ValueError) as e:
            raise self._fail(f"{rel} is unreadable ({type(e).__name__})") from None
        if table.shape != (num_samples, spec.views, 3):
            raise self._fail(f"{rel} has shape {list(table.shape)}, expected "
                             f"{[num_samples, spec.views, 3]}")
        self.records = table

    def _fail(self, what: str) -> CacheError:
        return CacheError(f"part {self.part} of cache {self._label}: {what}; "
                          f"run `tec cache verify` and rewrite the part with "
                          f"`tec cache repair {self._label}`")

    def _record_bytes(self, index: int, view: int) -> bytes:
        """The tar blocks of the part's index-th valid sample, view `view`, crc-checked."""
        rel = view_tar_name(view)
        offset, n, crc = (int(x) for x in self.records[index, view])
        fd, size = self._fds.get(str(self.dir / rel), self._files.get(rel, {}).get("bytes"),
                                 self._fail, rel)
        if offset < 0 or offset + n > size:
            raise self._fail(f"{rel}: record {index} view {view} lies outside the file")
        data = pread(fd, n, offset)
        if len(data) != n:
            raise self._fail(f"{rel}: short read at {offset} (file truncated)")
        if zlib.crc32(data) != crc:
            raise self._fail(f"{rel}: record {index} view {view} is damaged (checksum mismatch)")
        return data

    def stored_nbytes(self, index: int, view: int) -> int:
        """Bytes of the member payloads of the part's index-th valid sample, view `view` (every
        field: a read takes the whole record), without tar headers and padding."""
        try:
            return sum(len(body) for _, body in iter_tar_members(self._record_bytes(index, view)))
        except ValueError as e:
            raise self._fail(f"{view_tar_name(view)}: record {index} view {view} does not parse "
                             f"({e})") from None

    def read_view(self, index: int, view: int) -> dict[str, np.ndarray]:
        """Stored arrays of the part's index-th valid sample, view `view`."""
        rel = view_tar_name(view)
        data = self._record_bytes(index, view)
        try:
            members = {name.split(".", 1)[1]: body for name, body in iter_tar_members(data)}
            stored, _ = members_to_stored(members, self._idx_dtype)
        except Exception as e:
            raise self._fail(f"{rel}: record {index} view {view} does not decode "
                             f"({type(e).__name__})") from None
        return stored
