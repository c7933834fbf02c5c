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
    ref = {"features": rng.standard_normal((2, 4, 3)),
           "attn_logits": rng.standard_normal((2, 1, 3, 4)),
           "attn_index": np.array([[0, 1], [2, 3]])}
    same = compare_targets(ref, ref)
    assert same["feature_rel_rms"] == 0 and same["attn_excess_ce_tau1.0"] == 0
    assert same["topk_agreement"] == 1.0 and same["attn_rows_compared"] == 1.0
    moved = dict(ref, attn_index=np.array([[1, 0], [2, 3]]))
    out = compare_targets(ref, moved)
    assert out["topk_agreement"] == 1.0 and out["attn_rows_compared"] == pytest.approx(4 / 6)
    other = dict(ref, attn_index=np.array([[0, 3], [2, 3]]))
    assert compare_targets(ref, other)["topk_agreement"] == 0.75


# ------------------------------------------------------------------------------ encode_on
def test_encode_on_is_resolved_once_per_run_and_device_needs_the_lowrank_codec(world):
    from stages.configs import ConfigError
    from stages.stage1 import resolve_encode_on

    tmp, shards, _ = world
    lowrank = {"codec": "lowrank"}
    assert resolve_encode_on(_cfg(tmp, shards, **lowrank), gpus=True)  # auto: GPUs -> actors
    assert not resolve_encode_on(_cfg(tmp, shards, **lowrank), gpus=False)
    assert not resolve_encode_on(_cfg(tmp, shards, encode_on="cpu", **lowrank), gpus=True)
    assert resolve_encode_on(_cfg(tmp, shards, encode_on="device", **lowrank), gpus=False)
    assert not resolve_encode_on(_cfg(tmp, shards), gpus=True)  # float16: nothing to encode
    with pytest.raises(ConfigError, match="targets.encode_on: device encodes codec lowrank only"):
        _cfg(tmp, shards, encode_on="device").validate()
    with pytest.raises(ConfigError, match="encode_on"):
        _cfg(tmp, shards, encode_on="gpu")


class _Recording:
    """An in-process actor that keeps what each call returned (what would cross Ray)."""

    def __init__(self, actor):
        self.actor, self.outputs = actor, []

    def __call__(self, *args):
        out = self.actor(*args)
        self.outputs.append(out)
        return out


def test_stage1_encoding_on_the_actors_device_writes_a_cache_that_verifies_and_trains(world):
    """targets.encode_on: device on a CPU (the torch encoder in the actor): the actor returns the
    codec's arrays, the cache verifies deeply, decodes like the numpy-encoded cache of the same
    views (the same dither: stochastic rounding), records its encoder per part, and trains."""
    from train_helpers import Source, run_config

    from stages.train import train
    from storage import layout, verify_cache

    tmp, shards, base = world
    params = {"rank": 4, "rounding": "stochastic"}
    caches, outputs = {}, {}
    for where in ("cpu", "device"):
        cfg = _cfg(tmp, shards, codec="lowrank", codec_params=params, encode_on=where,
                   name=f"enc-{where}")
        writer, jobs = _prepare_cache(cfg, _check_base_model(cfg, base))
        assert [job.encode_on_device for job in jobs] == [where == "device"]
        actor = _Recording(BaseModelActor({"arch": base.arch, "checkpoint": base.checkpoint,
                                           "timm_kwargs": dict(BASE_KWARGS)}, 2, 6))
        process_shard(jobs[0], [actor], writer)
        writer.finalize()
        assert verify_cache(cfg.cache, deep=True) == []
        marker = layout.read_json(layout.marker_path(writer.root, jobs[0].part), "marker")
        assert marker["encoder"] == {"cpu": "numpy", "device": "torch (cpu)"}[where]
        caches[where], outputs[where] = cfg.cache, actor.outputs
    sent = {where: sum(a.nbytes for out in outs for a in out.values()
                       if isinstance(a, np.ndarray)) for where, outs in outputs.items()}
    assert "features" not in outputs["device"][0] and "features_u" in outputs["device"][0]
    assert sent["device"] < sent["cpu"] / 2, sent
    with open_cache(caches["cpu"]) as a, open_cache(caches["device"]) as b:
        assert a.keys == b.keys and len(a) == 6
        for i in range(len(a)):
            for v in range(2):
                ra, rb = a.read(i, v), b.read(i, v)
                sa, sb = a.read(i, v, decode=False), b.read(i, v, decode=False)
                assert np.array_equal(ra["attn_index"], rb["attn_index"])
                assert np.array_equal(sa["feature_mean"], sb["feature_mean"])
                # same dither, same float targets: the same attention codes
                assert np.array_equal(sa["attn_codes"], sb["attn_codes"])
                err = np.linalg.norm(rb["features"] - ra["features"]) / \
                    np.linalg.norm(ra["features"])
                assert err < 0.5  # the same targets up to another draw of the factor dither
    summary = train(run_config(epochs=1, batch_size=3, model={"k": 4}), cache=caches["device"],
                    source=Source(str(tmp / "shards")), base=None, out_dir=tmp / "train-device",
                    progress=False)
    assert summary.cached_samples == 6 and np.isfinite(summary.losses["loss"])
