"""`tec cache extend CACHE --views K2` (issue #15): views K..K2-1 added in a view layer, the
existing parts untouched and still verified, the history in the manifest, a K2 cache equal to a
fresh K2 stage 1, and a run configured for the old K reading the same records as before."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from stage1_helpers import (  # noqa: F401
    RECORD_FIELDS,
    assert_same_records,
    base,
    make_cfg,
    ray_session,
    reference,
    shards,
)
from storage_helpers import VIEW_POLICY, new_cache, spec, write_part

from stages.extend import extend_views
from stages.stage1 import run_stage1
from storage import CacheError, inspect_cache, open_cache, verify_cache
from storage.schema import manifest_identity

REPO = Path(__file__).resolve().parents[1]


def _with_layer(root: Path, backend: str) -> Path:
    """A K=3 cache with a hand-written view layer [3, 5) of the same samples (other data)."""
    parts = [("p0", 4), ("p1", 3)]
    w = new_cache(root, spec(backend=backend), parts)
    write_part(w, "p0", 1, skip=(2,))
    write_part(w, "p1", 2)
    w.finalize()
    rel = "extensions/views-3-5"
    lw = new_cache(root / rel, spec(backend=backend, views=2), parts,
                   view_policy={**VIEW_POLICY, "views": 2, "first_view": 3})
    write_part(lw, "p0", 11, skip=(2,))
    write_part(lw, "p1", 12)
    lw.finalize()
    manifest = json.loads((root / "manifest.json").read_text())
    layer = json.loads((root / rel / "manifest.json").read_text())
    manifest["extensions"] = [{"kind": "views", "path": rel, "views": [3, 5],
                               "identity": manifest_identity(layer)}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / rel


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_view_layer_serves_views_k_and_up_by_every_read_path(tmp_path, backend):
    """read, read_batch (mixed views), iter_records, stream_view (WebDataset) and a pickled
    reader take views >= K from the layer and views < K from the parts, as before."""
    import pickle

    from storage.batch import stream_view

    layer_root = _with_layer(tmp_path / "c", backend)
    reader, layer = open_cache(tmp_path / "c"), open_cache(layer_root)
    old = open_cache(tmp_path / "c", views=3)
    assert (reader.spec.views, old.spec.views, open_cache(tmp_path / "c", views=4).spec.views) \
        == (5, 3, 4)
    n = reader.num_samples
    assert reader.keys == layer.keys and n == 6
    for i in range(n):
        for v in range(5):
            got = reader.read(i, v, decode=False)
            want = (layer.read(i, v - 3, decode=False) if v >= 3 else old.read(i, v, decode=False))
            assert got["view"] == v and got["key"] == want["key"]
            for k in ("features", "attn_logits", "crop", "flip"):
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{i} {v} {k}")
    with pytest.raises(IndexError):
        old.read(0, 3)
    samples, views = np.arange(n).repeat(5), np.tile(np.arange(5), n)
    batch = reader.read_batch(samples, views)
    for j, (i, v) in enumerate(zip(samples, views)):
        np.testing.assert_array_equal(batch["features"][j],
                                      reader.read(int(i), int(v), decode=False)["features"])
    assert [(r["sample"], r["view"]) for r in reader.iter_records()] == \
        [(i, v) for i in range(n) for v in range(5)]
    if backend == "webdataset":
        got = [(i, s["features"]) for i, s in stream_view(reader, "p1", 4)]
        want = [(i, s["features"]) for i, s in stream_view(layer, "p1", 1)]
        assert [i for i, _ in got] == [i for i, _ in want] and len(got) == 3
        for (_, a), (_, b) in zip(got, want):
            np.testing.assert_array_equal(a, b)
    again = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(again.read(5, 4)["features"], reader.read(5, 4)["features"])
    assert verify_cache(tmp_path / "c") == []
    # copies of a grown cache are flat caches of its K2 views
    from storage.subset import subset_cache
    from storage.transcode import transcode_cache

    subset_cache(tmp_path / "c", tmp_path / "s4", views=4)
    transcode_cache(tmp_path / "c", tmp_path / "t", codec="int8")
    flat, coded = open_cache(tmp_path / "s4"), open_cache(tmp_path / "t")
    assert (flat.spec.views, coded.spec.views) == (4, 5) and not flat._layers
    assert "extensions" not in flat.manifest and coded.manifest["view_policy"]["views"] == 5
    np.testing.assert_array_equal(flat.read(5, 3, decode=False)["features"],
                                  reader.read(5, 3, decode=False)["features"])
    assert verify_cache(tmp_path / "s4") == [] and verify_cache(tmp_path / "t") == []


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_stored_nbytes_of_a_view_k_and_up_is_the_layers(tmp_path, backend):
    layer_root = _with_layer(tmp_path / "c", backend)
    reader, layer = open_cache(tmp_path / "c"), open_cache(layer_root)
    old = open_cache(tmp_path / "c", views=3)
    sizes = set()
    for i in range(reader.num_samples):
        for v in (3, 4):
            sizes.add(reader.stored_nbytes(i, v))
            assert reader.stored_nbytes(i, v) == layer.stored_nbytes(i, v - 3) > 0
        assert reader.stored_nbytes(i, 2, ["features"]) == old.stored_nbytes(i, 2, ["features"])
    assert len(sizes) > 1  # compressed records differ: equal sizes mean the same records


def records(path, views: int | None = None, shard_extensions: int | None = None) -> dict:
    """{(key, view): record} of every view the reader shows (stored dtypes)."""
    cache = open_cache(path, views=views, shard_extensions=shard_extensions)
    out = {}
    for i in range(cache.num_samples):
        for v in range(cache.spec.views):
            rec = cache.read(i, v, decode=False)
            out[(rec["key"], v)] = {k: np.asarray(rec[k]) for k in RECORD_FIELDS}
    return out


def files(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fresh5(ray_session, base, shards, tmp_path_factory):
    """Stage 1 with K=5 from the start (what an extended K=3 cache must equal)."""
    cfg = make_cfg(shards, tmp_path_factory.mktemp("k5") / "cache", views=5)
    run_stage1(cfg, base, progress=False)
    return cfg.cache


@pytest.mark.slow
def test_extend_views_adds_a_layer_equal_to_a_fresh_stage1_and_keeps_every_part(
        ray_session, reference, fresh5, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference[0].cache, cache)
    before_files = files(cache)
    before = records(cache)
    assert {v for _, v in before} == {0, 1, 2}

    summary = extend_views(cache, 5, progress=False)
    assert (summary.views_before, summary.views_after) == (3, 5)
    assert summary.stage1.images == 15 and summary.stage1.views == 30  # 2 new views each
    after_files = files(cache)
    changed = {rel for rel in before_files if after_files.get(rel) != before_files[rel]}
    assert changed == {"manifest.json"}  # every part, marker and report untouched
    manifest = json.loads((cache / "manifest.json").read_text())
    old = json.loads(Path(reference[0].cache, "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "extensions"} == old
    [entry] = manifest["extensions"]
    assert entry["kind"] == "views" and entry["views"] == [3, 5]
    assert entry["path"] == "extensions/views-3-5"

    # the old K reads exactly the records it read before; all views equal a fresh K=5 run
    assert_same_records(before, records(cache, views=3))
    grown = records(cache)
    assert {v for _, v in grown} == set(range(5))
    assert_same_records(records(fresh5), grown)
    reader = open_cache(cache)
    batch = reader.read_batch(np.arange(reader.num_samples), np.arange(reader.num_samples) % 5)
    want = open_cache(fresh5).read_batch(np.arange(reader.num_samples),
                                         np.arange(reader.num_samples) % 5)
    for name, value in want.items():
        np.testing.assert_array_equal(batch[name], value, err_msg=name)

    assert verify_cache(cache) == [] and verify_cache(cache, deep=True) == []
    info = inspect_cache(cache)
    assert info["view_layers"][0]["views"] == [3, 5]

    with pytest.raises(CacheError, match=r"has 5 views already; give K2 > 5"):
        extend_views(cache, 5, progress=False)

    # damage in the layer is named by verify; the old K still opens without it
    layer_file = next(p for p in (cache / entry["path"] / "parts").rglob("*") if p.is_file()
                      and p.name != "zarr.json" and p.stat().st_size > 100)
    data = bytearray(layer_file.read_bytes())
    data[-50] ^= 1
    layer_file.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert problems and problems[0].startswith("view layer extensions/views-3-5: part ")
    assert_same_records(before, records(cache, views=3))


@pytest.mark.slow
def test_extend_twice_and_refuse_a_foreign_layer(ray_session, base, reference, fresh5, tmp_path):
    """K 3 -> 4 -> 5 equals a fresh K=5 cache; a layer whose manifest was swapped is refused."""
    cache = tmp_path / "cache"
    shutil.copytree(reference[0].cache, cache)
    extend_views(cache, 4, progress=False)
    extend_views(cache, 5, progress=False)
    assert [e["views"] for e in json.loads((cache / "manifest.json").read_text())["extensions"]] \
        == [[3, 4], [4, 5]]
    assert_same_records(records(fresh5), records(cache))
    assert len(records(cache, views=4)) == 15 * 4
    # stage 1 (tec run) configured with the grown K: nothing to compute, nothing rewritten
    manifest = (cache / "manifest.json").read_bytes()
    again = run_stage1(make_cfg(reference[0].source.path, cache, views=5), base, progress=False)
    assert (again.parts_done, again.parts_skipped) == (0, 3)
    assert json.loads((cache / "manifest.json").read_bytes())["extensions"] == \
        json.loads(manifest)["extensions"]
    # the CLI: verify ok, inspect lists both layers
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "inspect", str(cache)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.count("view layer") == 2, out.stderr
    # a layer replaced by another cache (the K=5 cache's manifest there): refused, one line
    layer = cache / "extensions" / "views-3-4"
    shutil.copy(Path(fresh5) / "manifest.json", layer / "manifest.json")
    with pytest.raises(CacheError, match=r"view layer extensions/views-3-4: "):
        open_cache(cache)
    assert any("does not belong to this cache" in p for p in verify_cache(cache))


def test_cli_extend_refuses_fewer_views(tmp_path):
    cache = tmp_path / "cache"
    w = new_cache(cache, spec(), [("p0", 2)])
    write_part(w, "p0", 1)
    w.finalize()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "extend", str(cache),
                          "--views", "2"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: --views 2: the cache {cache} has 3 views already")


@pytest.mark.slow
def test_a_run_configured_for_the_old_k_trains_on_the_same_records(ray_session, reference,
                                                                    tmp_path):
    """Stage 2 with cache_views = the old K after the extension: the same losses as before it;
    with all views it samples the new ones too."""
    import torch
    from train_helpers import run_config

    from stages.train import train

    cache = tmp_path / "cache"
    shutil.copytree(reference[0].cache, cache)
    torch.set_num_threads(1)
    # round robin: epoch e reads view e % K, so epoch 3 reads view 3 of the grown cache
    run = run_config(epochs=4, batch_size=5, view_selection="round_robin")
    before = train(run, cache=str(cache), base=None, out_dir=tmp_path / "before", progress=False)
    extend_views(cache, 5, progress=False)
    same = train(run, cache=str(cache), base=None, out_dir=tmp_path / "same", progress=False,
                 cache_views=3)
    grown = train(run, cache=str(cache), base=None, out_dir=tmp_path / "grown", progress=False)
    assert same.losses == before.losses and same.steps == before.steps == 12
    assert grown.losses != before.losses and grown.cached_samples == 60


# ------------------------------------------------------------------ --shards
def _shard_entry(ident: int, names: list[str], slots: list[int]) -> dict:
    return {"id": ident, "path": f"/data/more-{ident}-*.tar",
            "shards": [f"/data/{n}.tar" for n in names], "num_samples": sum(slots),
            "parts": [{"name": n, "slots": k} for n, k in zip(names, slots)],
            "at": "2026-01-01T00:00:00+00:00"}


def _extend_by_hand(root, entry: dict, seeds: list[int], skip: tuple[int, ...] = ()) -> dict:
    """What `tec cache extend --shards` does to the storage: the entry pending, the new parts
    committed, finalize (which makes the entry complete); returns the manifest."""
    from storage import open_writer
    from storage.cache import add_shard_extension

    add_shard_extension(root, entry)
    writer = open_writer(root)
    for part, seed in zip(entry["parts"], seeds):
        write_part(writer, part["name"], seed, skip=skip, realistic=False)
    return writer.finalize()


@pytest.mark.parametrize("where", ["folder", "memory"])
@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_shard_parts_are_invisible_until_complete_then_follow_the_cache_s_own(
        tmp_path, backend, where):
    """A shard extension on both backends, in a folder and on an fsspec store: pending it is
    invisible (readers, verify and inspect say so); complete, readers list its parts after the
    cache's own, shard_extensions=0 reads exactly what was read before, verify (deep) passes,
    and subset / transcode copy every sample into a flat cache over all the shards."""
    from storage import format_inspect, open_writer
    from storage.subset import subset_cache
    from storage.transcode import transcode_cache

    root = str(tmp_path / "c") if where == "folder" else f"memory://tec-grow-{backend}/c"
    w = new_cache(root, spec(backend=backend), [("p0", 4), ("p1", 3)])
    write_part(w, "p0", 1, skip=(2,), realistic=False)
    write_part(w, "p1", 2, realistic=False)
    w.finalize()
    before = records(root)
    old_manifest = open_cache(root).manifest
    from storage.cache import add_shard_extension

    entry = add_shard_extension(root, _shard_entry(1, ["q0", "q1"], [3, 2]))
    assert entry["status"] == "pending"
    writer = open_writer(root)
    write_part(writer, "q0", 3, realistic=False)
    writer.finalize()  # one of two parts: still pending
    assert open_cache(root).parts == ["p0", "p1"]
    assert_same_records(before, records(root))
    [line] = verify_cache(root)
    assert line.startswith("shard extension 1: `tec cache extend --shards /data/more-1-*.tar` "
                           "is unfinished (1 of 2 parts committed")
    assert inspect_cache(root)["unfinished_extension"] == {
        "path": "/data/more-1-*.tar", "parts": 2, "committed": 1}
    write_part(writer, "q1", 4, skip=(0,), realistic=False)
    manifest = writer.finalize()
    assert manifest["extensions"][0]["status"] == "complete" and manifest["complete"]
    assert {k: v for k, v in manifest.items() if k not in ("extensions", "part_status",
                                                           "finalized")} == \
        {k: v for k, v in old_manifest.items() if k not in ("part_status", "finalized")}

    grown = open_cache(root)
    assert grown.parts == ["p0", "p1", "q0", "q1"] and grown.num_samples == 6 + 3 + 1
    assert grown.shards[2:] == ["/data/q0.tar", "/data/q1.tar"]
    assert grown.keys[:6] == open_cache(root, shard_extensions=0).keys
    assert grown.keys[6:] == ["q0-0000", "q0-0001", "q0-0002", "q1-0001"]
    assert_same_records(before, records(root, shard_extensions=0))
    with pytest.raises(CacheError, match=r"has 1 shard extension\(s\), not 2"):
        open_cache(root, shard_extensions=2)
    assert verify_cache(root) == [] and verify_cache(root, deep=True) == []
    if backend == "webdataset":  # read: stream's pass over every part, the added ones too
        from storage.batch import stream_records

        for reader in (grown, open_cache(root, shard_extensions=0)):
            streamed = {i: rec for p in range(len(reader.parts))
                        for i, rec in stream_records(reader, p, 1)}
            assert sorted(streamed) == list(range(reader.num_samples))
            for i, rec in streamed.items():
                np.testing.assert_array_equal(rec["features"],
                                              reader.read(i, 1, decode=False)["features"])
    info = inspect_cache(root)
    assert info["parts_total"] == 4 and info["samples"] == 10 and info["complete"]
    assert info["shard_extensions"][0]["parts"] == ["q0", "q1"]
    assert "shards added  2 shard(s), 5 samples of /data/more-1-*.tar" in format_inspect(info)

    out = tmp_path / "copies" if where == "folder" else f"memory://tec-grow-{backend}/copies"
    subset_cache(root, f"{out}/s2", views=2)
    transcode_cache(root, f"{out}/i8", codec="int8")
    for copy in (f"{out}/s2", f"{out}/i8"):
        flat = open_cache(copy)
        assert flat.parts == grown.parts and flat.keys == grown.keys
        assert "extensions" not in flat.manifest and verify_cache(copy) == []
        assert flat.manifest["source"]["shards"] == grown.shards
        assert flat.manifest["source"]["path"] == "None::/data/more-1-*.tar"
        assert flat.manifest["source"]["num_samples"] == 12
    np.testing.assert_array_equal(open_cache(f"{out}/s2").read(9, 1, decode=False)["features"],
                                  grown.read(9, 1, decode=False)["features"])


def test_an_edited_shard_extension_is_named_by_verify_and_refused_by_readers(tmp_path):
    root = tmp_path / "c"
    w = new_cache(root, spec(), [("p0", 3)])
    write_part(w, "p0", 1, realistic=False)
    w.finalize()
    _extend_by_hand(root, _shard_entry(1, ["q0"], [2]), [2])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["extensions"][0]["shards"] = ["/elsewhere/q0.tar"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert verify_cache(root) == [
        "manifest: the shard extension of part q0 was edited after the part was committed (its "
        "checksum in status/q0.json no longer matches); restore manifest.json"]
    with pytest.raises(CacheError, match=r"the shard extension of part q0 in manifest.json was "
                                         r"edited after the part was committed"):
        open_cache(root)
    manifest["extensions"][0]["parts"][0]["slots"] = 3
    manifest["extensions"][0]["shards"] = ["/data/q0.tar"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert any("q0: manifest.json lists 3 sample slots, the part was committed with 2" in p
               for p in verify_cache(root))
    # a second extension waits for the first; parts named like the cache's are refused
    from storage.cache import add_shard_extension

    root2 = tmp_path / "d"
    w = new_cache(root2, spec(), [("p0", 3)])
    write_part(w, "p0", 1, realistic=False)
    w.finalize()
    add_shard_extension(root2, _shard_entry(1, ["q0"], [2]))
    with pytest.raises(CacheError, match=r"has an unfinished `tec cache extend --shards "
                                         r"/data/more-1-\*.tar`; rerun it to finish it first"):
        add_shard_extension(root2, _shard_entry(2, ["q9"], [2]))
    with pytest.raises(CacheError, match=r"part 'p0' of the new shards is a part of cache"):
        add_shard_extension(tmp_path / "c", _shard_entry(2, ["p0"], [2]))


def test_a_view_layer_holds_the_cache_s_shard_extensions_and_follows_its_choice(tmp_path):
    """A grown cache with a view layer: the layer holds the added parts too (for its views);
    a reader of the old shards opens the layer for the old shards; a layer lacking an
    extension of the cache does not belong to it."""
    root = tmp_path / "c"
    layer = _with_layer(root, "zarr")
    _extend_by_hand(layer, _shard_entry(1, ["q0"], [2]), [21])  # the layer first, as extend
    _extend_by_hand(root, _shard_entry(1, ["q0"], [2]), [20])
    grown, old = open_cache(root), open_cache(root, shard_extensions=0)
    assert (grown.num_samples, old.num_samples, grown.spec.views) == (8, 6, 5)
    np.testing.assert_array_equal(grown.read(7, 4, decode=False)["features"],
                                  open_cache(layer).read(7, 1, decode=False)["features"])
    for i in range(6):
        np.testing.assert_array_equal(old.read(i, 4, decode=False)["features"],
                                      grown.read(i, 4, decode=False)["features"])
    assert verify_cache(root) == []
    # the layer without its extension entry: refused, named by verify
    manifest = json.loads((layer / "manifest.json").read_text())
    manifest["extensions"] = []
    (layer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"view layer extensions/views-3-5: cache .* has 0 shard "
                                         r"extension\(s\), not 1"):
        open_cache(root)
    assert open_cache(root, shard_extensions=0).spec.views == 5  # the old shards are intact
    assert any(p.startswith("view layer extensions/views-3-5: does not belong to this cache "
                            "(its shard extensions differ") for p in verify_cache(root))


def _cache_of(shard_dir: Path, root: Path) -> Path:
    """A cache of the tar shards in ``shard_dir`` as stage 1 lays it out (part names, slots,
    source section, recorded settings), with synthetic records: what `tec cache extend --shards`
    checks new shards against before any stage-1 work."""
    from stages.configs import to_dict
    from stages.sources import WebDatasetSource
    from stages.stage1 import part_names

    source = WebDatasetSource(str(shard_dir))
    shard_list = source.shards()
    counts = [source.count(s) for s in shard_list]
    names = part_names(shard_list)
    w = new_cache(root, spec(), list(zip(names, counts)),
                  source={"kind": "webdataset", "path": str(shard_dir), "shards": shard_list,
                          "num_samples": sum(counts)})
    for i, name in enumerate(names):
        write_part(w, name, i, realistic=False)
    w.finalize()
    (root / "reports").mkdir()
    (root / "reports" / "stage1_config.json").write_text(json.dumps({
        "targets": to_dict(make_cfg(shard_dir, root)), "cwd": str(root.parent),
        "base_model": {"arch": "vit_base_patch16_224", "checkpoint": str(root / "none.pth")}}))
    return root


def test_shards_that_would_duplicate_or_change_cached_records_are_refused_in_one_line(tmp_path):
    """Refused before any stage-1 work, one line each, the cache untouched: a shard the cache
    holds, a shard whose sample keys repeat keys of the cache (the duplicate-key policy would
    requalify the cached ones), a shard whose file name collides with a cached part's, a spec
    that names nothing, an image-folder cache; the CLI needs exactly one of --views / --shards."""
    from image_helpers import make_shards

    from stages.extend import extend_shards

    make_shards(tmp_path / "old", n_shards=2, per_shard=4, size_range=(20, 30))
    root = _cache_of(tmp_path / "old", tmp_path / "cache")
    manifest = (root / "manifest.json").read_bytes()
    make_shards(tmp_path / "dup", n_shards=1, per_shard=3, size_range=(20, 30), prefix="more")
    make_shards(tmp_path / "clash", n_shards=1, per_shard=2, size_range=(20, 30), seed=4)
    (tmp_path / "clash" / "shard-000000.tar").rename(tmp_path / "clash" / "x")
    (tmp_path / "clash2").mkdir()
    from image_helpers import write_tar

    write_tar(tmp_path / "clash2" / "shard-000001.tar",
              [("n_000.png", _png()), ("n_000.cls", b"1")])
    cases = {
        str(tmp_path / "old" / "shard-000001.tar"):
            f"--shards {tmp_path}/old/shard-000001.tar: shard {tmp_path}/old/shard-000001.tar is "
            f"in cache {root} already (part shard-000001); give only shards it does not hold",
        str(tmp_path / "dup"):
            f"--shards {tmp_path}/dup: sample key 's000_00000' of shard "
            f"{tmp_path}/old/shard-000000.tar also names a sample of "
            f"{tmp_path}/dup/more-000000.tar: keys repeated across shards are cached as "
            "<part>/<key> (the duplicate-key policy)",
        str(tmp_path / "clash2"):
            f"--shards {tmp_path}/clash2: shard {tmp_path}/old/shard-000001.tar: its part would "
            "be named '000002-shard-000001' next to the other shards, but the cache holds it as "
            "part 'shard-000001' (shard file names collide)",
        str(tmp_path / "nothing-*.tar"):
            f"--shards {tmp_path}/nothing-*.tar: shard pattern '{tmp_path}/nothing-*.tar' "
            "matches no files",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for more, message in cases.items():
        with pytest.raises(CacheError) as info:
            extend_shards(root, more, progress=False)
        assert str(info.value).startswith(message), str(info.value)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "extend", str(root),
                          "--shards", str(tmp_path / "dup")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(
        f"error: {cases[str(tmp_path / 'dup')]}"), out.stderr
    assert (root / "manifest.json").read_bytes() == manifest  # nothing recorded
    from click.testing import CliRunner

    from pipeline.cli import main

    for argv in ([], ["--views", "4", "--shards", str(tmp_path / "dup")]):
        out = CliRunner().invoke(main, ["cache", "extend", str(root), *argv])
        assert out.exit_code == 2 and "give either --views K2 or --shards MORE" in out.output
    # an image-folder cache is cut into shards by its file list: not extended by shards
    w = new_cache(tmp_path / "folder", spec(), [("imagefolder-00000", 2)],
                  source={"kind": "imagefolder", "path": str(tmp_path / "images"),
                          "shards": ["imagefolder-00000"], "num_samples": 2})
    write_part(w, "imagefolder-00000", 1, realistic=False)
    w.finalize()
    with pytest.raises(CacheError, match=r"was built from an image folder, which stage 1 cuts "):
        extend_shards(tmp_path / "folder", str(tmp_path / "clash"), progress=False)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_run_s_source_picks_the_shards_it_reads_of_a_grown_cache(tmp_path):
    """stage 2's choice (stages.stage1.grown.source_prefix): the old list -> 0 extensions, the
    grown list (any spelling) -> 1, anything else refused naming the counts; a source that
    cannot be listed is recognised by the spec the cache records."""
    from image_helpers import make_shards

    from stages.stage1.grown import source_prefix

    make_shards(tmp_path / "all", n_shards=4, per_shard=2, size_range=(20, 24))
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        (tmp_path / "all" / name).rename(tmp_path / ("old" if i < 3 else "new") / name)
    root = _cache_of(tmp_path / "old", tmp_path / "cache")
    manifest = json.loads((root / "manifest.json").read_text())
    assert source_prefix(manifest, "webdataset", str(tmp_path / "old")) == (None, None)
    new = str(tmp_path / "new" / "shard-000003.tar")
    manifest["extensions"] = [{**_shard_entry(1, ["shard-000003"], [2]), "kind": "shards",
                               "path": new, "shards": [new], "status": "complete"}]
    old = sorted(str(p) for p in (tmp_path / "old").glob("*.tar"))
    assert source_prefix(manifest, "webdataset", str(tmp_path / "old")) == (0, old)
    assert source_prefix(manifest, "webdataset", f"{tmp_path}/old::{tmp_path}/new") == \
        (1, sorted(old + [new]))  # in source order, as a stage 1 over all of them lists them
    assert source_prefix(manifest, "webdataset", f"{tmp_path}/{{old,new}}/*.tar")[0] == 1
    with pytest.raises(ValueError, match=r"names 2 shard\(s\), but the cache was built from 3 "
                                         r"shard\(s\) of .* and extended with 1 more"):
        source_prefix(manifest, "webdataset", f"{tmp_path}/old/shard-00000[12].tar")
    shutil.rmtree(tmp_path / "new")
    assert source_prefix(manifest, "webdataset", f"{tmp_path}/old::{new}") == (1, None)
    with pytest.raises(ValueError, match=r"cannot be listed"):
        source_prefix(manifest, "webdataset", f"{tmp_path}/old::{tmp_path}/new")


# ------------------------------------------------------------------ --shards with stage 1 (Ray)
@pytest.fixture(scope="module")
def more(shards, tmp_path_factory) -> Path:
    """Two more shards (shard-000003, -000004) of the `shards` fixture's generator: shards 0-2
    of the same five are the fixture's, byte for byte."""
    from image_helpers import make_shards

    every = tmp_path_factory.mktemp("five")
    paths = make_shards(every, n_shards=5, per_shard=5, size_range=(20, 56))
    for i, path in enumerate(paths[:3]):
        assert Path(path).read_bytes() == (Path(shards) / f"shard-{i:06d}.tar").read_bytes()
    out = tmp_path_factory.mktemp("more")
    for path in paths[3:]:
        shutil.copy(path, out)
    return out


@pytest.fixture(scope="module")
def fresh_all(ray_session, base, shards, more, tmp_path_factory):
    """Stage 1 over all five shards from the start (what the extended cache must equal)."""
    cfg = make_cfg(f"{shards}::{more}", tmp_path_factory.mktemp("all") / "cache")
    run_stage1(cfg, base, progress=False)
    return cfg.cache


def _part_files(root, part: str) -> dict[str, str]:
    directory = Path(root) / "parts" / part
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_extend_shards_equals_a_fresh_stage1_over_all_shards_and_keeps_every_part(
        ray_session, base, shards, more, reference, fresh_all, tmp_path):
    from stages.extend import extend_shards
    from stages.repair import repair_cache

    cache = tmp_path / "cache"
    shutil.copytree(reference[0].cache, cache)
    before_files, before = files(cache), records(cache)
    old_manifest = json.loads((cache / "manifest.json").read_text())

    summary = extend_shards(cache, str(more), progress=False)
    assert (summary.samples_before, summary.samples_after) == (15, 25)
    assert summary.parts == ["shard-000003", "shard-000004"]
    assert summary.stage1.images == 10 and summary.stage1.parts_done == 2
    after_files = files(cache)
    changed = {rel for rel in before_files if after_files.get(rel) != before_files[rel]}
    # every part, marker and the recorded settings' identity untouched; the report, the
    # settings (now naming the added shards) and the manifest rewritten
    assert changed <= {"manifest.json", "reports/stage1_config.json",
                       "reports/bad_samples.jsonl"}, changed
    assert {rel.split("/")[1] for rel in set(after_files) - set(before_files)} == \
        {"shard-000003", "shard-000003.json", "shard-000004", "shard-000004.json"}
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest_identity(manifest) == manifest_identity(old_manifest)
    [entry] = manifest["extensions"]
    assert (entry["kind"], entry["id"], entry["status"], entry["path"]) == \
        ("shards", 1, "complete", str(more))
    assert entry["shards"] == [str(more / "shard-000003.tar"), str(more / "shard-000004.tar")]
    assert entry["parts"] == [{"name": "shard-000003", "slots": 5},
                              {"name": "shard-000004", "slots": 5}] and entry["num_samples"] == 10

    # the old shards read what they read before; all shards equal a fresh stage 1 over them,
    # record for record, and the added parts file for file
    assert_same_records(before, records(cache, shard_extensions=0))
    assert_same_records(records(fresh_all), records(cache))
    for part in summary.parts:
        assert _part_files(cache, part) == _part_files(fresh_all, part)
    assert open_cache(cache).keys == open_cache(fresh_all).keys  # the new shards sort last
    assert verify_cache(cache) == [] and verify_cache(cache, deep=True) == []

    # stage 1 configured with the grown list, or the old one: nothing to compute
    for source in (f"{shards}::{more}", str(shards)):
        again = run_stage1(make_cfg(source, cache), base, progress=False)
        assert (again.parts_done, again.parts_skipped) == (0, 5)
    assert json.loads((cache / "manifest.json").read_text())["extensions"] == [entry]
    with pytest.raises(CacheError, match=r"shard .*shard-000003.tar is in cache .* already "
                                         r"\(part shard-000003\)"):
        extend_shards(cache, str(more), progress=False)
    # a stage 1 whose source names shards the cache lacks says how to add them
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(Path(more) / "shard-000003.tar", extra / "shard-000009.tar")
    with pytest.raises(CacheError, match=r"the source names 1 shard\(s\) the cache does not hold "
                                         r".*shard-000009.tar\); add them with `tec cache extend"):
        run_stage1(make_cfg(f"{shards}::{more}::{extra}", cache), base, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "inspect", str(cache)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "shards added  2 shard(s), 10 samples" in out.stdout, out.stderr
    assert "parts         5/5 committed - complete" in out.stdout

    # repair recomputes a damaged added part, byte for byte
    target = next(p for p in (cache / "parts" / "shard-000004").rglob("*") if p.is_file()
                  and p.name != "zarr.json" and p.stat().st_size > 100)
    data = bytearray(target.read_bytes())
    data[-20] ^= 1
    target.write_bytes(bytes(data))
    assert verify_cache(cache)[0].startswith("part shard-000004: ")
    fixed = repair_cache(cache, progress=False)
    assert fixed.recomputed == ["shard-000004"] and fixed.problems_after == []
    assert _part_files(cache, "shard-000004") == _part_files(fresh_all, "shard-000004")


@pytest.mark.slow
def test_runs_read_the_shards_their_source_names_and_grown_runs_are_not_reused(
        ray_session, base, shards, more, reference, fresh_all, tmp_path):
    """Stage 2 after `extend --shards`: the old shard list trains on exactly the records (same
    losses) it trained on before; the grown list trains on every sample, as from a cache built
    over all shards (same losses); a run checkpointed for the old list is stale for the grown
    one (tec run trains it anew) and reusable for the old one."""
    import torch
    from reliability_helpers import Source
    from train_helpers import run_config

    from stages.extend import extend_shards
    from stages.identity import stale_changes
    from stages.train import train
    from stages.train.config import CacheMismatchError

    cache = tmp_path / "cache"
    shutil.copytree(reference[0].cache, cache)
    torch.set_num_threads(1)
    run = run_config(epochs=2, batch_size=5)
    old, grown = Source(str(shards)), Source(f"{shards}::{more}")
    before = train(run, cache=str(cache), source=old, base=None, out_dir=tmp_path / "before",
                   progress=False)
    extend_shards(cache, str(more), progress=False)
    same = train(run, cache=str(cache), source=old, base=None, out_dir=tmp_path / "same",
                 progress=False)
    assert same.losses == before.losses and same.steps == before.steps == 6
    assert stale_changes(tmp_path / "before", run, cache=str(cache), source=old) == []
    assert stale_changes(tmp_path / "before", run, cache=str(cache), source=grown) == [
        "the cache's shards read (0 -> 1 shard extensions: tec cache extend --shards)"]
    everything = train(run, cache=str(cache), source=grown, base=None,
                       out_dir=tmp_path / "grown", progress=False)
    fresh = train(run, cache=str(fresh_all), source=grown, base=None, out_dir=tmp_path / "fresh",
                  progress=False)
    assert everything.steps == 10 and everything.cached_samples == 50
    assert everything.losses == fresh.losses
    with pytest.raises(CacheMismatchError, match=r"names 2 shard\(s\), but the cache was built "
                                                 r"from 3 shard\(s\)"):
        train(run, cache=str(cache), source=Source(str(more)), base=None,
              out_dir=tmp_path / "other", progress=False)
    # resuming the old-list run with the grown list is refused, naming why
    with pytest.raises(ValueError, match=r"was trained from other inputs \(changed: the cache's "
                                         r"shards read"):
        train(run, cache=str(cache), source=grown, base=None, out_dir=tmp_path / "same",
              progress=False)


EXTEND_DRIVER = """
import sys
sys.path.insert(0, TESTS_DIR)
from fault_helpers import FaultHooks
from stages.extend import extend_shards
extend_shards(sys.argv[1], sys.argv[2], progress=False,
              hooks=FaultHooks(batch_delay_s=float(sys.argv[3])))
""".replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent)))


def _snapshot(root) -> dict:
    """The finished cache minus times and writers (reliability_helpers.cache_snapshot) and
    minus the times in its extension entries."""
    from reliability_helpers import cache_snapshot

    snap = cache_snapshot(root)
    for entry in snap["manifest"].get("extensions") or []:
        entry.pop("at", None)
        entry.pop("completed", None)
    return snap


@pytest.mark.slow
def test_a_killed_extension_by_shards_resumes_to_an_identical_webdataset_cache(
        ray_session, base, shards, more, fresh_all, tmp_path):
    """SIGKILL `tec cache extend --shards` while a new part is being written: readers still see
    the cache as it was, verify names the unfinished extension, and rerunning it ends with the
    cache an uninterrupted extension writes (WebDataset backend), the old parts untouched."""
    import time

    from reliability_helpers import snapshot_diff
    from stage1_helpers import kill_session

    from stages.extend import extend_shards

    built = tmp_path / "built"
    run_stage1(make_cfg(shards, built, backend="webdataset"), base, progress=False)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(built, whole)
    shutil.copytree(built, killed)
    extend_shards(whole, str(more), progress=False)
    old_parts = {rel: d for rel, d in files(killed).items() if rel.startswith(("parts/",
                                                                              "status/"))}
    proc = subprocess.Popen([sys.executable, "-c", EXTEND_DRIVER, str(killed), str(more), "1.0"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    in_flight = killed / "tmp"
    while time.monotonic() < deadline and proc.poll() is None:
        if in_flight.is_dir() and any(p.is_file() for p in in_flight.rglob("*")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    kill_session(proc.pid)
    proc.wait(30)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["extensions"][0]["status"] == "pending"
    assert open_cache(killed).num_samples == 15  # invisible until complete
    problems = verify_cache(killed)
    assert len(problems) == 1 and problems[0].startswith("shard extension 1: `tec cache extend "
                                                         f"--shards {more}` is unfinished")
    with pytest.raises(CacheError, match="has an unfinished `tec cache extend --shards"):
        extend_views(killed, 4, progress=False)

    summary = extend_shards(killed, str(more), progress=False)
    assert summary.samples_after == 25
    assert not snapshot_diff(_snapshot(whole), _snapshot(killed)), \
        snapshot_diff(_snapshot(whole), _snapshot(killed))
    assert {rel: d for rel, d in files(killed).items() if rel in old_parts} == old_parts
    assert_same_records(records(fresh_all), records(killed))  # zarr and webdataset alike
    assert verify_cache(killed, deep=True) == []


def _data(root) -> dict[str, str]:
    """sha256 of every part data file under root/parts (markers hold times, data does not)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "parts").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_views_and_shards_grow_in_either_order_and_repair_rebuilds_view_layers(
        ray_session, base, shards, more, reference, tmp_path):
    """Views then shards, or shards then views: both equal a K=5 stage 1 over all shards, and
    the old K over the old shards reads what it read before. `tec cache repair` recomputes a
    damaged part of a view layer, and rebuilds a layer whose manifest is lost, byte for byte."""
    from stages.extend import extend_shards
    from stages.repair import repair_cache

    fresh = tmp_path / "fresh"
    run_stage1(make_cfg(f"{shards}::{more}", fresh, views=5), base, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(reference[0].cache, a)
    shutil.copytree(reference[0].cache, b)
    extend_views(a, 5, progress=False)
    extend_shards(a, str(more), progress=False)
    extend_shards(b, str(more), progress=False)
    extend_views(b, 5, progress=False)
    want = records(fresh)
    for cache in (a, b):
        assert_same_records(want, records(cache))
        assert_same_records(records(reference[0].cache), records(cache, 3, 0))
        assert verify_cache(cache) == []
        layer = json.loads((cache / "extensions" / "views-3-5" / "manifest.json").read_text())
        assert [(e["kind"], e["status"]) for e in layer["extensions"]] == [("shards", "complete")]
    layer = a / "extensions" / "views-3-5"
    good = _data(layer)

    target = next(p for p in (layer / "parts" / "shard-000004").rglob("*") if p.is_file()
                  and p.name != "zarr.json" and p.stat().st_size > 100)
    data = bytearray(target.read_bytes())
    data[-30] ^= 1
    target.write_bytes(bytes(data))
    assert verify_cache(a)[0].startswith("view layer extensions/views-3-5: part shard-000004: ")
    fixed = repair_cache(a, progress=False)
    assert list(fixed.layers) == ["extensions/views-3-5"] and not fixed.recomputed
    assert list(fixed.layers["extensions/views-3-5"]) == ["shard-000004"]
    assert fixed.problems_after == [] and _data(layer) == good

    (layer / "manifest.json").unlink()
    assert verify_cache(a)[0].startswith("view layer extensions/views-3-5: no target cache")
    with pytest.raises(CacheError, match="view layer extensions/views-3-5"):
        open_cache(a)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "repair", str(a)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rebuilt       view layer extensions/views-3-5 (its manifest was damaged)" in out.stdout
    assert _data(layer) == good and verify_cache(a) == [] and verify_cache(a, deep=True) == []
    assert_same_records(want, records(a))
