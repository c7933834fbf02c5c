"""The compact lowrank codec (issue #16): size at ViT-B geometry, round trips through both
backends, reproducible dither, unbiased stochastic rounding, payload decoding, bad parameters,
unknown codecs, and schema-v1 caches (committed fixture) that still open, verify and train."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from storage_helpers import BASE_MODEL, VIEW_POLICY, VIT_B, realistic_targets

from storage import CacheError, CacheSpec, compact, open_cache, record_nbytes, verify_cache
from storage.codecs import decode_view, prepare_views

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cache_v1"


def _record(rng, L, C, H, k_max, K, rank=None):
    views = [realistic_targets(rng, L, C, H, k_max) for _ in range(K)]
    rec = {name: np.stack([v[name] for v in views]) for name in views[0]}
    if rank is not None:  # exactly low-rank features: only the quantisation of the factors is lost
        a = rng.standard_normal((K, L, rank)).astype(np.float32)
        b = rng.standard_normal((K, rank, C)).astype(np.float32) / np.sqrt(rank)
        rec["features"] = a @ b
    rec.update(crop=np.tile(np.array([1, 2, 3, 4]), (K, 1)), flip=np.arange(K) % 2 == 0,
               source_size=(40, 50), label=3)
    return rec


def _decode(spec, stored, v=0, mode=True):
    return decode_view({k: a[v] for k, a in stored.items()}, mode)


def test_a_vit_b_view_fits_in_48_kib():
    spec = CacheSpec(**VIT_B, views=1, codec="lowrank")
    assert record_nbytes(spec) <= 48 * 1024
    assert record_nbytes(CacheSpec(**VIT_B, views=1)) > 6 * record_nbytes(spec)  # float16
    info = compact.describe(spec.codec_params, 196, 768, 12, 17)
    assert info["rank"] == 46 and info["bits_per_feature_value"] <= 1.2
    # the same bits per feature value give the miniature (49 x 96) a proportionally lower rank
    assert compact.rank_for(spec.codec_params, 49, 96) == 9


@pytest.mark.parametrize("n", [13, 16, 1, 49, 196])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_packed_codes_round_trip(bits, n):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 5, n), dtype=np.uint8)
    packed = compact.pack_codes(codes, bits)
    assert packed.shape == (3, 5, compact.packed_width(n, bits))
    assert np.array_equal(compact.unpack_codes(packed, bits, n), codes)
    # the layout itself, independently: MSB-first bit planes, as np.unpackbits reads them
    planes = np.unpackbits(packed, axis=-1, count=n * bits).reshape(3, 5, n, bits)
    assert np.array_equal((planes * (1 << np.arange(bits - 1, -1, -1))).sum(-1), codes)
    if n >= 8:
        assert compact.bits_from_width(packed.shape[-1], n) == bits


def test_low_rank_features_and_attention_survive_the_codec():
    rng = np.random.default_rng(0)
    spec = CacheSpec(num_patches=64, channels=96, heads=3, k_max=8, views=2, codec="lowrank",
                     codec_params={"rank": 6, "factor_bits": 8, "attn_bits": 8,
                                   "rounding": "nearest"})
    rec = _record(rng, 64, 96, 3, 8, 2, rank=6)
    stored, sample = prepare_views(spec, "img1", rec)
    assert sample == {"label": 3, "source_size": [40, 50]}
    for v in range(2):
        out = _decode(spec, stored, v)
        rel = (np.linalg.norm(out["features"] - rec["features"][v])
               / np.linalg.norm(rec["features"][v]))
        assert rel < 0.02, rel
        attn = rec["attn_logits"][v]
        # exact where it matters: within half a step of the 8-bit grid below each row's maximum
        span = np.minimum(attn.max(-1) - attn.min(-1), 16.0)
        kept = attn >= attn.max(-1, keepdims=True) - 16.0
        err = np.abs(out["attn_logits"] - attn)
        assert (err <= (span / 255 * 0.51
                        + 0.02 * np.abs(attn.max(-1)) / 100)[..., None])[kept].all()
        assert (out["attn_logits"][~kept]
                >= attn.max(-1, keepdims=True).repeat(64, -1)[~kept] - 16.1).all()
        assert np.array_equal(out["attn_index"], rec["attn_index"][v])
        assert np.array_equal(out["crop"], rec["crop"][v]) and out["flip"] == rec["flip"][v]
        np.testing.assert_allclose(out["feature_mean"], rec["feature_mean"][v],
                                   rtol=1e-3, atol=1e-3)


def test_the_dither_is_reproducible_per_record_and_differs_between_views():
    rng = np.random.default_rng(1)
    spec = CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=2, codec="lowrank",
                     codec_params={"rounding": "stochastic"})
    rec = _record(rng, 16, 24, 3, 4, 2)
    rec["features"][1] = rec["features"][0]
    rec["attn_logits"][1] = rec["attn_logits"][0]
    a, _ = prepare_views(spec, "key", rec)
    b, _ = prepare_views(spec, "key", rec)
    c, _ = prepare_views(spec, "other", rec)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert not np.array_equal(a["attn_codes"][0], a["attn_codes"][1])  # same values, view 0 vs 1
    assert not np.array_equal(a["attn_codes"][0], c["attn_codes"][0])  # another key


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(3, 5, 16)).astype(np.float32)
    params = compact.check_params({"attn_bits": 2})
    mean = np.zeros_like(logits)
    n = 400
    for i in range(n):
        enc = compact.encode_attention(logits, params, np.random.default_rng(i))
        p = compact.unpack_payload({**enc, "features_u": np.zeros((16, 1), np.uint8),
                                    "features_v": np.zeros((1, 2), np.uint8),
                                    "features_u_scale": np.zeros(1, np.float16),
                                    "features_v_scale": np.zeros(1, np.float16),
                                    "feature_mean": np.zeros(16, np.float16)})
        mean += (p["attn_max"][..., None] - p["attn_codes"] * p["attn_step"][..., None]) / n
    step = (logits.max(-1) - logits.min(-1)) / 3
    nearest = compact.encode_attention(logits, params, None)
    nearest = nearest["attn_max"].astype(np.float32)[..., None] - compact.unpack_codes(
        nearest["attn_codes"], 2, 16) * nearest["attn_step"].astype(np.float32)[..., None]
    bias_stochastic = np.abs(mean - logits).mean() / step.mean()
    bias_nearest = np.abs(nearest - logits).mean() / step.mean()
    assert bias_stochastic < 0.06 and bias_nearest > 0.15, (bias_stochastic, bias_nearest)


def test_the_quantised_payload_dequantises_to_the_decoded_record():
    rng = np.random.default_rng(3)
    spec = CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=1, codec="lowrank",
                     codec_params={"factor_bits": 3, "attn_bits": 5})
    stored, _ = prepare_views(spec, "k", _record(rng, 16, 24, 3, 4, 1))
    full = _decode(spec, stored)
    payload = _decode(spec, stored, mode="payload")
    assert payload["features_u"].dtype == np.int8 and payload["attn_codes"].dtype == np.uint8
    assert payload["features_u"].shape == (16, spec.codec_params and compact.rank_for(
        spec.codec_params, 16, 24)) and payload["attn_codes"].shape == (3, 5, 16)
    feats, attn = compact.dequantize_payload({k: payload[k] for k in compact.PAYLOAD_FIELDS})
    assert np.array_equal(feats, full["features"]) and np.array_equal(attn, full["attn_logits"])


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_lowrank_cache_round_trips_and_verifies(tmp_path, backend):
    from storage import create_cache

    rng = np.random.default_rng(4)
    spec = CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=3, codec="lowrank",
                     backend=backend)
    writer = create_cache(tmp_path / "c", spec, base_model=BASE_MODEL, view_policy=VIEW_POLICY,
                          source={"shards": ["s0"], "num_samples": 2}, parts=[("p0", 2)],
                          targets={"precision": "float32"})
    recs = [_record(rng, 16, 24, 3, 4, 3) for _ in range(2)]
    with writer.open_part("p0") as part:
        for i, rec in enumerate(recs):
            part.write(i, f"k{i}", rec)
        part.commit()
    writer.finalize()
    assert verify_cache(tmp_path / "c") == []
    expected, _ = prepare_views(spec, "k1", recs[1])
    with open_cache(tmp_path / "c") as cache:
        assert cache.manifest["schema_version"] == 2
        assert cache.manifest["targets"] == {"precision": "float32"}
        assert (cache.manifest["codec"]["lowrank"]["rank"]
                == compact.rank_for(spec.codec_params, 16, 24))
        got = cache.read(1, 2)
        want = _decode(spec, expected, 2)
        for name in ("features", "attn_logits", "attn_index", "feature_std"):
            assert np.array_equal(got[name], want[name]), name
        payload = cache.read(1, 2, decode="payload")
        assert payload["features_v"].dtype == np.int8


@pytest.mark.parametrize("params,needle", [
    ({"factor_bits": 1},
     "codec_params.factor_bits=1 is out of range for codec lowrank; allowed: an integer in 2..8"),
    ({"attn_bits": 9}, "codec_params.attn_bits=9"),
    ({"rounding": "up"}, "allowed: stochastic or nearest"),
    ({"feature_bits": 0}, "codec_params.feature_bits=0"),
    ({"rank": 25}, "allowed: 1..16"),
    ({"colour": 1},
     "codec_params.colour: unknown parameter of codec lowrank; allowed: feature_bits"),
])
def test_bad_codec_parameters_are_one_line_errors_naming_key_and_allowed_values(params, needle):
    with pytest.raises(CacheError) as info:
        CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=1, codec="lowrank",
                  codec_params=params)
    assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CacheError, match="codec int8 takes no parameters"):
        CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=1, codec="int8",
                  codec_params={"rank": 2})


def test_config_errors_name_targets_codec_and_its_parameters():
    from config_helpers import minimal_pipeline

    from pipeline.config import parse_config
    from stages.configs import ConfigError

    def error(**targets) -> str:
        raw = minimal_pipeline()
        raw.setdefault("targets", {}).update(targets)
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        assert "\n" not in str(info.value)
        return str(info.value)

    message = error(codec="jpeg")
    assert "targets.codec" in message and "lowrank" in message
    message = error(codec="lowrank", codec_params={"attn_bits": 12})
    assert message.startswith("targets.codec_params.attn_bits=12") and "2..8" in message
    assert "targets.codec_params: codec float16 takes no parameters" in error(
        codec_params={"rank": 4})
    message = error(precision="float8")
    assert "targets.precision" in message and "bfloat16" in message


def test_a_cache_whose_codec_this_version_cannot_decode_is_refused_naming_it(tmp_path):
    shutil.copytree(FIXTURE / "zarr_float16", tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["spec"]["codec"] = "vq256"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError) as info:
        open_cache(tmp_path / "c")
    assert "codec 'vq256' cannot be decoded by this version" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.fixture
def v1_copy(tmp_path, monkeypatch):
    """The committed schema-v1 fixture, copied (its manifests hold paths relative to it)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    monkeypatch.chdir(tmp_path / "v1")
    return tmp_path / "v1"


@pytest.mark.parametrize("name", ["zarr_float16", "webdataset_int8"])
def test_schema_v1_caches_still_open_and_verify(v1_copy, name):
    assert verify_cache(name) == []
    with open_cache(name) as cache:
        assert cache.manifest["schema_version"] == 1 and cache.num_samples == 8
        rec = cache.read(3, 1)
        assert rec["features"].shape == (16, 48) and rec["attn_logits"].shape == (3, 7, 16)
        assert np.isfinite(rec["features"]).all()


def test_a_schema_v1_cache_still_trains(v1_copy, tmp_path):
    from train_helpers import BASE_KWARGS, Source, run_config

    from stages.configs import BaseModelConfig
    from stages.train import train

    base = BaseModelConfig(arch="vit_base_patch16_224", checkpoint="base.safetensors",
                           timm_kwargs=dict(BASE_KWARGS))
    summary = train(run_config(epochs=1, model={"k": 4}), cache="zarr_float16",
                    source=Source("shards/shard-{000000..000001}.tar"), base=base,
                    out_dir=tmp_path / "out", progress=False)
    assert summary.cached_samples == 8 and np.isfinite(summary.losses["loss"])


def test_a_lowrank_cache_trains(tmp_path):
    from train_helpers import Source, build_cache, make_data, run_config, save_base_model

    from stages.train import train

    shards = make_data(tmp_path, n_shards=1, per_shard=8)
    base = save_base_model(tmp_path / "base.safetensors")
    cache = build_cache(tmp_path / "cache", shards, base, codec="lowrank")
    with open_cache(cache) as reader:
        assert reader.spec.codec == "lowrank" and reader.manifest["codec"]["lowrank"]["rank"] >= 1
    summary = train(run_config(epochs=1, model={"k": 4}), cache=cache,
                    source=Source(str(tmp_path / "shards")), base=None, out_dir=tmp_path / "out",
                    progress=False)
    assert summary.cached_samples == 8 and np.isfinite(summary.losses["loss"])


def test_the_payload_of_a_batch_of_views_dequantises_like_each_view():
    rng = np.random.default_rng(5)
    spec = CacheSpec(num_patches=16, channels=24, heads=3, k_max=4, views=3, codec="lowrank",
                     codec_params={"attn_bits": 3})
    stored, _ = prepare_views(spec, "k", _record(rng, 16, 24, 3, 4, 3))
    batch = compact.unpack_payload({k: stored[k]
                                    for k in compact.PAYLOAD_FIELDS + ("feature_mean",)})
    feats, attn = compact.dequantize_payload(batch)  # leading axis: the 3 views
    assert feats.shape == (3, 16, 24) and attn.shape == (3, 3, 5, 16)
    for v in range(3):
        one = _decode(spec, stored, v)
        assert (np.array_equal(feats[v], one["features"])
                and np.array_equal(attn[v], one["attn_logits"]))
