"""`tec cache subset CACHE OUT --views K'`: a smaller copy with the first K' views, bit for bit,
that verifies, resumes, and records where it came from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from storage_helpers import new_cache, part_records, spec

from pipeline.cli import main
from storage import open_cache, verify_cache
from storage.schema import CacheError
from storage.subset import subset_cache

PARTS = [("p0", 4), ("p1", 3)]
FIXTURES = Path(__file__).parent / "fixtures" / "cache_v1"


def _cache(path: Path, **spec_overrides) -> Path:
    """A complete 3-view cache of two parts; p1 slot 1 is a bad sample (reported, not written)."""
    from storage.pixels import encode_pixels

    s = spec(**spec_overrides)
    writer = new_cache(path, s, PARTS)
    rng = np.random.default_rng(9)
    for seed, (part, slots) in enumerate(PARTS):
        skip = (1,) if part == "p1" else ()
        pw = writer.open_part(part)
        for slot, (key, rec) in part_records(s, part, slots, seed, skip).items():
            if s.pixels != "none":
                rec["pixels"] = [encode_pixels(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
                                               s.pixels) for _ in range(s.views)]
            pw.write(slot, key, rec)
        pw.commit(report=[{"key": f"{part}-{i:04d}", "reason": "corrupt image"} for i in skip])
    writer.finalize()
    return path


def _same_records(a, b, views: int) -> None:
    assert a.keys == b.keys and a.parts == b.parts
    for i in range(a.num_samples):
        assert a.slot_of(i) == b.slot_of(i) and a.source_size(i) == b.source_size(i)
        for v in range(views):
            ra, rb = a.read(i, v, decode=False), b.read(i, v, decode=False)
            assert set(ra) == set(rb)
            for name in ra:
                if name == "pixels":
                    assert bytes(ra[name]) == bytes(rb[name])
                else:
                    np.testing.assert_array_equal(np.asarray(ra[name]), np.asarray(rb[name]),
                                                  err_msg=f"{name} of sample {i} view {v}")
                    assert np.asarray(ra[name]).dtype == np.asarray(rb[name]).dtype


@pytest.mark.parametrize("overrides", [
    dict(backend="zarr", codec="float16"),
    dict(backend="webdataset", codec="int8"),
    dict(backend="zarr", codec="lowrank"),
    dict(backend="webdataset", codec="lowrank", pixels="png", image_size=8),
], ids=["zarr-float16", "wds-int8", "zarr-lowrank", "wds-lowrank-pixels"])
def test_subset_keeps_the_first_views_bit_for_bit_and_verifies(tmp_path, overrides):
    src = _cache(tmp_path / "src", **overrides)
    out = subset_cache(src, tmp_path / "sub", views=2)
    assert (out["parts_written"], out["parts_skipped"], out["records"]) == (2, 0, (4 + 2) * 2)
    assert verify_cache(tmp_path / "sub") == []
    assert verify_cache(tmp_path / "sub", deep=True) == []
    a, b = open_cache(src), open_cache(tmp_path / "sub")
    assert b.spec.views == 2 and b.manifest["view_policy"]["views"] == 2
    _same_records(a, b, views=2)
    with pytest.raises(IndexError):
        b.read(0, 2)
    for section in ("base_model", "source", "parts", "targets"):
        assert b.manifest[section] == a.manifest[section]
    assert b.bad_samples("p1") == a.bad_samples("p1") == [{"key": "p1-0001",
                                                           "reason": "corrupt image"}]
    (step,) = b.manifest["subset"]
    assert (step["source"], step["source_views"], step["views"]) == (str(src.resolve()), 3, 2)
    import hashlib

    assert step["source_manifest_sha256"] == hashlib.sha256(
        (src / "manifest.json").read_bytes()).hexdigest()


def test_subset_resumes_and_refuses_another_cache_at_out(tmp_path):
    src = _cache(tmp_path / "src")
    subset_cache(src, tmp_path / "sub", views=1)
    again = subset_cache(src, tmp_path / "sub", views=1)
    assert (again["parts_written"], again["parts_skipped"]) == (0, 2)
    # a cache with the same settings that is not this subset (another source) is refused
    other = _cache(tmp_path / "other")
    with pytest.raises(CacheError, match="not a subset of"):
        subset_cache(other, tmp_path / "sub", views=1)


def test_subset_of_a_subset_records_the_chain_and_history_is_carried(tmp_path):
    src = _cache(tmp_path / "src")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["target_error"] = {"feature_rel_rms": 0.01}  # measured by stage 1
    (src / "manifest.json").write_text(json.dumps(manifest))
    subset_cache(src, tmp_path / "two", views=2)
    subset_cache(tmp_path / "two", tmp_path / "one", views=1)
    m = open_cache(tmp_path / "one").manifest
    assert [(s["source_views"], s["views"]) for s in m["subset"]] == [(3, 2), (2, 1)]
    assert m["target_error"] == {"feature_rel_rms": 0.01}
    _same_records(open_cache(src), open_cache(tmp_path / "one"), views=1)


@pytest.mark.parametrize("views", [0, 4, -1])
def test_subset_views_out_of_range_is_an_error_before_writing(tmp_path, views):
    src = _cache(tmp_path / "src")
    with pytest.raises(CacheError, match=r"--views .*between 1 and the 3 views"):
        subset_cache(src, tmp_path / "sub", views=views)
    assert not (tmp_path / "sub").exists()


def test_subset_of_a_schema_v1_cache_verifies(tmp_path):
    src = tmp_path / "v1"
    shutil.copytree(FIXTURES / "webdataset_int8", src)
    subset_cache(src, tmp_path / "sub", views=1)
    assert verify_cache(tmp_path / "sub", deep=True) == []
    _same_records(open_cache(src), open_cache(tmp_path / "sub"), views=1)


def test_cli_cache_subset(tmp_path):
    src = _cache(tmp_path / "src")
    runner = CliRunner()
    ok = runner.invoke(main, ["cache", "subset", str(src), str(tmp_path / "sub"), "--views", "2"])
    assert ok.exit_code == 0, ok.output
    assert "2 of 3 views" in ok.output and "2 parts written" in ok.output
    shown = runner.invoke(main, ["cache", "inspect", str(tmp_path / "sub")])
    assert f"subset        first 2 of the 3 views of {src.resolve()}" in shown.output
    bad = runner.invoke(main, ["cache", "subset", str(src), str(tmp_path / "x"), "--views", "9"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: --views 9") and len(bad.output.splitlines()) == 1
    missing = runner.invoke(main, ["cache", "subset", str(tmp_path / "nope"), str(tmp_path / "y"),
                                   "--views", "1"])
    assert missing.exit_code == 2 and len(missing.output.splitlines()) == 1


@pytest.mark.parametrize("codec", ["float16", "lowrank"])
def test_subset_is_what_stage1_writes_for_fewer_views(tmp_path, codec):
    """Stage 1 (its shard pipeline, in-process) with K=3 then K'=2: the subset of the first equals
    the second, record for record and in the manifest's identity."""
    import torch
    from image_helpers import make_shards
    from tec_helpers import BASE_KWARGS, tiny_vit

    from stages.configs import BaseModelConfig, from_dict, to_dict
    from stages.stage1 import (
        BaseModelActor,
        Stage1Config,
        _check_base_model,
        _prepare_cache,
        process_shard,
    )
    from storage.schema import manifest_identity

    make_shards(tmp_path / "shards", n_shards=2, per_shard=3, size_range=(20, 40))
    torch.save({"model": tiny_vit(seed=3).state_dict()}, tmp_path / "base.pth")
    base = from_dict(BaseModelConfig, {"arch": "vit_base_patch16_224", "timm_kwargs": BASE_KWARGS,
                                       "checkpoint": str(tmp_path / "base.pth")}, "base_model")
    caches = {}
    for views in (3, 2):
        cfg = from_dict(Stage1Config, {
            "source": {"kind": "webdataset", "path": str(tmp_path / "shards")},
            "cache": str(tmp_path / f"k{views}"), "views": views, "k_max": 4, "batch_size": 4,
            "codec": codec, "view_policy": {"seed": 5, "output_size": 32}}, "targets")
        writer, jobs = _prepare_cache(cfg, _check_base_model(cfg, base), measure_error=False)
        actor = BaseModelActor(to_dict(base), cfg.last_n, cfg.k_max, float16=True)
        for job in jobs:
            process_shard(job, [actor], writer)
        writer.finalize()
        caches[views] = tmp_path / f"k{views}"
    subset_cache(caches[3], tmp_path / "sub", views=2)
    sub, fresh = open_cache(tmp_path / "sub"), open_cache(caches[2])
    assert manifest_identity(sub.manifest) == manifest_identity(fresh.manifest)
    _same_records(sub, fresh, views=2)
