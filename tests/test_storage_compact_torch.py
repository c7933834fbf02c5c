"""The lowrank codec's torch encoder (storage/compact_torch.py, stage 1 on the base model's
device) against the numpy reference (storage/compact.py), run on the CPU: the same format, the
same codes up to each component's sign (which eigendecompositions leave free) and last-ulp
rounding, the same decoded error, the numpy path's dither, and the writer's checks with the
numpy path's one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from storage_helpers import VIEW_POLICY, new_cache, realistic_targets

from storage import CacheError, CacheSpec, compact, open_cache, verify_cache
from storage.codecs import prepare_views
from storage.compact_torch import dither, encode_views, pack_codes

GEOMETRIES = {  # (L, C, H): ViT-B/16; ViT-Ti/16 at 224 (L > C: the C x C Gram); the miniature
    "vitb": (196, 768, 12), "vitti": (196, 192, 3), "mini": (49, 96, 3)}


def _learned_like(rng, N, L, C, H, R=17):
    """Low-rank plus noise features with a decaying spectrum (patch-normalised) and peaked
    attention logits (a few keys far above the rest, as a trained ViT's)."""
    k = min(24, C // 2)
    scale = np.geomspace(4.0, 0.1, k)
    y = np.einsum("nlk,nkc->nlc", rng.standard_normal((N, L, k)) * scale,
                  rng.standard_normal((N, k, C))) + 0.3 * rng.standard_normal((N, L, C))
    y = (y - y.mean(1, keepdims=True)) / y.std(1, ddof=1, keepdims=True)
    x = rng.normal(0, 2, (N, H, R, L))
    peaks = rng.integers(0, L, (N, H, R, 3))
    np.put_along_axis(x, peaks, np.take_along_axis(x, peaks, -1) + 14.0, -1)
    return y.astype(np.float32), x.astype(np.float32)


def _random(rng, N, L, C, H, R=17):
    return (rng.standard_normal((N, L, C)).astype(np.float32),
            rng.normal(0, 5, (N, H, R, L)).astype(np.float32))


def _numpy(features, attn, params, keys, view=0):
    return [compact.encode_view(features[i], attn[i], params, key=k, view=view)
            for i, k in enumerate(keys)]


def _torch(features, attn, params, keys, view=0):
    seeds = [compact.record_seed(k, view) for k in keys]
    out = encode_views(torch.from_numpy(features), torch.from_numpy(attn), params, seeds=seeds)
    return [{name: t[i].numpy() for name, t in out.items()} for i in range(len(keys))]


def _codes(stored, params, L, C):
    fb, ab, r = params["factor_bits"], params["attn_bits"], stored["features_u_scale"].shape[0]
    off = 1 << (fb - 1)
    return (compact.unpack_codes(stored["features_u"], fb, r).astype(int) - off,
            compact.unpack_codes(stored["features_v"], fb, C).astype(int) - off,
            compact.unpack_codes(stored["attn_codes"], ab, L).astype(int))


def _decoded(stored, C):
    full = dict(stored, feature_mean=np.zeros(C, np.float16))
    return compact.dequantize_payload(compact.unpack_payload(full))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _compare(ref, got, params, L, C):
    """Fractions of identical codes after aligning each component's sign, and the signs."""
    un, vn, an = _codes(ref, params, L, C)
    ut, vt, at = _codes(got, params, L, C)
    sign = np.where((un * ut).sum(0) < 0, -1, 1)
    return {"u": float((un == ut * sign).mean()), "v": float((vn == vt * sign[:, None]).mean()),
            "attn": float((an == at).mean()), "flipped": int((sign < 0).sum())}


@pytest.mark.parametrize("data", ["learned", "random"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_the_torch_encoder_matches_numpy_up_to_component_signs(geometry, data):
    L, C, H = GEOMETRIES[geometry]
    rng = np.random.default_rng(len(geometry) + len(data))
    n = 2 if geometry == "vitb" else 4
    features, attn = (_learned_like if data == "learned" else _random)(rng, n, L, C, H)
    params = compact.check_params({})
    keys = [f"s{i}" for i in range(n)]
    ref, got = _numpy(features, attn, params, keys), _torch(features, attn, params, keys)
    want = compact.stored_fields(L, C, H, 17, params)
    flipped = 0
    for r, g, f, x in zip(ref, got, features, attn):
        assert {k: (v.shape, v.dtype) for k, v in g.items()} == want
        assert {k: (v.shape, v.dtype) for k, v in r.items()} == want
        same = _compare(r, g, params, L, C)
        assert min(same["u"], same["v"], same["attn"]) >= 0.99, same
        flipped += same["flipped"]
        # the stored scales and row maxima are the same numbers
        for name in ("features_u_scale", "features_v_scale", "attn_max", "attn_step"):
            assert np.mean(r[name] == g[name]) >= 0.99, name
        (fr, ar), (fg, ag) = _decoded(r, C), _decoded(g, C)
        assert abs(_rel(fg, f) - _rel(fr, f)) <= 1e-3 * _rel(fr, f)
        assert abs(_rel(ag, x) - _rel(ar, x)) <= 1e-3 * _rel(ar, x)
        assert _rel(fg, fr) < 1e-3  # a flipped component reconstructs the same
    # numpy's LAPACK and torch's pick different signs; the torch encoder's are canonical
    assert flipped > 0
    for g in got:  # the largest entry of each column of A is positive: its code is +qmax
        assert (_codes(g, params, L, C)[0].max(0) == 7).all()


@pytest.mark.parametrize("params", [{"factor_bits": 3, "attn_bits": 5, "rank": 7},
                                    {"factor_bits": 8, "attn_bits": 2, "attn_floor": 6.0},
                                    {"feature_bits": 3.0, "factor_bits": 5, "attn_bits": 7}])
def test_other_bit_widths_ranks_and_floors_match_too(params):
    params = compact.check_params(params)
    rng = np.random.default_rng(3)
    features, attn = _learned_like(rng, 3, 49, 96, 3, R=9)
    keys = ["a", "b", "c"]
    for r, g in zip(_numpy(features, attn, params, keys), _torch(features, attn, params, keys)):
        assert {k: (v.shape, v.dtype) for k, v in g.items()} == \
            {k: (v.shape, v.dtype) for k, v in r.items()}
        same = _compare(r, g, params, 49, 96)
        assert min(same["u"], same["v"], same["attn"]) >= 0.99, same


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_is_numpys(bits):
    rng = np.random.default_rng(bits)
    for n in (13, 16, 49):
        codes = rng.integers(0, 1 << bits, size=(3, 5, n), dtype=np.uint8)
        got = pack_codes(torch.from_numpy(codes), bits).numpy()
        assert got.dtype == np.uint8 and np.array_equal(got, compact.pack_codes(codes, bits))


def test_the_dither_is_the_numpy_encoders_draw_for_draw():
    rng = np.random.default_rng(0)
    shapes = [(49, 9), (9, 96), (3, 17, 49)]
    a, b, c = dither([compact.record_seed("k", 1), compact.record_seed("k", 2)], shapes)
    gen = np.random.default_rng(compact.record_seed("k", 2))
    for arr, shape in zip((a, b, c), shapes):
        assert np.array_equal(arr[1], gen.random(shape, dtype=np.float32))
    # the attention codes follow A's and B's draws: they equal numpy's only if every draw does
    params = compact.check_params({"rounding": "stochastic"})
    features, attn = _learned_like(rng, 3, 49, 96, 3)
    keys = ["x", "y", "z"]
    for r, g in zip(_numpy(features, attn, params, keys, view=5),
                    _torch(features, attn, params, keys, view=5)):
        assert np.array_equal(r["attn_codes"], g["attn_codes"])
        assert np.array_equal(r["attn_step"], g["attn_step"])


def test_stochastic_rounding_is_reproducible_per_record_and_unbiased_like_numpy():
    params = compact.check_params({"rounding": "stochastic"})
    rng = np.random.default_rng(1)
    features, attn = _learned_like(rng, 1, 49, 96, 3)
    once = _torch(features, attn, params, ["k"], view=3)[0]
    again = _torch(features, attn, params, ["k"], view=3)[0]
    other = _torch(features, attn, params, ["k"], view=4)[0]
    assert all(np.array_equal(once[k], again[k]) for k in once)
    assert not np.array_equal(once["features_v"], other["features_v"])
    # equal in expectation: averaged over 48 seeds, both encoders' decoded features (and logits)
    # converge to the same mean, far closer than one draw of either is
    n = 48
    feats = np.repeat(features, n, 0)
    logits = np.repeat(attn, n, 0)
    keys = [f"k{i}" for i in range(n)]
    dec_n = [_decoded(s, 96) for s in _numpy(feats, logits, params, keys)]
    dec_t = [_decoded(s, 96) for s in _torch(feats, logits, params, keys)]
    mean_n, mean_t = (np.mean([d[0] for d in dec], 0) for dec in (dec_n, dec_t))
    one_draw = _rel(dec_t[0][0], mean_n)
    assert _rel(mean_t, mean_n) < 0.3 * one_draw
    err_n = np.mean([_rel(d[0], features[0]) for d in dec_n])
    err_t = np.mean([_rel(d[0], features[0]) for d in dec_t])
    assert abs(err_t - err_n) < 0.02 * err_n
    attn_n, attn_t = (np.mean([d[1] for d in dec], 0) for dec in (dec_n, dec_t))
    assert np.abs(attn_t - attn_n).max() < 1e-6  # same dither, same attention codes
    x = attn[0]
    kept = x >= x.max(-1, keepdims=True) - params["attn_floor"]  # unclamped: unbiased there
    assert np.abs((attn_t - x)[kept]).mean() < 0.25 * np.abs(dec_t[0][1] - x)[kept].mean()


def test_bad_inputs():
    params = compact.check_params({"rounding": "stochastic"})
    f = torch.zeros(2, 16, 24)
    a = torch.zeros(2, 3, 5, 16)
    with pytest.raises(ValueError, match="one dither seed per view"):
        encode_views(f, a, params)
    with pytest.raises(ValueError, match="attn_logits has shape"):
        encode_views(f, torch.zeros(2, 3, 5, 15), compact.check_params({}))
    # non-finite views are encoded as zeros (the caller checks finite_views); the others normally
    rng = np.random.default_rng(0)
    feats, logits = _learned_like(rng, 2, 16, 24, 3, R=5)
    feats[0, 3, 4] = np.nan
    logits[1, 0, 0, 0] = 1e6  # the row maximum overflows float16
    out = encode_views(torch.from_numpy(feats), torch.from_numpy(logits), compact.check_params({}))
    assert (out["features_v_scale"][0] == 0).all()  # zero features: B is zero
    assert torch.isinf(out["attn_max"][1, 0, 0]) and torch.isfinite(out["attn_max"][0]).all()
    ref = compact.encode_view(feats[1], logits[0], compact.check_params({}), key="k", view=0)
    assert np.array_equal(out["features_u_scale"][1].numpy(), ref["features_u_scale"])


# ------------------------------------------------------------------------------ the writer
SPEC = dict(num_patches=16, channels=24, heads=3, k_max=4, views=2)


def _float_record(rng, K=2):
    views = [realistic_targets(rng, 16, 24, 3, 4) for _ in range(K)]
    rec = {k: np.stack([v[k] for v in views]) for k in views[0]}
    rec.update(crop=np.tile([1, 2, 10, 10], (K, 1)), flip=np.arange(K) % 2 == 0,
               source_size=(40, 50), label=3)
    return rec


def _encoded_record(rec, params, key, first_view=0):
    """What an encoding base-model actor sends for this float record."""
    K = len(rec["features"])
    seeds = [compact.record_seed(key, first_view + v) for v in range(K)]
    f, a = torch.from_numpy(rec["features"]), torch.from_numpy(rec["attn_logits"])
    out = {k: t.numpy() for k, t in encode_views(f, a, params, seeds=seeds).items()}
    out.update({k: rec[k] for k in ("feature_mean", "feature_std", "attn_index", "crop", "flip",
                                    "source_size", "label") if k in rec})
    out.update(features_finite=np.isfinite(rec["features"]).reshape(K, -1).all(1),
               attn_logits_finite=np.isfinite(rec["attn_logits"]).reshape(K, -1).all(1),
               encoder="torch (cpu)")
    return out


def _error(spec, key, rec):
    with pytest.raises(CacheError) as e:
        prepare_views(spec, key, rec)
    return str(e.value)


def test_encoded_records_pass_every_check_of_the_float_path_with_the_same_errors():
    spec = CacheSpec(**SPEC, codec="lowrank")
    params = spec.codec_params
    rng = np.random.default_rng(2)
    good = _float_record(rng)
    stored, sample = prepare_views(spec, "k", _encoded_record(good, params, "k"))
    ref, ref_sample = prepare_views(spec, "k", good)
    assert sample == ref_sample and set(stored) == set(ref)
    for name in ("feature_mean", "feature_std", "attn_index", "crop", "flip", "attn_max"):
        assert np.array_equal(stored[name], ref[name]), name

    def bad(edit):
        rec = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in good.items()}
        edit(rec)
        return rec

    cases = [
        lambda r: r["features"].__setitem__((1, 2, 3), np.inf),
        lambda r: r["feature_std"].__setitem__((0, 1), np.nan),
        lambda r: r["attn_logits"].__setitem__((0, 1, 1, 1), np.nan),
        lambda r: r["attn_logits"].__setitem__((1, 2, 0, 5), 7e4),  # row max overflows float16
        lambda r: r["feature_mean"].__setitem__((1, 0), 1e6),  # mean overflows float16
        lambda r: r.__setitem__("attn_index", r["attn_index"] + 16),
        lambda r: r.__setitem__("crop", -r["crop"]),
        lambda r: r.__setitem__("source_size", None),
        lambda r: r.__setitem__("label", "x"),
        lambda r: r.__setitem__("feature_std", r["feature_std"][:, :5]),
        lambda r: r.pop("flip"),
    ]
    for edit in cases:
        rec = bad(edit)
        want = _error(spec, "k", rec)
        got = _error(spec, "k", _encoded_record(rec, params, "k"))
        assert got == want and "\n" not in got, (got, want)
    # encoded arrays of the wrong shape or dtype, a missing one, a float16 cache
    enc = _encoded_record(good, params, "k")
    for name, value, needle in [
            ("features_v", enc["features_v"][:, :1], "features_v has shape [2, 1, 12], expected"),
            ("attn_max", enc["attn_max"].astype(np.float32), "attn_max has dtype float32, expec"),
            ("attn_step", None, "missing field(s) attn_step")]:
        broken = dict(enc)
        if value is None:
            broken.pop(name)
        else:
            broken[name] = value
        assert needle in _error(spec, "k", broken)
    assert "already encoded as lowrank, but the cache's codec is float16" in \
        _error(CacheSpec(**SPEC), "k", enc)


def test_a_part_is_written_by_one_encoder_and_its_marker_names_it(tmp_path):
    spec = CacheSpec(**SPEC, codec="lowrank", codec_params={"rounding": "stochastic"})
    writer = new_cache(tmp_path / "c", spec, [("p0", 3), ("p1", 2)])
    rng = np.random.default_rng(4)
    recs = [_float_record(rng) for _ in range(3)]
    pw = writer.open_part("p0")
    pw.write(0, "a", _encoded_record(recs[0], spec.codec_params, "a"))
    with pytest.raises(CacheError, match=r"record 'b' was encoded by numpy, the part's earlier "
                                         r"records by torch \(cpu\); a part is written by one"):
        pw.write(1, "b", recs[1])
    pw.write(1, "b", _encoded_record(recs[1], spec.codec_params, "b"))
    pw.commit()
    pw = writer.open_part("p1")
    pw.write(0, "c", recs[2])
    pw.commit()
    writer.finalize()
    from storage import layout

    markers = {p: layout.read_json(layout.marker_path(writer.root, p), "m") for p in ("p0", "p1")}
    assert markers["p0"]["encoder"] == "torch (cpu)" and markers["p1"]["encoder"] == "numpy"
    assert verify_cache(tmp_path / "c", deep=True) == []
    with open_cache(tmp_path / "c") as cache:  # the same reader for both encoders' parts
        for i in range(3):
            assert np.isfinite(cache.read(i, 1)["features"]).all()


def test_a_view_layer_seeds_its_dither_with_the_views_own_indices(tmp_path):
    """A view layer (first_view K) writes view K + v as a K2-view cache writes it: the lowrank
    dither is seeded per (key, view index), not per position in the layer."""
    spec = CacheSpec(**SPEC, codec="lowrank", codec_params={"rounding": "stochastic"})
    rng = np.random.default_rng(6)
    rec = _float_record(rng)
    layer = new_cache(tmp_path / "layer", spec, [("p0", 1)],
                      view_policy={**VIEW_POLICY, "views": 2, "first_view": 2})
    pw = layer.open_part("p0")
    pw.write(0, "a", rec)
    pw.commit()
    full = CacheSpec(**{**SPEC, "views": 4}, codec="lowrank",
                     codec_params={"rounding": "stochastic"})
    both = {k: (np.concatenate([v, v]) if isinstance(v, np.ndarray) else v)
            for k, v in rec.items()}
    stored, _ = prepare_views(full, "a", both)
    with open_cache(tmp_path / "layer") as cache:
        got = cache.read(0, 1, decode=False)
    for name in compact.PAYLOAD_FIELDS:
        assert np.array_equal(got[name], stored[name][3]), name
