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


def records(path, views: int | None = None) -> dict:
    """{(key, view): record} of every view the reader shows (stored dtypes)."""
    cache = open_cache(path, views=views)
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
