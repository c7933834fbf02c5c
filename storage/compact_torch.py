"""The ``lowrank`` codec's encoder in torch, batched over views: stage 1 runs it on the base
model's device right after the forward pass (``targets.encode_on``, README "Target codecs").

Same algorithm and stored format as :mod:`storage.compact` (the numpy reference, which the shard
task's writer runs on a CPU): Gram-matrix eigendecomposition in float64, ``factor_bits`` signed
factor codes with float16 scales per column of A / per row of B, B refitted by least squares to the
quantised A, attention rows as float16 maximum + ``attn_bits`` steps clamped at ``attn_floor``,
nearest or stochastic rounding. Stochastic rounding draws exactly the numpy path's dither (a
numpy Generator seeded by ``compact.record_seed(key, view)``, drawn in the same order: A, B,
attention), on the host, moved to the device. :func:`encode_views` returns the arrays
``compact.stored_fields`` describes, so the reader is the same for both encoders.

What is identical and what is not
---------------------------------
* The format, the bit widths, the rank, the scales' rounding rules and the dither stream.
* Not the bytes. The eigenvectors' signs are not defined by the decomposition: numpy's LAPACK
  (OpenBLAS), torch's on a CPU (MKL) and cuSOLVER each pick their own (between a third and a half of
  the components differ between numpy and MKL). This encoder makes them canonical (the largest entry
  of each column of A positive), so it picks the same sign on every device; numpy keeps its
  LAPACK's. With nearest rounding a flipped component is exactly the same reconstruction (the
  quantiser is symmetric); with stochastic rounding it is another draw of the same zero-mean noise.
  After aligning signs, codes still differ at rounding boundaries where float64 reductions ordered
  differently (BLAS, GPU) move a value by an ulp: on a CPU all or nearly all codes are the same
  (tests/test_storage_compact_torch.py requires >= 99%), and the decoded error is the same to 1e-3
  relative.

This module imports torch; nothing else in ``storage`` imports it (the storage package stays
usable without torch). Non-finite inputs are the caller's to check (:func:`finite_views`): the
views holding them are encoded as zeros here, so one bad view cannot fail a batch's
eigendecomposition.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import compact

__all__ = ["dither", "encode_views", "finite_views", "pack_codes"]


def finite_views(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """For each tensor [N, ...]: bool [N], True where the view's values are all finite."""
    return [torch.isfinite(t).flatten(1).all(dim=1) for t in tensors]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [..., N] -> bytes [..., ceil(N * bits / 8)], MSB first (exactly
    ``compact.pack_codes``)."""
    if bits == 8:
        return codes
    n = codes.shape[-1]
    if bits == 4:
        if n % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        return (codes[..., 0::2] << 4) | codes[..., 1::2]
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=codes.device)
    planes = ((codes[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    width = compact.packed_width(n, bits)
    planes = torch.nn.functional.pad(planes, (0, 8 * width - n * bits))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=codes.device)
    return (planes.reshape(*codes.shape[:-1], width, 8) * weights).sum(-1, dtype=torch.uint8)


def dither(seeds: Sequence[int], shapes: Sequence[tuple]) -> list[np.ndarray]:
    """The stochastic-rounding draws of N records: for each shape, float32 [N, *shape], drawn per
    record from ``np.random.default_rng(seed)`` in the order of ``shapes`` (the numpy encoder's
    order: A [L, r], B [r, C], attention [H, R, L])."""
    out = [np.empty((len(seeds), *shape), np.float32) for shape in shapes]
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        for arr, shape in zip(out, shapes):
            arr[i] = rng.random(shape, dtype=np.float32)
    return out


def _round(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    return torch.round(x) if noise is None else torch.floor(x + noise)


def _signed(x: torch.Tensor, reduce_dim: int, bits: int,
            noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """compact._signed over a batch: one absmax scale per slice, reduced over ``reduce_dim``."""
    qmax = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(dim=reduce_dim) / qmax).to(torch.float16)
    s = scale.float().unsqueeze(reduce_dim)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = _round(x / safe, noise).clamp(-qmax, qmax)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return (q + (1 << (bits - 1))).to(torch.uint8), scale


def _factor_a(y64: torch.Tensor, rank: int) -> torch.Tensor:
    """A [N, L, r] (float32) of the best rank-r factorisation of y [N, L, C] (given in float64),
    as compact.factorize, with each column's sign canonical (its largest-magnitude entry > 0)."""
    L, C = y64.shape[-2:]
    if L <= C:
        _, vec = torch.linalg.eigh(y64 @ y64.mT)
        a = vec.flip(-1)[..., :rank]
    else:
        _, vec = torch.linalg.eigh(y64.mT @ y64)
        a = y64 @ vec.flip(-1)[..., :rank]
    top = a.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(a, -2, top) < 0, -1.0, 1.0).to(a.dtype)
    return (a * sign).float()


def encode_views(features: torch.Tensor, attn_logits: torch.Tensor, params: dict, *,
                 seeds: Sequence[int] | None = None,
                 finite: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """N views' features [N, L, C] and attn_logits [N, H, R, L] (float, any device) -> the
    codec's stored arrays as [N, ...] tensors on that device (names, shapes and dtypes of
    ``compact.stored_fields``).

    params: the codec parameters (``compact.check_params``); seeds: ``compact.record_seed(key,
    view)`` of each view, required for stochastic rounding. A row maximum that overflows float16
    comes back as an infinite ``attn_max`` (the writer refuses it, as the numpy encoder does);
    views with non-finite values are encoded as zeros (check :func:`finite_views` first and pass
    its result as ``finite`` to save computing it again).
    """
    params = compact.check_params(params)
    N, L, C = features.shape
    _, H, R, L2 = attn_logits.shape
    if L2 != L or attn_logits.shape[0] != N:
        raise ValueError(f"attn_logits has shape {list(attn_logits.shape)}, expected "
                         f"[{N}, H, R, {L}] for features {list(features.shape)}")
    r = compact.rank_for(params, L, C)
    fb, ab = params["factor_bits"], params["attn_bits"]
    device = features.device
    noise = [None, None, None]
    if params["rounding"] == "stochastic":
        if seeds is None or len(seeds) != N:
            raise ValueError(f"stochastic rounding needs one dither seed per view ({N}), "
                             f"got {None if seeds is None else len(seeds)}")
        noise = [torch.from_numpy(d).to(device, non_blocking=True)
                 for d in dither(seeds, [(L, r), (r, C), (H, R, L)])]
    ok_f, ok_a = finite_views(features, attn_logits) if finite is None else finite
    y64, x = features.float().double(), attn_logits.float()
    if not bool(ok_f.all()):  # one host sync per batch; a bad view must not fail the others
        y64 = torch.where(ok_f[:, None, None], y64, 0.0)
    if not bool(ok_a.all()):
        x = torch.where(ok_a[:, None, None, None], x, 0.0)

    # features: A from the eigenvectors, quantised per column; B refitted to the quantised A
    a = _factor_a(y64, r)
    ua, sa = _signed(a, -2, fb, noise[0])
    a64 = ((ua.float() - (1 << (fb - 1))) * sa.float()[:, None, :]).double()
    gram = torch.linalg.pinv(a64.mT @ a64, rtol=1e-15, hermitian=True)
    b = (gram @ (a64.mT @ y64)).float()
    ub, sb = _signed(b, -1, fb, noise[1])

    # attention: row maximum (float16), then steps below it clamped at attn_floor
    levels = (1 << ab) - 1
    top16 = x.amax(dim=-1).to(torch.float16)
    d = top16.float()[..., None] - x
    span = d.amax(dim=-1).clamp(min=0.0, max=params["attn_floor"])
    step = (span / levels).to(torch.float16)
    s = step.float()[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = _round(d.clamp(min=0.0) / safe, noise[2]).clamp(0, levels)
    q = torch.where(s > 0, q, torch.zeros_like(q)).to(torch.uint8)
    return {"features_u": pack_codes(ua, fb), "features_u_scale": sa,
            "features_v": pack_codes(ub, fb), "features_v_scale": sb,
            "attn_codes": pack_codes(q, ab), "attn_max": top16, "attn_step": step}
