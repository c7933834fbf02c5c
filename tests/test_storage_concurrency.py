"""Concurrent writers, killed writers and crashes during commit never leave a readable bad part."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from storage_helpers import (  # noqa: F401
    concurrent_writer,
    killed_writer,
    make_views,
    new_cache,
    part_records,
    spec,
    write_part,
)

from storage import CacheError, inspect_cache, layout, open_cache, open_writer, verify_cache

pytestmark = pytest.mark.usefixtures("no_fsync")


def test_four_processes_write_different_parts_at_the_same_time(tmp_path):
    """Four spawned processes each write parts of a zarr and of a webdataset cache at once."""
    parts = [(f"p{i}", 3 + i % 3) for i in range(8)]
    caches = {}
    for backend in ("zarr", "webdataset"):
        s = spec(backend=backend)
        caches[backend] = (tmp_path / backend, s)
        new_cache(tmp_path / backend, s, parts)
    jobs = [[(str(path), s.to_dict(), parts, f"p{w + 4 * j}", 10 * w + j)
             for (path, s) in caches.values() for j in range(2)] for w in range(4)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=concurrent_writer, args=(job,)) for job in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for path, s in caches.values():
        assert verify_cache(path) == []
        cache = open_cache(path)
        assert cache.parts == [p for p, _ in parts]
        assert cache.num_samples == sum(n for _, n in parts)
        for w in range(4):
            for j in range(2):
                part = f"p{w + 4 * j}"
                for _slot, (key, rec) in part_records(
                    s, part, dict(parts)[part], 10 * w + j
                ).items():
                    got = cache.read(cache.index_of(key), 2)
                    np.testing.assert_array_equal(got["features"],
                                                  rec["features"][2].astype(np.float16))


@pytest.mark.parametrize("backend", ("zarr", "webdataset"))
def test_writer_killed_mid_part_leaves_it_absent_and_rewriting_succeeds(tmp_path, backend):
    s = spec(backend=backend)
    path = tmp_path / "cache"
    writer = new_cache(path, s, [("p0", 3), ("p1", 6)])
    write_part(writer, "p0", seed=0)
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=killed_writer, args=(str(path), "p1", started, 4))
    proc.start()
    assert started.wait(timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    assert not writer.is_committed("p1")
    assert inspect_cache(path)["unfinished_writes"] == ["p1"]  # temp data left by the crash
    with pytest.raises(CacheError, match=r"incomplete: 1 of 2 parts not committed \(p1\)"):
        open_cache(path)
    partial = open_cache(path, require_complete=False)
    assert partial.parts == ["p0"] and partial.num_samples == 3

    written = write_part(open_writer(path), "p1", seed=9)  # discards the leftovers
    assert inspect_cache(path)["unfinished_writes"] == []
    cache = open_cache(path)
    assert verify_cache(path) == [] and cache.num_samples == 9
    i = cache.index_of("p1-0005")
    np.testing.assert_array_equal(cache.read(i, 0)["crop"], written["p1-0005"]["crop"][0])


@pytest.mark.parametrize("backend", ("zarr", "webdataset"))
def test_crash_between_rename_and_marker_leaves_the_part_absent(tmp_path, backend, monkeypatch):
    s = spec(backend=backend)
    path = tmp_path / "cache"
    writer = new_cache(path, s, [("p0", 3)])
    real = layout.write_json_atomic

    def dies_on_marker(p, obj, **kw):
        if p.parent.name == layout.STATUS_DIR:
            raise KeyboardInterrupt("killed while writing the marker")
        return real(p, obj, **kw)

    monkeypatch.setattr(layout, "write_json_atomic", dies_on_marker)
    with pytest.raises(KeyboardInterrupt):
        write_part(writer, "p0", seed=0)
    monkeypatch.setattr(layout, "write_json_atomic", real)
    assert (path / "parts" / "p0").is_dir()  # data moved into place, but no marker
    assert not writer.is_committed("p0")
    assert open_cache(path, require_complete=False).parts == []
    written = write_part(writer, "p0", seed=1)
    cache = open_cache(path)
    np.testing.assert_array_equal(cache.read(2, 1)["attn_index"],
                                  written["p0-0002"]["attn_index"][1])
    assert verify_cache(path) == []


def test_aborted_part_stays_absent_and_committed_part_is_not_reopened_by_accident(tmp_path):
    s = spec()
    path = tmp_path / "cache"
    writer = new_cache(path, s, [("p0", 3)])
    with pytest.raises(RuntimeError):
        with writer.open_part("p0") as pw:
            pw.write(0, "a", make_views(np.random.default_rng(0), s))
            raise RuntimeError("stage failed")
    assert not writer.is_committed("p0") and not (path / "tmp" / "p0").exists()
    write_part(writer, "p0", seed=0)
    with pytest.raises(CacheError, match="already committed"):
        writer.open_part("p0")
    with pytest.raises(CacheError, match="not one of the 1 parts"):
        writer.open_part("p9")
    pw = writer.open_part("p0", overwrite=True)
    assert not writer.is_committed("p0")  # invisible while it is rewritten
    pw.abort()
    assert not writer.is_committed("p0")


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_part_committed_by_another_writer_meanwhile_is_signalled_and_kept(tmp_path, backend):
    """Two writers of the same part (a retried or orphaned task): the later commit raises
    PartCommittedError (which stage 1 treats as done), drops its copy and leaves the committed
    part as it was; opening a committed part raises the same error."""
    import pickle

    from storage import PartCommittedError

    s = spec(backend=backend)
    path = tmp_path / "cache"
    first = new_cache(path, s, [("p0", 3)])
    # the other writer's committed part, held aside until this writer is at work on its copy
    # (opening a part clears the part's temp area, so the two cannot simply interleave here)
    written = write_part(open_writer(path), "p0", seed=0)
    aside = tmp_path / "aside"
    aside.mkdir()
    os.rename(layout.part_dir(path, "p0"), aside / "p0")
    os.rename(layout.marker_path(path, "p0"), aside / "p0.json")
    late = first.open_part("p0")
    late.write(0, "p0-0000", make_views(np.random.default_rng(1), s))
    os.rename(aside / "p0", layout.part_dir(path, "p0"))  # ... and commits meanwhile
    os.rename(aside / "p0.json", layout.marker_path(path, "p0"))
    marker = first.part_marker("p0")
    with pytest.raises(PartCommittedError, match="committed by another writer") as info:
        late.commit()
    assert info.value.part == "p0" and isinstance(info.value, CacheError)
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (Ray) intact
    assert (type(again) is PartCommittedError and again.part == "p0"
            and str(again) == str(info.value))
    assert first.part_marker("p0") == marker
    assert not any(layout.part_tmp_root(path, "p0").glob("*"))  # this copy was dropped
    with pytest.raises(PartCommittedError, match="already committed"):
        first.open_part("p0")
    cache = open_cache(path)
    assert sorted(cache.keys) == sorted(written)
    assert verify_cache(path) == []
