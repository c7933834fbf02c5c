"""Base-model targets checked against straightforward hand computations (loops, plain math)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tec_helpers import images, tiny_vit

from tec.targets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    extract_targets,
    feature_target,
    normalize_images,
)


def _block_inputs_and_outputs(model, x):
    """Run timm's own forward_features and record every block's input and output with hooks."""
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    handles = [b.register_forward_hook(record) for b in model.blocks]
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    return inputs, outputs


@torch.no_grad()
def _hand_logits(block, x):
    """logits[b][h][i][j] = q_i . k_j / sqrt(head width), q/k from norm1 and the qkv weights."""
    attn = block.attn
    H, C = attn.num_heads, x.shape[-1]
    width = C // H
    y = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = y @ attn.qkv.weight.T + attn.qkv.bias  # [B,N,3C]
    q, k = qkv[..., :C], qkv[..., C:2 * C]
    B, N = x.shape[:2]
    out = torch.zeros(B, H, N, N)
    for b in range(B):
        for h in range(H):
            qh = q[b, :, h * width:(h + 1) * width]
            kh = k[b, :, h * width:(h + 1) * width]
            if isinstance(attn.q_norm, torch.nn.LayerNorm):  # qk_norm models normalise per head
                qh = F.layer_norm(qh, (width,), attn.q_norm.weight, attn.q_norm.bias,
                                  attn.q_norm.eps)
                kh = F.layer_norm(kh, (width,), attn.k_norm.weight, attn.k_norm.bias,
                                  attn.k_norm.eps)
            for i in range(N):
                for j in range(N):
                    out[b, h, i, j] = float((qh[i] * kh[j]).sum()) / math.sqrt(width)
    return out


@pytest.mark.parametrize("reg_tokens,qk_norm", [(0, False), (2, False), (0, True)])
def test_attention_target_rows_columns_and_ranking_match_hand_computation(reg_tokens, qk_norm):
    model = tiny_vit(seed=5, reg_tokens=reg_tokens, qk_norm=qk_norm)
    x = images(batch=2, seed=7)
    k_max = 5
    targets = extract_targets(model, x, last_n=2, k_max=k_max)
    inputs, _ = _block_inputs_and_outputs(model, x)
    logits = _hand_logits(model.blocks[-1], inputs[-1])
    prefix = 1 + reg_tokens
    L = 16
    assert targets.attn_logits.shape == (2, 2, k_max + 1, L)
    assert targets.attn_index.dtype == torch.int64
    for b in range(2):
        head_mean = [sum(float(logits[b, h, 0, prefix + j]) for h in range(2)) / 2
                     for j in range(L)]
        ranked = sorted(range(L), key=lambda j: head_mean[j], reverse=True)[:k_max]
        assert targets.attn_index[b].tolist() == ranked
        for h in range(2):
            for r, row in enumerate([0] + [prefix + j for j in ranked]):
                for j in range(L):
                    assert abs(float(targets.attn_logits[b, h, r, j])
                               - float(logits[b, h, row, prefix + j])) < 1e-4


def test_feature_target_is_patch_normalised_mean_of_last_blocks_before_final_norm():
    model = tiny_vit(seed=6, reg_tokens=1)
    x = images(batch=2, seed=8)
    targets = extract_targets(model, x, last_n=2, k_max=3)
    _, outputs = _block_inputs_and_outputs(model, x)
    # patch tokens only (cls + 1 register dropped)
    y = (outputs[-1][:, 2:] + outputs[-2][:, 2:]) / 2
    B, L, C = y.shape
    assert targets.features.shape == (B, L, C)
    for b in range(B):
        for c in range(0, C, 7):
            column = [float(y[b, i, c]) for i in range(L)]
            mean = sum(column) / L
            var = sum((v - mean) ** 2 for v in column) / (L - 1)  # unbiased
            std = math.sqrt(var + 1e-6)
            assert abs(float(targets.feature_mean[b, c]) - mean) < 1e-5
            assert abs(float(targets.feature_std[b, c]) - std) < 1e-5
            for i in range(L):
                assert abs(float(targets.features[b, i, c]) - (column[i] - mean) / std) < 1e-4


def test_last_n_one_uses_only_the_last_block():
    model = tiny_vit(seed=2)
    x = images(batch=1)
    targets = extract_targets(model, x, last_n=1, k_max=2)
    _, outputs = _block_inputs_and_outputs(model, x)
    raw = targets.features * targets.feature_std[:, None] + targets.feature_mean[:, None]
    torch.testing.assert_close(raw, outputs[-1][:, 1:], atol=1e-5, rtol=1e-5)


def test_targets_are_float32_under_autocast_and_close_to_full_precision():
    model = tiny_vit(seed=4)
    x = images(batch=2)
    full = extract_targets(model, x, k_max=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = extract_targets(model, x, k_max=4)
    for name in ("features", "feature_mean", "feature_std", "attn_logits"):
        assert getattr(low, name).dtype == torch.float32
    torch.testing.assert_close(low.feature_mean, full.feature_mean, atol=0.1, rtol=0.1)


def test_invalid_last_n_and_k_max_are_user_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="last_n"):
        extract_targets(model, images(), last_n=4)
    with pytest.raises(ValueError, match="k_max"):
        extract_targets(model, images(), k_max=17)


def test_feature_target_modes():
    torch.manual_seed(0)
    feats, mean, std = torch.randn(2, 5, 6), torch.randn(2, 6), torch.rand(2, 6) + 0.5
    assert torch.equal(feature_target(feats, mean, std, "patch"), feats)
    raw = feature_target(feats, mean, std, "none")
    for b in range(2):
        for i in range(5):
            row = [float(feats[b, i, c]) * float(std[b, c]) + float(mean[b, c]) for c in range(6)]
            for c in range(6):
                assert abs(float(raw[b, i, c]) - row[c]) < 1e-5
            mu = sum(row) / 6
            var = sum((v - mu) ** 2 for v in row) / 5
            channel = feature_target(feats, mean, std, "channel")
            for c in range(6):
                assert abs(float(channel[b, i, c]) - (row[c] - mu) / math.sqrt(var + 1e-6)) < 1e-4
    with pytest.raises(ValueError, match="'pixel'"):
        feature_target(feats, mean, std, "pixel")


def test_normalize_images_matches_imagenet_formula():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize_images(pixels)
    assert out.dtype == torch.float32
    for c in range(3):
        expected = (int(pixels[1, c, 2, 3]) / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert abs(float(out[1, c, 2, 3]) - expected) < 1e-6
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(pixels.float())
