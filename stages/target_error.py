"""Target error: how far a cache's targets are from the float32 targets of the same views.

Used by stage 1 (measured on the first samples of the first part of a new cache, stored in the
manifest as ``target_error`` and shown by ``tec cache inspect``) and by benchmarks/storage.py.

Measures (targets as ``extract_targets`` returns them, numpy, batch axis first):

* ``feature_rel_rms``: ||Y - Y_ref|| / ||Y_ref|| of the patch-normalised features [N, L, C];
* ``attn_excess_ce_tau<t>``: mean over (view, head, row) of KL(softmax(T_ref/t) || softmax(T/t))
  in nats, the cross-entropy a perfect student of the test target pays on top of the reference
  target's entropy. Rows are compared where both select the same patch at the same rank (the cls
  row always); ``attn_rows_compared`` says which fraction that was;
* ``topk_agreement``: mean |top-k_max(ref) & top-k_max(test)| / k_max of the selected patches.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np

logger = logging.getLogger(__name__)

TAUS = (1.0, 1.8)
MEASURE_VIEWS = 16


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_targets(ref: dict, test: dict, taus=TAUS) -> dict:
    """Error of ``test`` against ``ref``: dicts with features [N,L,C], attn_logits [N,H,R,L],
    attn_index [N,k_max] (numpy). Returns the measures of the module docstring."""
    f_ref = np.asarray(ref["features"], np.float64)
    f = np.asarray(test["features"], np.float64)
    out = {"feature_rel_rms": float(np.linalg.norm(f - f_ref) / max(np.linalg.norm(f_ref), 1e-30))}
    i_ref, i = np.asarray(ref["attn_index"]), np.asarray(test["attn_index"])
    same = np.concatenate([np.ones((len(i), 1), bool), i_ref == i], axis=1)  # [N, R]
    a_ref = np.asarray(ref["attn_logits"], np.float64)
    a = np.asarray(test["attn_logits"], np.float64)
    for t in taus:
        lp_ref, lp = _log_softmax(a_ref / t), _log_softmax(a / t)
        kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1)  # [N, H, R]
        kl = np.broadcast_to(same[:, None, :], kl.shape) * kl
        rows = same.sum() * kl.shape[1]
        out[f"attn_excess_ce_tau{t}"] = float(kl.sum() / max(rows, 1))
    out["attn_rows_compared"] = float(same.mean())
    k = i.shape[1]
    agree = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(i_ref, i)] if k else [1.0]
    out["topk_agreement"] = float(np.mean(agree))
    return out


def base_targets(model, views_uint8, *, last_n: int, k_max: int, precision: str = "float32",
                 device: str | None = None) -> dict:
    """The base model's targets (numpy float32) for uint8 views [B,3,S,S] at ``precision``
    (autocast dtype on the model's device; float16/bfloat16 on a CPU emulate the rounding)."""
    import torch

    from tec.targets import extract_targets, normalize_images

    dev = torch.device(device) if device else next(model.parameters()).device
    x = normalize_images(torch.as_tensor(views_uint8).to(dev))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision)
    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        t = extract_targets(model, x, last_n=last_n, k_max=k_max)
    return {"features": t.features.float().cpu().numpy(),
            "feature_mean": t.feature_mean.float().cpu().numpy(),
            "feature_std": t.feature_std.float().cpu().numpy(),
            "attn_logits": t.attn_logits.float().cpu().numpy(),
            "attn_index": t.attn_index.long().cpu().numpy()}


def codec_roundtrip(spec, targets: dict, keys: list[str], views: list[int]) -> dict:
    """Encode each view's targets with ``spec``'s codec and decode them again, as the cache
    would (the dither seeded by each record's key and view)."""
    from storage.codecs import decode_view, prepare_views

    one = dataclasses.replace(spec, views=1)
    out: dict[str, list] = {"features": [], "attn_logits": [], "attn_index": []}
    for n, (key, v) in enumerate(zip(keys, views)):
        record = {name: np.asarray(targets[name][n:n + 1]) for name in
                  ("features", "feature_mean", "feature_std", "attn_logits", "attn_index")}
        record.update(crop=np.zeros((1, 4), np.int64), flip=np.zeros(1, bool), source_size=(1, 1))
        stored, _ = prepare_views(one, key, record, first_view=v)
        dec = decode_view({name: a[0] for name, a in stored.items()}, True)
        for name in out:
            out[name].append(dec[name])
    return {name: np.stack(a) for name, a in out.items()}


def measure_stage1_error(cfg, base, spec, precision: str, source, shard: str,
                         max_views: int = MEASURE_VIEWS) -> dict:
    """Target error of the cache's codec and stage-1 precision against float32, on the first
    ``max_views`` views of the first samples of ``shard`` (the first part), computed with the
    base model ``base`` (a stages.resolve.ResolvedBase). Never fails stage 1:
    an error while measuring is recorded as such."""
    start = time.perf_counter()
    try:
        return _measure(cfg, base, spec, precision, source, shard, max_views, start)
    except Exception as exc:  # the measurement must not stop a run; say why it is missing
        logger.warning("target error not measured (%s: %s)", type(exc).__name__, exc)
        return {"error": f"not measured ({type(exc).__name__}: {exc})"}


def _measure(cfg, base, spec, precision, source, shard, max_views, start) -> dict:
    import torch

    from stages.sources import BadSample, decode_image
    from stages.views import render_views, view_params

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # a copy: the described base model stays on the CPU for the rest of the command
    model = copy.deepcopy(base.model).eval().to(device)
    policy = cfg.view_policy
    pixels, keys, views = [], [], []
    for sample in source.samples(shard):
        try:
            if sample.error:
                raise BadSample(sample.error)
            image = decode_image(sample.data)
        except BadSample:
            continue
        h, w = int(image.shape[0]), int(image.shape[1])
        vs = [view_params(policy, sample.key, v, h, w) for v in range(cfg.views)]
        pixels.append(render_views(image, vs, policy.output_size, policy.interpolation))
        keys += [sample.key] * cfg.views
        views += list(range(cfg.views))
        if len(keys) >= max_views:
            break
    if not keys:
        return {"error": "not measured (no readable sample in the first part)"}
    batch = torch.cat(pixels)[:max_views].numpy()
    keys, views = keys[:max_views], views[:max_views]
    ref = base_targets(model, batch, last_n=cfg.last_n, k_max=cfg.k_max)
    test = ref if precision == "float32" else base_targets(model, batch, last_n=cfg.last_n,
                                                          k_max=cfg.k_max, precision=precision)
    stored = codec_roundtrip(spec, test, keys, views)
    out = {"views": len(keys), "reference": "float32", "device": device, "precision": precision,
           "codec": spec.codec, "total": compare_targets(ref, stored),
           "codec_only": compare_targets(test, stored),
           "precision_only": compare_targets(ref, test)}
    # The manifest must be reproducible (a resumed or rerun stage 1 writes the same bytes): no
    # timing in it, and measures rounded to 4 significant digits, far above the last-bit noise
    # of float32 sums that differ with the thread count of the process that measures.
    for key in ("total", "codec_only", "precision_only"):
        out[key] = {k: _round_sig(v) for k, v in out[key].items()}
    logger.info("target error of codec %s at precision %s vs float32 on %d views (%.1f s): "
                "feature rel RMS %.4f, attention excess CE %.4f nats (tau 1.0), top-k agreement "
                "%.3f", spec.codec, precision, len(keys), time.perf_counter() - start,
                out["total"]["feature_rel_rms"], out["total"]["attn_excess_ce_tau1.0"],
                out["total"]["topk_agreement"])
    return out


def _round_sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (0 stays 0)."""
    return float(f"{x:.{digits - 1}e}")
