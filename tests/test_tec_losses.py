"""Losses checked against plain-math loops."""

from __future__ import annotations

import math

import pytest
import torch

from tec.losses import attention_loss, feature_loss, pixel_loss


def test_feature_loss_averages_channel_mse_over_masked_patches_only():
    torch.manual_seed(0)
    B, L, C = 2, 5, 3
    pred, target = torch.randn(B, L, C), torch.randn(B, L, C)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(L):
            if mask[b, i]:
                total += sum((float(pred[b, i, c]) - float(target[b, i, c])) ** 2
                             for c in range(C)) / C
                count += 1
    assert abs(float(feature_loss(pred, target, mask)) - total / count) < 1e-6


def test_attention_loss_is_cross_entropy_with_tempered_target_over_columns():
    torch.manual_seed(1)
    B, H, R, L = 2, 3, 4, 6
    pred, target = torch.randn(B, H, R, L) * 2, torch.randn(B, H, R, L) * 3
    tau = 1.8
    total = 0.0
    for b in range(B):
        for h in range(H):
            for r in range(R):
                t = [math.exp(float(target[b, h, r, j]) / tau) for j in range(L)]
                p = [math.exp(float(pred[b, h, r, j])) for j in range(L)]
                total -= sum(t[j] / sum(t) * math.log(p[j] / sum(p)) for j in range(L))
    assert abs(float(attention_loss(pred, target, tau)) - total / (B * H * R)) < 1e-5
    with pytest.raises(ValueError, match="tau"):
        attention_loss(pred, target, 0.0)


def test_pixel_loss_normalises_each_target_patch_like_mae():
    torch.manual_seed(2)
    B, L, D = 1, 3, 4
    pred, target = torch.randn(B, L, D), torch.randn(B, L, D) * 5 + 2
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    total = 0.0
    for i in (0, 2):
        row = [float(v) for v in target[0, i]]
        mu = sum(row) / D
        var = sum((v - mu) ** 2 for v in row) / (D - 1)
        total += sum((float(pred[0, i, d]) - (row[d] - mu) / math.sqrt(var + 1e-6)) ** 2
                     for d in range(D)) / D
    assert abs(float(pixel_loss(pred, target, mask)) - total / 2) < 1e-5


def test_losses_are_float32_under_autocast():
    pred = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    mask = torch.ones(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert feature_loss(pred, pred.float() + 1, mask).dtype == torch.float32
        assert attention_loss(pred[:, None], pred[:, None].float(), 1.0).dtype == torch.float32
