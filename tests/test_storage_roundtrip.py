"""Round trips through both backends and both codecs, and the reader interface around them."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from storage_helpers import (  # noqa: F401
    VIT_B,
    make_views,
    new_cache,
    realistic_targets,
    rel_l2,
    spec,
    write_part,
)

from storage import (
    CacheError,
    CacheSpec,
    decode_wds_sample,
    dequantize_rows,
    open_cache,
    quantize_rows,
)

pytestmark = pytest.mark.usefixtures("no_fsync")
BACKENDS = ("zarr", "webdataset")
CODECS = ("float16", "int8")


def _build(tmp_path, backend, codec, parts=(("p0", 5), ("p1", 4))):
    s = spec(backend=backend, codec=codec)
    writer = new_cache(tmp_path / "cache", s, list(parts))
    written = {}
    written.update(write_part(writer, "p0", seed=1, skip=(2,)))
    written.update(write_part(writer, "p1", seed=2))
    writer.finalize()
    return tmp_path / "cache", s, written


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_returns_written_records(tmp_path, backend, codec, monkeypatch):
    if (backend, codec) == ("zarr", "float16"):  # one combination takes the default fsync path
        monkeypatch.delenv("TEC_CACHE_FSYNC")
    path, s, written = _build(tmp_path, backend, codec)
    cache = open_cache(path)
    assert cache.num_samples == 8 and cache.views_per_sample == 3 and len(cache) == 8
    assert cache.keys == [f"p0-{i:04d}" for i in (0, 1, 3, 4)] + [f"p1-{i:04d}" for i in range(4)]
    assert cache.parts == ["p0", "p1"] and cache.complete
    np.testing.assert_array_equal(cache.labels, [0, 1, 3, 4, 0, 1, 2, 3])
    for i, key in enumerate(cache.keys):
        src = written[key]
        assert cache.index_of(key) == i
        assert cache.source_size(i) == tuple(src["source_size"])
        assert cache.part_of(i) == key[:2]
        for v in range(s.views):
            rec = cache.read(i, v)
            assert rec["key"] == key and rec["view"] == v
            for name in ("features", "attn_logits", "feature_mean", "feature_std"):
                assert rec[name].dtype == np.float32 and rec[name].shape == src[name][v].shape
            if codec == "float16":
                np.testing.assert_array_equal(rec["features"],
                                              src["features"][v].astype(np.float16))
                np.testing.assert_array_equal(rec["attn_logits"],
                                              src["attn_logits"][v].astype(np.float16))
            else:
                assert rel_l2(rec["features"], src["features"][v]) <= 0.01
                assert rel_l2(rec["attn_logits"], src["attn_logits"][v]) <= 0.01
            np.testing.assert_array_equal(rec["feature_mean"], src["feature_mean"][v])
            np.testing.assert_array_equal(rec["feature_std"], src["feature_std"][v])
            np.testing.assert_array_equal(rec["attn_index"], src["attn_index"][v])
            assert rec["attn_index"].dtype == np.int64
            np.testing.assert_array_equal(rec["crop"], src["crop"][v])
            assert bool(rec["flip"]) == bool(src["flip"][v])
            assert int(rec["label"]) == src["label"]
            np.testing.assert_array_equal(rec["source_size"], src["source_size"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_false_returns_stored_dtypes(tmp_path, backend):
    path, s, _ = _build(tmp_path, backend, "int8")
    rec = open_cache(path).read(0, 1, decode=False)
    assert rec["features"].dtype == np.int8 and rec["attn_logits"].dtype == np.int8
    assert rec["features_scale"].shape == (s.num_patches,)
    assert rec["attn_logits_scale"].shape == (s.heads, s.k_max + 1)
    np.testing.assert_allclose(dequantize_rows(rec["features"], rec["features_scale"]),
                               open_cache(path).read(0, 1)["features"])
    path16, _, _ = _build(tmp_path / "f16", backend, "float16")
    assert open_cache(path16).read(0, 0, decode=False)["features"].dtype == np.float16


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_records_streams_in_storage_order(tmp_path, backend):
    path, s, _ = _build(tmp_path, backend, "float16")
    cache = open_cache(path)
    every = [(r["sample"], r["view"]) for r in cache.iter_records()]
    assert every == [(i, v) for i in range(8) for v in range(3)]
    assert ([(r["sample"], r["view"]) for r in cache.iter_records(views=2)]
            == [(i, 2) for i in range(8)])
    assert ([(r["sample"], r["view"]) for r in cache.iter_records(views=[0, 2])][:4]
            == [(0, 0), (0, 2), (1, 0), (1, 2)])
    choice = np.array([0, 1, 2, -1, 2, 1, 0, 0])
    recs = list(cache.iter_records(per_sample=choice))
    assert ([(r["sample"], r["view"]) for r in recs]
            == [(i, int(v)) for i, v in enumerate(choice) if v >= 0])
    for r in recs:
        np.testing.assert_array_equal(r["features"], cache.read(r["sample"], r["view"])["features"])
    assert [r["sample"] for r in cache.iter_records(views=0, parts=["p1"])] == [4, 5, 6, 7]
    assert cache.part_range("p1") == (4, 8)


def test_zarr_python_reads_the_same_values(tmp_path):
    import zarr

    path, s, _ = _build(tmp_path, "zarr", "int8")
    cache = open_cache(path)
    group = zarr.open_group(str(path / "parts" / "p0"), mode="r")
    np.testing.assert_array_equal(group["valid"][:], [True, True, False, True, True])
    assert group.attrs["samples"]["keys"] == cache.keys[:4]
    for i in range(4):
        slot = cache.slot_of(i)
        for v in range(s.views):
            rec = cache.read(i, v, decode=False)
            for name in ("features", "features_scale", "feature_mean", "attn_logits",
                         "attn_logits_scale", "attn_index", "crop", "flip"):
                got = group[name][slot, v]
                assert got.dtype == rec[name].dtype
                np.testing.assert_array_equal(got, rec[name])


def test_webdataset_library_reads_view_shards(tmp_path):
    import webdataset as wds

    path, s, _ = _build(tmp_path, "webdataset", "float16")
    cache = open_cache(path)
    for decode_first in (False, True):
        ds = wds.WebDataset(str(path / "parts" / "p1" / "view-1.tar"), shardshuffle=False)
        if decode_first:
            ds = ds.decode()
        samples = [decode_wds_sample(x) for x in ds]
        assert [x["key"] for x in samples] == cache.keys[4:]
        for x in samples:
            ref = cache.read(cache.index_of(x["key"]), 1)
            for name in ("features", "attn_logits", "feature_mean", "attn_index", "crop", "flip",
                         "label"):
                np.testing.assert_array_equal(x[name], ref[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_written_out_of_slot_order_read_back_in_slot_order(tmp_path, backend):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "c", s, [("p0", 6)])
    rng = np.random.default_rng(0)
    recs = {slot: make_views(rng, s) for slot in range(6)}
    pw = writer.open_part("p0")
    for slot in (4, 0, 5, 2, 1):
        pw.write(slot, f"k{slot}", recs[slot])
    pw.commit()
    cache = open_cache(tmp_path / "c")
    assert cache.keys == ["k0", "k1", "k2", "k4", "k5"]
    for i, slot in enumerate((0, 1, 2, 4, 5)):
        np.testing.assert_array_equal(cache.read(i, 1)["attn_index"], recs[slot]["attn_index"][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_rejects_malformed_records_and_part_stays_usable(tmp_path, backend):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "c", s, [("p0", 3)])
    rng = np.random.default_rng(0)
    good = make_views(rng, s)
    pw = writer.open_part("p0")
    bad_cases = [
        {**good, "features": good["features"][:, :-1]},
        {**good, "attn_logits": np.where(np.arange(s.num_patches) == 3, np.nan,
                                         good["attn_logits"])},
        {**good, "attn_index": good["attn_index"] + s.num_patches},
        {k: v for k, v in good.items() if k != "crop"},
        {**good, "features": good["features"] * 1e6},  # overflows float16
    ]
    for bad in bad_cases:
        with pytest.raises(CacheError, match="record 'k0'"):
            pw.write(0, "k0", bad)
    with pytest.raises(CacheError, match="outside"):
        pw.write(3, "k3", good)
    pw.write(0, "k0", good)
    with pytest.raises(CacheError, match="twice"):
        pw.write(0, "k0b", good)
    with pytest.raises(CacheError, match="twice"):
        pw.write(1, "k0", good)
    pw.commit()
    with pytest.raises(CacheError, match="commit after committed"):
        pw.commit()
    assert open_cache(tmp_path / "c").keys == ["k0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_storage_overhead_is_below_5_percent(tmp_path, backend):
    """Uncompressed float16 cache of ViT-B-shaped records: bytes on disk <= 1.05 x tensor bytes."""
    from storage import inspect_cache, record_nbytes

    s = CacheSpec(**VIT_B, views=2, backend=backend, compression="none")
    writer = new_cache(tmp_path / "c", s, [("p0", 4)])
    write_part(writer, "p0", seed=0, realistic=False)
    info = inspect_cache(tmp_path / "c")
    assert info["records"] == 8
    overhead = info["bytes_data"] / (8 * record_nbytes(s)) - 1
    assert 0 <= overhead <= 0.05, overhead


def test_blosc_compresses_realistic_float16_targets(tmp_path):
    from storage import inspect_cache

    s = CacheSpec(**VIT_B, views=2)
    writer = new_cache(tmp_path / "c", s, [("p0", 3)])
    write_part(writer, "p0", seed=0)
    ratio = inspect_cache(tmp_path / "c")["compression_ratio"]
    assert ratio > 1.08, ratio  # measured ~1.14 (see storage/codecs.py)


def test_int8_error_on_vit_b_shaped_targets_is_below_1_percent():
    rng = np.random.default_rng(0)
    for _ in range(3):
        t = realistic_targets(rng, L=196, C=768, H=12, k_max=16)
        for name in ("features", "attn_logits"):
            q, scale = quantize_rows(t[name])
            assert q.dtype == np.int8 and scale.shape == t[name].shape[:-1]
            assert rel_l2(dequantize_rows(q, scale), t[name]) <= 0.01


def test_quantize_rows_handles_all_zero_rows():
    x = np.zeros((2, 5), np.float32)
    x[1] = [1, -2, 3, 0, 0.5]
    q, s = quantize_rows(x)
    assert s[0] == 0 and np.all(q[0] == 0)
    np.testing.assert_allclose(dequantize_rows(q, s), x, atol=3 / 127 / 2 + 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_pickles_and_reads_in_the_copy(tmp_path, backend):
    path, _, _ = _build(tmp_path, backend, "float16")
    cache = open_cache(path)
    ref = cache.read(3, 2)
    copy = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(copy.read(3, 2)["features"], ref["features"])
    with pytest.raises(IndexError):
        cache.read(8, 0)
    with pytest.raises(IndexError):
        cache.read(0, 3)
    with pytest.raises(KeyError):
        cache.index_of("nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_bad_parts_commit_and_read_as_empty(tmp_path, backend):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "c", s, [("empty", 0), ("bad", 2), ("ok", 2)])
    write_part(writer, "empty", seed=0)
    write_part(writer, "bad", seed=0, skip=(0, 1))
    write_part(writer, "ok", seed=0)
    cache = open_cache(tmp_path / "c")
    assert cache.parts == ["empty", "bad", "ok"] and cache.keys == ["ok-0000", "ok-0001"]
    assert cache.part_range("bad") == (0, 0) and cache.part_of(0) == "ok"
    assert len(list(cache.iter_records())) == 2 * s.views
    from storage import verify_cache
    assert verify_cache(tmp_path / "c", deep=True) == []


def _read_in_child(cache, conn):
    conn.send(cache.read(5, 2)["features"].tobytes())
    conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_used_before_fork_reads_in_the_child(tmp_path, backend):
    """DataLoader workers fork a reader that already has files open."""
    import multiprocessing as mp

    path, _, _ = _build(tmp_path, backend, "float16")
    cache = open_cache(path)
    ref = cache.read(5, 2)["features"]
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(cache, child))
    proc.start()
    got = np.frombuffer(parent.recv(), dtype=np.float32).reshape(ref.shape)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, ref)
    assert "samples=8" in repr(cache)
