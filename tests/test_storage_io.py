"""I/O shape of the backends: bytes read per epoch, random access, files per part."""
from __future__ import annotations

import builtins
import os
import tarfile

import numpy as np
import pytest
from storage_helpers import VIT_B, new_cache, spec, write_part

from storage import CacheSpec, layout, open_cache, wds_backend, zarr_backend
from storage import cache as cache_module

pytestmark = pytest.mark.usefixtures("no_fsync")


class ReadCounter:
    """Counts bytes read through os.pread and through `open` in the storage modules."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        real_pread, real_open = os.pread, builtins.open
        counter = self

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            counter.bytes += len(data)
            return data

        class CountingFile:
            def __init__(self, f):
                self._f = f

            def read(self, *a):
                data = self._f.read(*a)
                counter.bytes += len(data)
                return data

            def readinto(self, b):
                n = self._f.readinto(b)
                counter.bytes += n or 0
                return n

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def counting_open(*a, **kw):
            return CountingFile(real_open(*a, **kw))

        monkeypatch.setattr(os, "pread", pread)
        for module in (layout, wds_backend, zarr_backend, cache_module):
            monkeypatch.setattr(module, "open", counting_open, raising=False)


def test_webdataset_epoch_with_one_view_per_sample_reads_about_one_view(tmp_path, monkeypatch):
    """bytes read / bytes of the records used <= 1.1 for a one-view-per-sample epoch (K=4)."""
    s = CacheSpec(**VIT_B, views=4, backend="webdataset")
    path = tmp_path / "c"
    writer = new_cache(path, s, [("p0", 5), ("p1", 5)])
    write_part(writer, "p0", seed=0, realistic=False)
    write_part(writer, "p1", seed=1, realistic=False)
    # the records' own bytes: member data as the tar module sees them
    member_bytes = {}
    for part in ("p0", "p1"):
        for v in range(s.views):
            with tarfile.open(path / "parts" / part / f"view-{v}.tar") as tar:
                for m in tar:
                    key = m.name.split(".", 1)[0]
                    member_bytes[(key, v)] = member_bytes.get((key, v), 0) + m.size
    total_part_bytes = sum(f.stat().st_size for f in (path / "parts").rglob("*.tar"))

    choice = np.random.default_rng(0).integers(0, s.views, 10)
    counter = ReadCounter(monkeypatch)
    cache = open_cache(path)
    used = [(r["key"], r["view"]) for r in cache.iter_records(per_sample=choice)]
    read = counter.bytes
    monkeypatch.undo()

    assert len(used) == 10
    used_bytes = sum(member_bytes[u] for u in used)
    assert read / used_bytes <= 1.1, (read, used_bytes)
    assert read <= 1.1 * total_part_bytes / s.views  # about 1/K of the data, not all K views


def test_zarr_random_access_reads_one_record_not_the_part(tmp_path, monkeypatch):
    s = CacheSpec(**VIT_B, views=2)
    path = tmp_path / "c"
    writer = new_cache(path, s, [("p0", 12)])
    write_part(writer, "p0", seed=0, realistic=False)
    part_bytes = sum(f.stat().st_size for f in (path / "parts" / "p0").rglob("*") if f.is_file())
    cache = open_cache(path)
    cache.read(0, 0)  # opens the part (metadata) once
    counter = ReadCounter(monkeypatch)
    cache.read(7, 1)
    read = counter.bytes
    monkeypatch.undo()
    record_bytes = part_bytes / (12 * s.views)
    assert read <= 1.1 * record_bytes, (read, record_bytes)


@pytest.mark.parametrize("backend", ("zarr", "webdataset"))
def test_files_per_part_do_not_grow_with_records(tmp_path, backend):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "c", s, [("small", 2), ("large", 40)])
    write_part(writer, "small", seed=0)
    write_part(writer, "large", seed=1)
    count = {p: sum(1 for f in (tmp_path / "c" / "parts" / p).rglob("*") if f.is_file())
             for p in ("small", "large")}
    assert count["small"] == count["large"]
    # zarr: zarr.json + one shard per field (7), 3 per-slot arrays, the group;
    # webdataset: K tars + 2
    assert count["large"] <= (2 * 7 + 2 * 3 + 1 if backend == "zarr" else s.views + 2)
    assert count["large"] < 40 * s.views


@pytest.mark.parametrize("backend", ("zarr", "webdataset"))
def test_stored_nbytes_is_the_payload_a_read_uses(tmp_path, backend):
    from storage.schema import record_nbytes, stored_fields
    from storage.wds_backend import tar_key

    s = spec(backend=backend, compression="none")  # uncompressed: payloads are the raw arrays
    writer = new_cache(tmp_path / "c", s, [("p0", 4)])
    write_part(writer, "p0", seed=0, skip=(1,))
    cache = open_cache(tmp_path / "c")
    features = int(np.prod(stored_fields(s)["features"][0])) * 2  # float16
    if backend == "zarr":  # one chunk per field
        assert cache.stored_nbytes(2, 1, ["features"]) == features == 16 * 24 * 2
        assert cache.stored_nbytes(2, 1, ["features", "crop"]) == features + 16
        assert cache.stored_nbytes(2, 1) == record_nbytes(s)
    else:  # the whole record: its members' payloads, counted here from the tar itself
        with tarfile.open(tmp_path / "c" / "parts" / "p0" / wds_backend.view_tar_name(1)) as tar:
            expected = sum(m.size for m in tar.getmembers()
                           if m.name.split(".", 1)[0] == tar_key(cache.keys[2]))
        assert cache.stored_nbytes(2, 1) == cache.stored_nbytes(2, 1, ["features"]) == expected
        assert expected > record_nbytes(s)  # npy headers and meta.json
    with pytest.raises(ValueError, match="'pixels': not stored in cache"):
        cache.stored_nbytes(0, 0, ["features", "pixels"])
    with pytest.raises(IndexError):
        cache.stored_nbytes(0, s.views, ["features"])
