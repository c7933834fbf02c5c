"""Storage benchmark (issue #16): rate-distortion of the target codecs, the stage-1 precision,
stage-1 efficiency with the compact codec, and TEC trained from the compact cache.

    python benchmarks/storage_bench.py        # ~10-20 min on a 2-core CPU (no quality runs)
    python benchmarks/storage_bench.py --quick  # fewer views and repeats (smoke test)

Writes ``benchmarks/results/storage.json``:

* ``vitb_bytes_per_view``: codec setting -> stored tensor bytes of one ViT-B/16 view (L 196,
  C 768, H 12, k_max 16). They follow exactly from the layout (no ViT-B weights can be downloaded
  here); a written cache adds framing (tests/test_plan_codecs.py checks <= 48 KiB on disk).
* ``rows``: one per codec setting: bytes per view and bits per target value at ViT-B geometry and
  at the miniature's (the quality benchmark's base model: 28 px, patch 4, L 49, C 96, H 3,
  k_max 16), the factorisation rank at both, encode / decode microseconds per view at both
  geometries (one core; ViT-B timed on Gaussian stand-in targets of the right shape), and the
  error on LEARNED features: the quality benchmark's trained base model (quality.yaml seed 0
  bootstrap, pixel MAE 3 epochs) on views of Fashion-MNIST training images, as stage 1 renders
  them: relative RMS error of the patch-normalised features, excess cross-entropy of the attention
  target at tau 1.0 and 1.8 (nats), top-k agreement (stages/target_error.py).
  The lowrank settings are given as bits per value (``feature_bits``), so the miniature row
  uses the same bits per target value as the ViT-B figure it stands for; both are reported.
* ``precision``: float16 / bfloat16 autocast forward against float32, same measures, on the
  learned miniature (CPU autocast: the formats' rounding, not a GPU's kernels) and, for the
  patch selection at ViT-B size, on a random-init ViT-B/16.
* ``stage1``: stage-1 efficiency (views/s of a steady stage-1 part / forward-only views/s, as
  benchmarks/speed.py measures it, its config and synthetic images) with float16 and lowrank.
* ``encoders``: where the lowrank codec encodes (``targets.encode_on``): CPU microseconds per
  view of the numpy encoder (the shard task's writer, one view at a time) and of the torch encoder
  (storage/compact_torch.py, the base-model actor, batches of 1 and 64 views), one thread, at
  ViT-B/16 geometry and at ViT-Ti/16 224 px, and the bytes per view an actor sends through Ray's
  object store (float32 targets vs the encoded arrays). ``--encoders`` runs only this part and
  merges it into an existing result file. GPU rows when a GPU is present, else "not measured".
* ``quality``: TEC from the lowrank cache beside TEC from the float16 cache. First the quality
  benchmark's own rows (``results/quality.json``: ``tec`` and the codec row ``tec_lowrank``,
  every seed, its full settings; ``python benchmarks/quality.py --add-rows`` adds it), then the
  earlier one-seed reduced pair (``results/quality_codec_float16.json`` and
  ``quality_codec_lowrank.json``, benchmarks/configs/quality_codec.yaml). ``best_within_0p3``:
  the smallest ViT-B bytes per view whose quality rows are within 0.3 point of float16 (k-NN,
  linear and fine-tuning top-1), with its setting, decided by the benchmark's rows when they
  exist (the reduced pair's deltas beside them as ``also``).

The file is not called ``storage.py``: the benchmark scripts run with benchmarks/ first on
sys.path, where a ``storage.py`` would shadow the ``storage`` package for every one of them.
Benchmarks report, they never assert.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # codec timings are per core

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    load_average,
    result_header,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.storage")

VIT_B = dict(num_patches=196, channels=768, heads=12, k_max=16)
MINI = dict(num_patches=49, channels=96, heads=3, k_max=16)

# (name, codec, params): the lowrank default is the 48 KiB setting the codec ships with
SETTINGS = [
    ("float16", "float16", None),
    ("int8", "int8", None),
    ("lowrank (default: fb 1.2, 4-bit factors, 4-bit attn, nearest)", "lowrank", {}),
    ("lowrank fb 1.2, stochastic rounding", "lowrank", {"rounding": "stochastic"}),
    ("lowrank fb 1.2, 8-bit factors", "lowrank", {"factor_bits": 8}),
    ("lowrank fb 0.6", "lowrank", {"feature_bits": 0.6}),
    ("lowrank fb 2.4", "lowrank", {"feature_bits": 2.4}),
    ("lowrank fb 1.2, 3-bit factors", "lowrank", {"factor_bits": 3}),
    ("lowrank fb 1.2, attn 3-bit", "lowrank", {"attn_bits": 3}),
    ("lowrank fb 1.2, attn 3-bit, stochastic", "lowrank", {"attn_bits": 3,
                                                         "rounding": "stochastic"}),
    ("lowrank fb 1.2, attn 6-bit", "lowrank", {"attn_bits": 6}),
    ("lowrank fb 1.45, attn 3-bit (same ViT-B bytes as the default)", "lowrank",
     {"feature_bits": 1.45, "attn_bits": 3}),
]
DEFAULT_SETTING = SETTINGS[2][0]


def spec_for(geometry: dict, codec: str, params: dict | None, views: int = 1):
    from storage import CacheSpec

    return CacheSpec(**geometry, views=views, codec=codec,
                     codec_params=params if codec == "lowrank" else None)


def bits_per_value(spec) -> dict:
    """Bits per feature value and per attention logit (payload and its scales)."""
    from storage.schema import stored_fields

    L, C, H, R = spec.num_patches, spec.channels, spec.heads, spec.rows
    f = {k: int(np.prod(s)) * dt.itemsize for k, (s, dt) in stored_fields(spec).items()}
    feat = sum(v for k, v in f.items() if k.startswith("features"))
    attn = sum(v for k, v in f.items() if k.startswith("attn_") and k != "attn_index")
    return {"features": 8 * feat / (L * C), "attention": 8 * attn / (H * R * L)}


# ----------------------------------------------------------------------------- learned targets
def quality_base(args) -> tuple:
    """(quality config of seed 0, base-model config) of the quality benchmark's trained base."""
    import quality as Q

    from pipeline.orchestrate import ensure_base_checkpoint, prepare_data

    raw, q = Q.load_raw(str(CONFIGS_DIR / "quality.yaml"), [])
    Q.make_paths_absolute(raw, q)
    cfg = Q.seed_config(raw, 0, with_ablations=False)
    prepare_data(cfg)
    base = ensure_base_checkpoint(cfg, allow_bootstrap=args.bootstrap)
    return cfg, base


def learned_views(cfg, images: int, views: int):
    """uint8 [images*views,3,S,S] of training images as stage 1 renders them, with keys/views."""
    import torch

    from stages.sources import decode_image, open_source
    from stages.views import render_views, view_params

    t = cfg.targets
    source = open_source(t.source.kind, t.source.path)
    shard = source.shards()[0]
    pixels, keys, idx = [], [], []
    for n, sample in enumerate(source.samples(shard)):
        if n >= images:
            break
        image = decode_image(sample.data)
        h, w = image.shape[:2]
        params = [view_params(t.view_policy, sample.key, v, h, w) for v in range(views)]
        pixels.append(render_views(image, params, t.view_policy.output_size,
                                   t.view_policy.interpolation))
        keys += [sample.key] * views
        idx += list(range(views))
    return torch.cat(pixels).numpy(), keys, idx


def targets_at(model, pixels, *, precision: str, k_max: int, batch: int = 128) -> dict:
    from stages.target_error import base_targets

    parts = [base_targets(model, pixels[i:i + batch], last_n=2, k_max=k_max, precision=precision)
             for i in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def energy_kept(features: np.ndarray, rank: int) -> float:
    """Mean over views of the fraction of ||Y||^2 in its best rank-r approximation."""
    out = []
    for y in features:
        s = np.linalg.svd(y.astype(np.float64), compute_uv=False) ** 2
        out.append(s[:rank].sum() / s.sum())
    return float(np.mean(out))


def time_codec(spec, targets: dict, keys, views, repeats: int) -> dict:
    """Encode / decode microseconds per view (best of repeats, one core)."""
    import dataclasses

    from storage.codecs import decode_view, prepare_views

    one = dataclasses.replace(spec, views=1)
    n = len(keys)
    enc_best, dec_best = float("inf"), float("inf")
    for _ in range(repeats):
        stored = []
        t0 = time.perf_counter()
        for i in range(n):
            rec = {k: targets[k][i:i + 1] for k in ("features", "feature_mean", "feature_std",
                                                    "attn_logits", "attn_index")}
            rec.update(crop=np.zeros((1, 4), np.int64), flip=np.zeros(1, bool), source_size=(1, 1))
            stored.append(prepare_views(one, keys[i], rec, first_view=views[i])[0])
        t1 = time.perf_counter()
        for s in stored:
            decode_view({k: a[0] for k, a in s.items()}, True)
        t2 = time.perf_counter()
        enc_best, dec_best = min(enc_best, (t1 - t0) / n), min(dec_best, (t2 - t1) / n)
    return {"encode_us": enc_best * 1e6, "decode_us": dec_best * 1e6}


def gaussian_vitb_targets(n: int, rng) -> dict:
    """Stand-in targets of ViT-B shape for timing only (the codec's cost depends on shapes)."""
    L, C, H, k = VIT_B["num_patches"], VIT_B["channels"], VIT_B["heads"], VIT_B["k_max"]
    f = rng.standard_normal((n, L, C)).astype(np.float32)
    f = (f - f.mean(1, keepdims=True)) / f.std(1, ddof=1, keepdims=True)
    return {"features": f, "feature_mean": rng.standard_normal((n, C)).astype(np.float32),
            "feature_std": (rng.random((n, C)) + 0.5).astype(np.float32),
            "attn_logits": rng.normal(0, 5, (n, H, k + 1, L)).astype(np.float32),
            "attn_index": np.stack([rng.permutation(L)[:k] for _ in range(n)])}


def rate_distortion(args, cfg, base) -> tuple[list[dict], dict]:
    from stages.target_error import codec_roundtrip, compare_targets
    from storage import compact, record_nbytes

    model = base.load().eval()
    pixels, keys, views = learned_views(cfg, args.images, args.views)
    log.info("learned miniature targets: %d views of %d training images", len(keys), args.images)
    ref = targets_at(model, pixels, precision="float32", k_max=MINI["k_max"])
    rng = np.random.default_rng(0)
    vitb = gaussian_vitb_targets(args.timing_views, rng)
    vitb_keys = [f"v{i}" for i in range(args.timing_views)]
    rows = []
    for name, codec, params in SETTINGS:
        sv, sm = spec_for(VIT_B, codec, params), spec_for(MINI, codec, params)
        row = {"setting": name, "codec": codec, "params": sm.codec_params,
               "vitb_bytes_per_view": record_nbytes(sv), "mini_bytes_per_view": record_nbytes(sm),
               "vitb_bits_per_value": bits_per_value(sv), "mini_bits_per_value": bits_per_value(sm)}
        if codec == "lowrank":
            row["vitb_rank"] = compact.rank_for(sv.codec_params, 196, 768)
            row["mini_rank"] = compact.rank_for(sm.codec_params, 49, 96)
            row["mini_energy_kept_at_rank"] = energy_kept(ref["features"], row["mini_rank"])
        decoded = codec_roundtrip(sm, ref, keys, views)
        row["error"] = compare_targets(ref, decoded)
        row["mini_timing"] = time_codec(sm, ref, keys[:args.timing_views],
                                        views[:args.timing_views], args.repeats)
        row["vitb_timing"] = time_codec(sv, vitb, vitb_keys, [0] * args.timing_views,
                                        args.repeats)
        e = row["error"]
        log.info("%-62s ViT-B %7d B  mini %5d B  feat %.4f  CE %.4f/%.4f  enc %.0f us (ViT-B)",
                 name, row["vitb_bytes_per_view"], row["mini_bytes_per_view"],
                 e["feature_rel_rms"], e["attn_excess_ce_tau1.0"], e["attn_excess_ce_tau1.8"],
                 row["vitb_timing"]["encode_us"])
        rows.append(row)
    info = {"views": len(keys), "images": args.images, "views_per_image": args.views,
            "base_model": str(base.checkpoint), "source_shard": str(cfg.targets.source.path),
            "attention_target_entropy_tau1.0": _entropy(ref["attn_logits"], 1.0),
            "attention_target_entropy_tau1.8": _entropy(ref["attn_logits"], 1.8)}
    return rows, info


ENCODER_GEOMETRIES = [("ViT-B/16", VIT_B),
                      ("ViT-Ti/16 224 px", dict(num_patches=196, channels=192, heads=3, k_max=16))]


def _cpu_timed(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of fn(), best of ``repeats`` (CPU time of this process)."""
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall


def _encoder_call(encoder: str, device: str, batch: int, data, keys, params):
    """A function encoding every view of ``data`` (features, attn_logits) once."""
    import torch

    from storage import compact
    from storage.compact_torch import encode_views

    f, a = data
    if encoder.startswith("numpy"):
        def run():
            for i in range(len(keys)):
                compact.encode_view(f[i], a[i], params, key=keys[i], view=0)
        return run

    def run():
        for i in range(0, len(keys), batch):
            encode_views(f[i:i + batch], a[i:i + batch], params)
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def encoder_timing(args) -> dict:
    """The lowrank encoders' cost per view: numpy (the shard task's writer) against torch (the
    base-model actor, storage/compact_torch.py), one CPU thread, batches of 1 and 64 views."""
    import torch

    from storage import compact
    from storage.compact_torch import encode_views
    from storage.synthetic import realistic_targets

    torch.set_num_threads(1)
    params = compact.check_params({})
    n = args.encoder_views
    rows, traffic = [], {}
    for name, g in ENCODER_GEOMETRIES:
        L, C, H, k = g["num_patches"], g["channels"], g["heads"], g["k_max"]
        rng = np.random.default_rng(0)
        views = [realistic_targets(rng, L, C, H, k) for _ in range(n)]
        f = np.stack([v["features"] for v in views])
        a = np.stack([v["attn_logits"] for v in views])
        keys = [f"v{i}" for i in range(n)]
        geometry = f"{name} (L {L}, C {C}, H {H}, k_max {k}, rank {compact.rank_for(params, L, C)})"

        tf, ta = torch.from_numpy(f), torch.from_numpy(a)
        runs = [("numpy (writer)", "cpu", 1), ("torch (actor)", "cpu", 1),
                ("torch (actor)", "cpu", 64)]
        if torch.cuda.is_available():
            runs.append(("torch (actor)", "cuda", 64))
        for encoder, device, batch in runs:
            data = (f, a) if encoder.startswith("numpy") else (tf.to(device), ta.to(device))
            call = _encoder_call(encoder, device, batch, data, keys, params)
            if device == "cuda":
                call()  # warm-up (cuSOLVER handles, kernels)
            cpu, wall = _cpu_timed(call, args.repeats)
            rows.append({"geometry": geometry, "encoder": encoder,
                         "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                         "batch": batch, "cpu_us_per_view": cpu / n * 1e6,
                         "wall_us_per_view": wall / n * 1e6})
        if not torch.cuda.is_available():
            rows.append({"geometry": geometry, "encoder": "torch (actor)", "device": "cuda",
                         "batch": 64, "cpu_us_per_view": None, "wall_us_per_view": None,
                         "note": "not measured (no GPU on this machine)"})
        # bytes per view through the object store: the actor's float32 targets against the
        # encoded arrays (+ float32 mean/std, int64 attn_index, two finiteness flags)
        enc = encode_views(tf[:1], ta[:1], params)
        side = 2 * C * 4 + k * 8
        traffic[geometry] = {"float32_targets": 4 * (L * C + H * (k + 1) * L) + side,
                             "encoded": sum(t.numel() * t.element_size() for t in enc.values())
                             + side + 2}
        log.info("%s: %s", geometry, ", ".join(
            f"{r['encoder']} {r['device']} b{r['batch']} "
            + ("n/a" if r["cpu_us_per_view"] is None else f"{r['cpu_us_per_view']:,.0f} us")
            for r in rows if r["geometry"] == geometry))
    return {"rows": rows, "object_store_bytes_per_view": traffic, "views": n,
            "repeats": args.repeats, "threads": 1, "params": params,
            "data": "storage.synthetic.realistic_targets (the tests' ViT-shaped targets)"}


def _entropy(logits: np.ndarray, tau: float) -> float:
    x = logits.astype(np.float64) / tau
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-(np.exp(lp) * lp).sum(-1).mean())


# ----------------------------------------------------------------------------- precision
def precision_table(args, cfg, base) -> dict:
    import timm
    import torch

    from stages.target_error import compare_targets

    out = {"device": "cpu (autocast rounding; no GPU on this machine)"}
    model = base.load().eval()
    pixels, _, _ = learned_views(cfg, args.images, args.views)
    ref = targets_at(model, pixels, precision="float32", k_max=MINI["k_max"])
    out["miniature_learned"] = {p: compare_targets(ref, targets_at(model, pixels, precision=p,
                                                                   k_max=MINI["k_max"]))
                                for p in ("float16", "bfloat16")}
    torch.manual_seed(0)
    vitb = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.vitb_views, 3, 224, 224), dtype=np.uint8)
    ref = targets_at(vitb, images, precision="float32", k_max=16, batch=8)
    out["vitb_random_init"] = {p: compare_targets(ref, targets_at(vitb, images, precision=p,
                                                                  k_max=16, batch=8))
                               for p in ("float16", "bfloat16")}
    out["vitb_random_init_note"] = ("random weights and uniform-noise images: only the patch "
                                    "selection's sensitivity to rounding at ViT-B size")
    for where in ("miniature_learned", "vitb_random_init"):
        for p, e in out[where].items():
            log.info("precision %-9s %-18s feat %.5f  CE %.5f  top-k %.4f", p, where,
                     e["feature_rel_rms"], e["attn_excess_ce_tau1.0"], e["topk_agreement"])
    return out


# ----------------------------------------------------------------------------- stage 1
def stage1_efficiency(args) -> dict:
    """speed.py's stage-1 efficiency with float16 and lowrank (its config and images)."""
    import ray
    import speed as S
    import yaml

    from pipeline.config import apply_overrides, parse_config

    path = CONFIGS_DIR / "speed.yaml"
    raw = apply_overrides(yaml.safe_load(path.read_text()),
                          S.QUICK_OVERRIDES if args.quick else [])
    cfg = parse_config(raw, source_file=str(path))
    workdir = REPO_ROOT / cfg.workdir
    base_cfg = cfg.base_model
    base_cfg.checkpoint = str(REPO_ROOT / base_cfg.checkpoint)
    cfg.targets.source.path = str(REPO_ROOT / cfg.targets.source.path)
    n = cfg.data.num_samples or 384
    S.write_jpeg_shards(cfg.targets.source.path, n, (300, 500))
    S.write_random_base(base_cfg)
    plan = S.actor_plan(cfg)
    views = S.render_pre_decoded(cfg.targets.source, cfg.targets.view_policy, cfg.targets.views,
                                 min(96, n))
    fwd_kwargs = dict(batch_size=cfg.targets.batch_size, threads=plan["threads_per_actor"],
                      last_n=cfg.targets.last_n, k_max=cfg.targets.k_max)
    fwd = [S.forward_only(base_cfg, views, **fwd_kwargs)]
    S.start_local_ray(cfg.targets.ray.num_cpus)
    runs = []
    try:
        for i, codec in enumerate(("float16", "lowrank", "float16", "lowrank")):
            res = S.run_stage1_timed(cfg, base_cfg, workdir / f"cache-storage-{codec}-{i}",
                                     codec=codec)
            log.info("stage 1 %s: %.1f views/s over the parts (best part %.1f)", codec,
                     res.get("views_per_s_parts", float("nan")),
                     res.get("best_part_views_per_s", float("nan")))
            runs.append(res)
    finally:
        ray.shutdown()
    fwd.append(S.forward_only(base_cfg, views, **fwd_kwargs))
    best_fwd = max(f["forward_best_views_per_s"] for f in fwd)
    out = {"config": str(path.relative_to(REPO_ROOT)), "plan": plan,
           "forward_only_best_views_per_s": best_fwd, "runs": runs,
           "geometry": "ViT-Ti/16 224 px (L 196, C 192, H 3), random init, K 2"}
    for codec in ("float16", "lowrank"):
        rates = [r["best_part_views_per_s"] for r in runs
                 if r["codec"] == codec and "best_part_views_per_s" in r]
        out[f"efficiency_{codec}"] = max(rates) / best_fwd if rates else None
        out[f"cache_bytes_{codec}"] = [r["cache_bytes"] for r in runs if r["codec"] == codec]
    log.info("stage-1 efficiency: float16 %s, lowrank %s", out["efficiency_float16"],
             out["efficiency_lowrank"])
    return out


# ----------------------------------------------------------------------------- quality rows
QUALITY_FILES = {"float16": "quality_codec_float16.json", "lowrank": "quality_codec_lowrank.json"}
MAIN_QUALITY = "quality.json"  # the quality benchmark: tec and its codec rows (--add-rows)
ROW_METRICS = ("seeds", "epochs", "knn_top1", "linear_top1", "knn_cls", "knn_mean", "linear_cls",
               "linear_mean", "finetune_top1", "knn_top1_std", "linear_top1_std",
               "finetune_top1_std")


def _quality_row(row: dict, file: str, result: dict) -> dict:
    return {**{k: row.get(k) for k in ROW_METRICS}, "file": f"benchmarks/results/{file}",
            "runtime_s": result.get("runtime_s")}


def _delta(ref: dict, low: dict) -> tuple[dict, str]:
    """lowrank - float16 per measure both rows have (fine-tuning once both have it)."""
    metrics = ["knn_top1", "linear_top1"] + (
        ["finetune_top1"] if ref.get("finetune_top1") is not None
        and low.get("finetune_top1") is not None else [])
    measures = "k-NN, linear" + (" and fine-tuning" if "finetune_top1" in metrics else "")
    return {m: low[m] - ref[m] for m in metrics}, measures


def _setting_of(targets: dict) -> str | None:
    """The SETTINGS name of a codec row's cache settings (None: not a setting of the table)."""
    want = (targets.get("codec"), json.dumps(targets.get("codec_params") or {}, sort_keys=True))
    for name, codec, params in SETTINGS:
        if (codec, json.dumps(params or {}, sort_keys=True)) == want:
            return name
    return None


def quality_rows(vitb_bytes: dict) -> tuple[dict, dict]:
    """The quality rows of compact caches beside the float16 cache, and best_within_0p3.

    Preferred: the quality benchmark's own rows (results/quality.json, every seed, its full
    settings): ``tec`` (the float16 cache) and its codec rows (``quality.codec_rows``, added
    with ``quality.py --add-rows``), each a setting of the rate-distortion table. Also listed:
    the earlier one-seed reduced pair (benchmarks/configs/quality_codec.yaml), which decides only
    when the benchmark has no codec row. best_within_0p3 is the smallest ViT-B setting whose row
    is within 0.3 point of float16 on every measure both rows have; float16 when none is."""
    rows, pairs = {}, []
    main = RESULTS_DIR / MAIN_QUALITY
    if main.is_file():
        result = json.loads(main.read_text())
        by = {r["name"]: r for r in result.get("rows", [])}
        for row in result.get("rows", []):
            if row.get("cache_targets") is None or "tec" not in by:
                continue
            setting = _setting_of(row["cache_targets"])
            if setting is None:
                log.warning("quality.json row %s: cache settings %s are not a setting of the "
                            "table; not counted", row["name"], row["cache_targets"])
                continue
            ref = rows["tec (float16 cache)"] = _quality_row(by["tec"], MAIN_QUALITY, result)
            low = rows[f"{row['name']} ({setting})"] = _quality_row(row, MAIN_QUALITY, result)
            pairs.append((ref, low, setting, f"{len(ref['seeds'] or [])} seeds, the quality "
                          f"benchmark's full settings ({MAIN_QUALITY}, rows tec and "
                          f"{row['name']})"))
    reduced = []
    for codec, name in QUALITY_FILES.items():
        path = RESULTS_DIR / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for row in result.get("rows", []):
            if row["name"] in ("tec", "base"):
                label = (f"tec ({codec} cache, reduced)" if row["name"] == "tec" else
                         f"base ({codec} run, reduced)")
                rows[label] = _quality_row(row, name, result)
    ref, low = rows.get("tec (float16 cache, reduced)"), rows.get("tec (lowrank cache, reduced)")
    if ref is not None and low is not None:
        reduced.append((ref, low, DEFAULT_SETTING, "one seed at reduced scale (benchmarks/"
                        "configs/quality_codec.yaml)"))
    deciding, others = (pairs, reduced) if pairs else (reduced, [])
    if not deciding:
        return rows, {"setting": None, "vitb_bytes_per_view": None,
                      "why": "quality rows not measured (no codec row in quality.json and no "
                             "quality_codec_*.json pair)"}
    seeds = deciding[0][0].get("seeds")  # the deciding pairs' float16 row (one per source)
    measured = []
    for ref, low, setting, note in deciding:
        diff, measures = _delta(ref, low)
        measured.append({"setting": setting, "vitb_bytes_per_view": vitb_bytes[setting],
                         "delta_vs_float16": diff, "measures": measures, "note": note,
                         "within": all(d >= -0.3 for d in diff.values())})
    within = sorted((m for m in measured if m["within"]), key=lambda m: m["vitb_bytes_per_view"])
    if within:
        chosen = within[0]
        best = {"setting": chosen["setting"], "vitb_bytes_per_view": chosen["vitb_bytes_per_view"],
                "delta_vs_float16": chosen["delta_vs_float16"], "seeds": seeds,
                "why": f"the smallest compact setting with quality rows within 0.3 point of "
                       f"float16 on {chosen['measures']} top-1", "note": chosen["note"]}
    else:
        best = {"setting": "float16", "vitb_bytes_per_view": vitb_bytes["float16"],
                "delta_vs_float16": None, "seeds": seeds,
                "why": "no compact setting with quality rows is within 0.3 point of float16 on "
                       "every measure, so the smallest setting within 0.3 point is float16 itself",
                "note": deciding[0][3]}
    best["measured"] = [{k: m[k] for k in ("setting", "vitb_bytes_per_view", "delta_vs_float16",
                                            "within", "note")} for m in measured]
    if others:
        best["also"] = [{"setting": setting, "note": note,
                         "delta_vs_float16": _delta(r, lo)[0]} for r, lo, setting, note in others]
    return rows, best


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def encoder_markdown(e: dict | None) -> list[str]:
    """The encoder table (``encoders`` of storage.json) as README lines ([] when absent)."""
    if not e:
        return []
    lines = ["| lowrank encoder (targets.encode_on) | geometry | device | views per call | CPU "
             "us per view | wall us per view |", "|---|---|---|---|---|---|"]
    for row in e["rows"]:
        cpu, wall = row["cpu_us_per_view"], row["wall_us_per_view"]
        lines.append(f"| {row['encoder']} | {row['geometry']} | {row['device']} | {row['batch']} "
                     f"| {'not measured' if cpu is None else f'{cpu:,.0f}'} | "
                     f"{'not measured' if wall is None else f'{wall:,.0f}'} |")
    traffic = "; ".join(f"{g}: {t['float32_targets']:,} B float32 targets -> {t['encoded']:,} B "
                        f"encoded ({t['float32_targets'] / t['encoded']:.1f}x fewer)"
                        for g, t in e["object_store_bytes_per_view"].items())
    prov = e.get("provenance", {})
    return lines + ["", f"Encoders: {e['views']} views per geometry ({e['data']}), one thread, "
                    f"best of {e['repeats']}; CPU time of the process (the machine was shared: "
                    f"load average {prov.get('load_average_start')} at start, "
                    f"{prov.get('load_average_end')} at end; wall times are noisier). Bytes per "
                    f"view an actor sends through Ray's object store: {traffic}. "
                    f"`{prov.get('command', '')}`, commit {prov.get('commit', '?')}, "
                    f"{prov.get('created', '?')}.", ""]


def markdown(r: dict) -> str:
    """The README tables of a storage.json result (benchmarks/report.py renders them)."""
    lines = ["| setting | ViT-B bytes/view | ViT-B bits/value (features / attention) | "
             "miniature bytes/view | miniature bits/value | rank ViT-B / mini | energy kept "
             "(mini) | feature rel. RMS | attn excess CE tau 1.0 / 1.8 (nats) | top-k agreement "
             "| encode / decode us per view, ViT-B | same, miniature |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        e, vb, mb = row["error"], row["vitb_bits_per_value"], row["mini_bits_per_value"]
        lines.append(
            f"| {row['setting']} | {row['vitb_bytes_per_view']:,} | {vb['features']:.2f} / "
            f"{vb['attention']:.2f} | {row['mini_bytes_per_view']:,} | {mb['features']:.2f} / "
            f"{mb['attention']:.2f} | {row.get('vitb_rank', '-')} / {row.get('mini_rank', '-')} | "
            f"{_f(row.get('mini_energy_kept_at_rank'), 3) if 'mini_rank' in row else '-'} | "
            f"{_f(e['feature_rel_rms'])} | {_f(e['attn_excess_ce_tau1.0'], 5)} / "
            f"{_f(e['attn_excess_ce_tau1.8'], 5)} | {_f(e['topk_agreement'], 3)} | "
            f"{row['vitb_timing']['encode_us']:,.0f} / {row['vitb_timing']['decode_us']:,.0f} | "
            f"{row['mini_timing']['encode_us']:,.0f} / {row['mini_timing']['decode_us']:,.0f} |")
    info = r.get("learned_targets", {})
    lines += ["", f"Learned targets: {info.get('views')} views ({info.get('images')} training "
              f"images x {info.get('views_per_image')}) of the quality benchmark's base model; "
              f"attention-target entropy {_f(info.get('attention_target_entropy_tau1.0'), 3)} "
              f"nats at tau 1.0, {_f(info.get('attention_target_entropy_tau1.8'), 3)} at 1.8 "
              f"(uniform over 49 patches: {np.log(49):.3f}).", ""]
    lines += encoder_markdown(r.get("encoders"))
    pr = r.get("precision", {})
    lines += ["| forward precision vs float32 | targets | feature rel. RMS | attn excess CE tau "
              "1.0 / 1.8 (nats) | top-k agreement | attention rows compared |",
              "|---|---|---|---|---|---|"]
    for where, label in (("miniature_learned", "learned miniature"),
                         ("vitb_random_init", "random-init ViT-B/16")):
        for prec, e in (pr.get(where) or {}).items():
            lines.append(f"| {prec} | {label} | {_f(e['feature_rel_rms'], 5)} | "
                         f"{_f(e['attn_excess_ce_tau1.0'], 6)} / "
                         f"{_f(e['attn_excess_ce_tau1.8'], 6)}"
                         f" | {_f(e['topk_agreement'], 4)} | {_f(e['attn_rows_compared'], 3)} |")
    lines += ["", f"Precision measured on: {pr.get('device', '?')}."]
    s1 = r.get("stage1")
    if s1:
        lines += ["", "| stage 1 (speed.yaml: " + s1.get("geometry", "") + ") | efficiency "
                  "(best steady part / best forward-only) | cache bytes |", "|---|---|---|"]
        for codec in ("float16", "lowrank"):
            lines.append(f"| {codec} | {_f(s1.get(f'efficiency_{codec}'), 2)} | "
                         f"{', '.join(f'{b:,}' for b in s1.get(f'cache_bytes_{codec}', []))} |")
    q, best = r.get("quality") or {}, r.get("best_within_0p3") or {}
    lines += [""]
    if q:
        lines += ["| quality row | seeds | k-NN top-1 | linear top-1 | fine-tuning top-1 "
                  "| file |", "|---|---|---|---|---|---|"]
        for name, row in q.items():
            lines.append(f"| {name} | {len(row.get('seeds') or [])} | "
                         f"{_f(row.get('knn_top1'), 2)} | "
                         f"{_f(row.get('linear_top1'), 2)} | "
                         f"{_f(row.get('finetune_top1'), 2)} | `{row.get('file')}` |")
        lines.append("")
    lines.append(f"best_within_0p3: setting {best.get('setting')!r}, ViT-B bytes per view "
                 f"{best.get('vitb_bytes_per_view')}; {best.get('why')}.")
    for m in best.get("measured", []):
        delta = ", ".join(f"{k.replace('_top1', '')} {v:+.2f}"
                          for k, v in m["delta_vs_float16"].items())
        lines.append(f"- {m['setting']} ({m['vitb_bytes_per_view']:,} B per ViT-B view) vs "
                     f"float16: {delta}: {'within' if m['within'] else 'not within'} 0.3 "
                     f"point ({m['note']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer views and repeats")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--timing-views", type=int, default=16)
    parser.add_argument("--vitb-views", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-stage1", action="store_true", help="skip the stage-1 runs")
    parser.add_argument("--bootstrap", action="store_true",
                        help="train the quality benchmark's base model if it is missing")
    parser.add_argument("--update-quality", action="store_true",
                        help="only re-read the quality results into an existing storage.json")
    parser.add_argument("--encoders", action="store_true",
                        help="only time the lowrank encoders (numpy vs torch) and merge the table "
                             "into an existing result file")
    parser.add_argument("--encoder-views", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.timing_views, args.vitb_views, args.repeats = 32, 4, 4, 1
    setup_logging(args.verbose)
    started = time.perf_counter()
    out = Path(args.out) if args.out else RESULTS_DIR / ("storage_quick.json" if args.quick
                                                         else "storage.json")
    if args.update_quality:
        result = json.loads(out.read_text())
        result["quality"], result["best_within_0p3"] = quality_rows(result["vitb_bytes_per_view"])
        write_result(result, out)
        log.info("updated the quality rows of %s: %s", out, result["best_within_0p3"])
        return 0
    if args.encoders:
        return merge_encoders(args, out)
    import torch

    torch.set_num_threads(1)
    result = result_header("storage")
    result["load_average"] = {"start": load_average()}
    result["command"] = "python benchmarks/storage_bench.py " + " ".join(argv or sys.argv[1:])
    cfg, base = quality_base(args)
    rows, info = rate_distortion(args, cfg, base)
    result["vitb_bytes_per_view"] = {r["setting"]: r["vitb_bytes_per_view"] for r in rows}
    result["rows"] = rows
    result["learned_targets"] = info
    result["encoders"] = encoder_timing(args)
    result["precision"] = precision_table(args, cfg, base)
    if not args.no_stage1:
        result["stage1"] = stage1_efficiency(args)
    result["quality"], result["best_within_0p3"] = quality_rows(result["vitb_bytes_per_view"])
    result["load_average"]["end"] = load_average()
    result["runtime_s"] = time.perf_counter() - started
    write_result(result, out)
    log.info("wrote %s (%.1f min)", out, result["runtime_s"] / 60)
    return 0


def merge_encoders(args, out: Path) -> int:
    """``--encoders``: time the encoders and put the table into ``out`` (kept otherwise as is)."""
    import datetime

    from common import _json_default, git_info

    started, load = time.perf_counter(), load_average()
    result = json.loads(out.read_text()) if out.exists() else result_header("storage")
    enc = encoder_timing(args)
    git = git_info()
    enc["provenance"] = {
        "command": "python benchmarks/storage_bench.py " + " ".join(sys.argv[1:]),
        "commit": (git.get("commit") or "unknown")[:10] + (" (dirty tree)" if git.get("dirty")
                                                           else ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load, "load_average_end": load_average(),
        "runtime_s": round(time.perf_counter() - started, 1)}
    result["encoders"] = enc
    # written directly: write_result would restamp the earlier run's machine header
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out)
    log.info("merged the encoder table into %s (%.1f min)", out,
             enc["provenance"]["runtime_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
