"""Probe for issue #16's next codec: a per-cache feature basis against today's per-view lowrank.

    python benchmarks/basis_probe.py [--images 1000]

On the learned miniature targets (the quality benchmark's seed-0 base model, the first training
shard, 2 views per image, float32 forward), at the same feature bytes per view as the default
``lowrank`` setting: today's per-view factorisation (the real codec, round-tripped) against a
basis of the patch-normalised features fitted once on the first half of the images (a per-cache
basis, stored once with the cache) and applied to the other half, with the per-view
coefficients quantised to 4 bits with one scale per component as the codec quantises its
factors. Reports relative RMS error and energy kept; writes ``results/basis_probe.json``.
A probe to choose the next technique by measurement, not a codec: nothing here is in storage/.
Benchmarks report, they never assert.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, result_header, setup_logging, write_result  # noqa: E402


def quantise_columns(a: np.ndarray, bits: int) -> np.ndarray:
    """Signed ``bits``-bit codes with one scale per column (nearest rounding), dequantised."""
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(a).max(axis=0, keepdims=True) / levels
    scale[scale == 0] = 1.0
    return np.round(a / scale) * scale


def per_view_feature_bytes(params: dict, L: int, C: int) -> int:
    """The lowrank codec's feature fields per view (factors and scales), from its own layout."""
    from storage import compact

    fields = compact.stored_fields(L, C, 1, 1, params)
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for name, (shape, dtype) in fields.items() if name.startswith("features_"))


def basis_bytes(L: int, rank: int, bits: int) -> int:
    """Per-view bytes of a per-cache basis: L x rank coefficient codes + one float16 scale each."""
    from storage import compact

    return L * compact.packed_width(rank, bits) + 2 * rank


def rel_rms(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(np.linalg.norm(y_hat - y) / np.linalg.norm(y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    setup_logging(False)
    import storage_bench as SB
    import torch

    from stages.target_error import codec_roundtrip
    from storage import compact

    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg, base = SB.quality_base(argparse.Namespace(bootstrap=False))
    pixels, keys, views = SB.learned_views(cfg, args.images, 2)
    ref = SB.targets_at(base.load().eval(), pixels, precision="float32", k_max=SB.MINI["k_max"])
    y = ref["features"].astype(np.float64)  # [N, L, C], patch-normalised
    n, L, C = y.shape
    half = n // 2  # views of the first images: fit; of the others: test
    fit, test = y[:half], y[half:]
    spec = SB.spec_for(SB.MINI, "lowrank", None)
    r = compact.rank_for(spec.codec_params, L, C)
    fb = int(spec.codec_params["factor_bits"])
    per_view_bytes = per_view_feature_bytes(spec.codec_params, L, C)
    decoded = codec_roundtrip(spec, {k: v[half:] for k, v in ref.items()}, keys[half:],
                              views[half:])["features"].astype(np.float64)
    trunc = []
    for v in test:
        u, s, vt = np.linalg.svd(v, full_matrices=False)
        trunc.append((u[:, :r] * s[:r]) @ vt[:r])
    rows = [{"method": f"per-view lowrank (the codec's default): rank {r}, {fb}-bit factors",
             "feature_bytes": per_view_bytes, "rank": r,
             "rel_rms": rel_rms(test, decoded),
             "rel_rms_unquantised": rel_rms(test, np.stack(trunc))}]
    gram = np.einsum("nlc,nld->cd", fit, fit)
    evals, evecs = np.linalg.eigh(gram)
    basis = evecs[:, ::-1]
    total = float(np.einsum("nlc,nlc->", test, test))
    for R in sorted({r, 16, 24, 32, 48, 64}
                    | {max(R for R in range(1, C + 1) if basis_bytes(L, R, fb) <= per_view_bytes)}):
        b = basis[:, :R]
        coef = test @ b  # [N, L, R]
        approx = coef @ b.T
        quant = np.stack([quantise_columns(c, fb) for c in coef]) @ b.T
        nbytes = basis_bytes(L, R, fb)
        rows.append({"method": f"per-cache basis (fitted on other images): rank {R}, "
                               f"{fb}-bit coefficients", "feature_bytes": nbytes, "rank": R,
                     "rel_rms": rel_rms(test, quant), "rel_rms_unquantised": rel_rms(test, approx),
                     "energy_kept": float(np.einsum("nlr,nlr->", coef, coef)) / total,
                     "same_bytes_as_default": nbytes <= per_view_bytes})
    # ViT-B/16 geometry: the ranks the same feature bytes give each method (bytes from layout)
    Lb, Cb = 196, 768
    vspec = SB.spec_for(SB.VIT_B, "lowrank", None)
    rb = compact.rank_for(vspec.codec_params, Lb, Cb)
    vb_bytes = per_view_feature_bytes(vspec.codec_params, Lb, Cb)
    Rb = max(R for R in range(1, Cb + 1) if basis_bytes(Lb, R, fb) <= vb_bytes)
    result = result_header("basis_probe")
    result.update({
        "views": {"fit": int(half), "test": int(n - half), "images": args.images},
        "geometry": {"L": L, "C": C}, "rows": rows,
        "vitb": {"per_view_rank": rb, "feature_bytes": vb_bytes,
                 "per_cache_rank_same_bytes": Rb,
                 "basis_bytes_once": Cb * Rb * 2},
        "runtime_s": time.perf_counter() - started})
    out = RESULTS_DIR / "basis_probe.json"
    write_result(result, out)
    for row in rows:
        print(f"{row['method']:<72} {row['feature_bytes']:>5} B  rel RMS {row['rel_rms']:.4f} "
              f"(unquantised {row['rel_rms_unquantised']:.4f})")
    print(f"ViT-B/16: per-view rank {rb} in {vb_bytes} B of features; a per-cache basis gives "
          f"rank {Rb} in the same bytes (+{Cb * Rb * 2} B once per cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
