"""Synthetic targets shaped like a ViT's (the storage tests and the loader benchmark): realistic
sizes and compressibility without a model."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["realistic_targets"]


def _smooth(rng: np.random.Generator, grid: int, n: int, sigma: float = 1.0) -> np.ndarray:
    """n spatially correlated fields on a grid x grid patch grid -> [grid*grid, n]."""
    x = rng.standard_normal((n, grid, grid))
    offsets = (np.arange(grid)[:, None] - np.arange(grid)[None, :]) % grid
    dist = np.minimum(offsets, grid - offsets)
    blur = np.exp(-0.5 * (dist / sigma) ** 2)
    blur /= blur.sum(1, keepdims=True)  # circular Gaussian blur, applied along both grid axes
    return np.einsum("ij,njk,lk->nil", blur, x, blur).reshape(n, grid * grid).T


def realistic_targets(rng: np.random.Generator, L: int, C: int, H: int, k_max: int) -> dict:
    """One view's targets shaped like a ViT's: patch-normalised, spatially correlated features
    (with a couple of outlier patches), their per-channel mean/std, and attention logits
    q.k^T/sqrt(d) of correlated tokens for the cls row plus the top-k_max patches."""
    grid = int(round(math.sqrt(L)))
    assert grid * grid == L
    r = min(16, C)
    y = _smooth(rng, grid, r) @ (rng.standard_normal((r, C)) / np.sqrt(r))
    y = y + 0.5 * rng.standard_normal((L, C)) + 2 * rng.standard_normal(C)
    y = y * np.exp(0.5 * rng.standard_normal(C))
    y[np.ix_(rng.choice(L, 1), rng.choice(C, 2, replace=False))] += 10.0
    mean, var = y.mean(0), y.var(0, ddof=1)
    feats = (y - mean) / np.sqrt(var + 1e-6)
    d = max(C // H, 1)
    tokens = np.concatenate([y.mean(0, keepdims=True), y], 0).astype(np.float32)
    tokens = (tokens - tokens.mean(1, keepdims=True)) / tokens.std(1, keepdims=True)  # layer norm
    # low-rank query/key projections keep this cheap at ViT-B sizes; logits come out ~N(0, 5^2)
    low = tokens @ (rng.standard_normal((C, 32)).astype(np.float32) / np.sqrt(C))
    proj = [rng.standard_normal((32, H * d)).astype(np.float32) * (2.2 / np.sqrt(32))
            for _ in range(2)]
    q = (low @ proj[0]).reshape(L + 1, H, d).transpose(1, 0, 2)
    k = (low @ proj[1]).reshape(L + 1, H, d).transpose(1, 0, 2)
    logits = q @ k.transpose(0, 2, 1) * d ** -0.5
    index = np.argsort(-logits[:, 0, 1:].mean(0))[:k_max]
    rows = np.concatenate([[0], index + 1])
    return {"features": feats.astype(np.float32), "feature_mean": mean.astype(np.float32),
            "feature_std": np.sqrt(var).astype(np.float32),
            "attn_logits": logits[:, rows, 1:].astype(np.float32),
            "attn_index": index.astype(np.int64)}
