"""Stage 1 with the compact codec (issue #16): precision and target error in the manifest,
shown by `tec cache inspect`; precision stays float32 on a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import BASE_KWARGS, make_data, save_base_model

from stages.configs import from_dict
from stages.stage1 import (
    BaseModelActor,
    Stage1Config,
    _check_base_model,
    _prepare_cache,
    process_shard,
    resolve_precision,
)
from stages.target_error import compare_targets
from storage import format_inspect, inspect_cache, open_cache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s1codec")
    shards = make_data(tmp, n_shards=1, per_shard=6)
    return tmp, shards, save_base_model(tmp / "base.safetensors")


def _cfg(tmp, shards, **targets) -> Stage1Config:
    values = {"source": {"path": shards[0]}, "cache": str(tmp / targets.pop("name", "cache")),
              "views": 2, "k_max": 6, "batch_size": 4,
              "view_policy": {"output_size": BASE_KWARGS["img_size"]}, **targets}
    return from_dict(Stage1Config, values, "targets")


def test_precision_is_float32_on_a_cpu_whatever_is_asked(world):
    tmp, shards, _ = world
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the configured precision")
    for precision in ("float32", "float16", "bfloat16"):
        assert resolve_precision(_cfg(tmp, shards, precision=precision)) == "float32"


def test_a_new_lowrank_cache_records_precision_and_measured_target_error(world):
    tmp, shards, base = world
    cfg = _cfg(tmp, shards, codec="lowrank", codec_params={"rank": 4, "attn_bits": 3},
               name="lowrank")
    resolved = _check_base_model(cfg, base)
    writer, jobs = _prepare_cache(cfg, resolved)
    m = writer.manifest
    assert m["targets"] == {"precision": "float32"} and m["spec"]["codec"] == "lowrank"
    assert m["spec"]["codec_params"]["rank"] == 4
    err = m["target_error"]
    assert err["views"] == 12 and err["precision"] == "float32"
    total = err["total"]
    # lossy features and logits, exact patch selection (the codec keeps attn_index)
    assert 0 < total["feature_rel_rms"] < 1 and total["attn_excess_ce_tau1.0"] > 0
    assert total["attn_excess_ce_tau1.0"] > total["attn_excess_ce_tau1.8"]
    assert total["topk_agreement"] == 1.0 and err["precision_only"]["feature_rel_rms"] == 0
    # the part written by the shard task decodes to what the measurement saw (same codec)
    actor = BaseModelActor({"arch": base.arch, "checkpoint": base.checkpoint,
                            "timm_kwargs": dict(BASE_KWARGS)}, 2, 6)
    process_shard(jobs[0], [actor], writer)
    writer.finalize()
    text = format_inspect(inspect_cache(cfg.cache))
    assert "codec params  feature_bits=1.2, rank=4, factor_bits=4, attn_bits=3" in text
    assert "stage 1       base-model forward in float32" in text
    assert f"feature rel. RMS {total['feature_rel_rms']:.4f}" in text
    with open_cache(cfg.cache) as cache:
        rec = cache.read(0, 1)
        assert rec["features"].shape == (16, 48) and np.isfinite(rec["attn_logits"]).all()
    # resuming keeps the measurement and the identity; another precision is another cache
    again, _ = _prepare_cache(cfg, resolved)
    assert again.manifest["target_error"] == err
    from storage import CacheError
    m2 = dict(m, targets={"precision": "bfloat16"})
    from storage.schema import identity_mismatch
    assert identity_mismatch(m, m2) == ["targets.precision"]
    with pytest.raises(CacheError):
        _prepare_cache(_cfg(tmp, shards, codec="int8", name="lowrank"), resolved)


def test_compare_targets_sees_precision_changes_of_the_patch_selection():
    rng = np.random.default_rng(0)
    ref = {"features": rng.standard_normal((2, 4, 3)), "attn_logits": rng.standard_normal((2, 1, 3, 4)),
           "attn_index": np.array([[0, 1], [2, 3]])}
    same = compare_targets(ref, ref)
    assert same["feature_rel_rms"] == 0 and same["attn_excess_ce_tau1.0"] == 0
    assert same["topk_agreement"] == 1.0 and same["attn_rows_compared"] == 1.0
    moved = dict(ref, attn_index=np.array([[1, 0], [2, 3]]))
    out = compare_targets(ref, moved)
    assert out["topk_agreement"] == 1.0 and out["attn_rows_compared"] == pytest.approx(4 / 6)
    other = dict(ref, attn_index=np.array([[0, 3], [2, 3]]))
    assert compare_targets(ref, other)["topk_agreement"] == 0.75
