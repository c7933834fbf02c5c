"""The new model: formulas against hand computations, gradients, ablation switches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tec_helpers import images, tiny_config, tiny_new_model, tiny_vit

from tec.model import (
    EncoderAdapter,
    NewModel,
    NewModelConfig,
    TargetBatch,
    get_2d_sincos_pos_embed,
    patchify,
    random_masking,
)
from tec.targets import extract_targets


def _targets(batch: int = 2, k_max: int = 6) -> TargetBatch:
    t = extract_targets(tiny_vit(seed=11), images(batch), k_max=k_max)
    return TargetBatch(features=t.features, attn_logits=t.attn_logits, attn_index=t.attn_index)


def _hand_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # LayerNorm uses the biased variance
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _hand_mlp(x, mlp):
    return F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias


# ---- position embedding ----------------------------------------------------------------------


def _mae_numpy_2d_sincos(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py, transcribed (w goes first in the meshgrid)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                                np.arange(grid_size, dtype=np.float32)), axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_pos_embed_matches_mae_formula():
    D, g = 16, 3
    ours = get_2d_sincos_pos_embed(D, g, cls_token=True)
    np.testing.assert_allclose(ours.numpy(), _mae_numpy_2d_sincos(D, g), atol=1e-6)
    quarter = D // 4
    for i in range(g):
        for j in range(g):
            row = ours[1 + i * g + j]
            for c in range(D):
                coord = j if c < D // 2 else i  # first half: column, second half: row
                f = c % quarter
                angle = coord / 10000 ** (f / quarter)
                expected = math.sin(angle) if (c % (D // 2)) < quarter else math.cos(angle)
                assert abs(float(row[c]) - expected) < 1e-6
    assert torch.equal(ours[0], torch.zeros(D))
    model = tiny_new_model()
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(48, 4, cls_token=True))
    assert "pos_embed" not in dict(model.named_parameters())


# ---- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.6])
def test_random_masking_keeps_the_lowest_noise_patches(ratio):
    B, L, D = 3, 16, 5
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    visible, mask, ids_restore = random_masking(x, ratio, noise)
    keep = int(L * (1 - ratio))
    assert visible.shape == (B, keep, D)
    for b in range(B):
        order = sorted(range(L), key=lambda i: float(noise[b, i]))
        kept = order[:keep]
        assert [int(v) for v in mask[b]] == [0 if i in kept else 1 for i in range(L)]
        for r, i in enumerate(kept):
            assert torch.equal(visible[b, r], x[b, i])
        # ids_restore puts [visible..., masked...] back into patch order
        for i in range(L):
            slot = int(ids_restore[b, i])
            assert (slot < keep) == (i in kept)
            if slot < keep:
                assert kept[slot] == i


# ---- encoder adapter and input adapter -------------------------------------------------------


def test_encoder_adapter_groups_three_consecutive_blocks():
    torch.manual_seed(0)
    D, depth, hidden = 8, 6, 12
    adapter = EncoderAdapter(D, depth, group=3, hidden_dim=hidden)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    outs = [torch.randn(2, 5, D) for _ in range(depth)]
    concat = torch.cat(outs, dim=-1)
    normed = _hand_layer_norm(concat, adapter.norm_in.weight, adapter.norm_in.bias)
    total = torch.zeros(2, 5, D)
    for g in range(depth // 3):
        chunk = normed[..., g * 3 * D:(g + 1) * 3 * D]  # blocks 3g, 3g+1, 3g+2
        z = chunk @ adapter.fuse[g].weight.T + adapter.fuse[g].bias
        total = total + z + _hand_mlp(z, adapter.mlp[g])
    expected = _hand_layer_norm(total, adapter.norm_out.weight, adapter.norm_out.bias)
    with torch.no_grad():
        torch.testing.assert_close(adapter(outs), expected, atol=1e-5, rtol=1e-5)
    assert adapter.mlp[0].fc1.weight.shape == (hidden, D)


def test_encoder_feeds_every_block_output_to_the_adapter_last_after_final_norm():
    model = tiny_new_model(depth=6).eval()
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, out: captured.append(out) and None)
             for b in model.blocks]
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(images(), noise)
        captured[-1] = model.norm(captured[-1])
        expected = model.encoder_adapter(captured)
    for h in hooks:
        h.remove()
    assert len(captured) == 6
    torch.testing.assert_close(latent, expected)


def test_input_adapter_is_an_mlp_on_the_cls_parameter():
    model = tiny_new_model()
    expected = _hand_mlp(model.cls_token, model.input_adapter)
    torch.testing.assert_close(model.cls_input(), expected)
    assert model.input_adapter.fc1.weight.shape == (4 * 48, 48)


# ---- decoder ---------------------------------------------------------------------------------


def test_decoder_streams_have_their_own_mask_tokens_and_share_the_trunk():
    model = tiny_new_model().eval()
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(images(), noise)
        preds = model.forward_decoder(latent, ids_restore)
        for name, stream in model.decoder_streams.items():
            tokens = stream.tokens(latent, ids_restore)
            projected = latent @ stream.embed.weight.T + stream.embed.bias
            torch.testing.assert_close(tokens[:, 0], projected[:, 0])
            for b in range(2):
                visible = [i for i in range(16) if mask[b, i] == 0]
                visible.sort(key=lambda i: float(noise[b, i]))
                for i in range(16):
                    if mask[b, i]:
                        assert torch.equal(tokens[b, 1 + i], stream.mask_token[0, 0])
                    else:
                        torch.testing.assert_close(tokens[b, 1 + i],
                                                   projected[b, 1 + visible.index(i)])
            x = tokens + model.decoder_pos_embed
            for block in model.decoder_blocks:  # this stream alone through the shared trunk
                x = block(x)
            torch.testing.assert_close(preds[name], stream.predict(x), atol=1e-5, rtol=1e-5)
    assert set(preds) == {"feature", "attention"}
    assert preds["feature"].shape == (2, 17, 40)
    assert preds["attention"].shape == (2, 17, 2 * 48)


def test_attention_logits_match_hand_computation():
    model = tiny_new_model(attn_proj_dim=8)  # P=8, H=2 heads of width 4
    B, N, P, H = 2, 17, 8, 2
    qk = torch.randn(B, N, 2 * P)
    index = torch.tensor([[3, 0, 15], [7, 7, 1]])
    logits = model.attention_logits(qk, index)
    assert logits.shape == (B, H, 4, 16)
    for b in range(B):
        rows = [0] + [int(i) + 1 for i in index[b]]
        for h in range(H):
            for r, row in enumerate(rows):
                for j in range(16):
                    q = qk[b, row, h * 4:(h + 1) * 4]
                    k = qk[b, 1 + j, P + h * 4:P + (h + 1) * 4]
                    expected = float((q * k).sum()) / math.sqrt(P)  # P^-0.5, not head width
                    assert abs(float(logits[b, h, r, j]) - expected) < 1e-5


# ---- full model: losses, gradients, ablations ------------------------------------------------


def test_tec_forward_returns_weighted_sum_of_both_terms():
    model = tiny_new_model(feature_weight=0.5, attention_weight=2.0)
    out = model(images(), _targets(), noise=torch.rand(2, 16))
    assert set(out) == {"loss", "loss_feature", "loss_attention"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], 0.5 * out["loss_feature"] + 2.0 * out["loss_attention"])


def test_feature_loss_ignores_visible_patches():
    model = tiny_new_model(use_attention=False)
    targets = _targets()
    noise = torch.rand(2, 16)
    _, mask, _ = random_masking(torch.zeros(2, 16, 1), 0.75, noise)
    changed = TargetBatch(features=targets.features + 100 * (1 - mask)[..., None])
    a = model(images(), targets, noise=noise)["loss"]
    b = model(images(), changed, noise=noise)["loss"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("overrides", [{}, {"target": "pixel"}, {"depth": 6}])
def test_gradient_reaches_every_trainable_parameter(overrides):
    model = tiny_new_model(**overrides)
    targets = None if overrides.get("target") == "pixel" else _targets()
    model(images(), targets)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def _param_names(model):
    return {n for n, _ in model.named_parameters()}


def test_attention_switch_removes_its_stream_and_loss_term():
    full, ablated = tiny_new_model(), tiny_new_model(use_attention=False)
    removed = _param_names(full) - _param_names(ablated)
    assert removed and all(n.startswith("decoder_streams.attention.") for n in removed)
    assert not _param_names(ablated) - _param_names(full)
    D, Dd, P = 48, 32, 48
    expected = (D * Dd + Dd) + Dd + 2 * Dd + (Dd * 2 * P + 2 * P)  # embed, mask token, norm, head
    assert sum(p.numel() for p in full.parameters()) - sum(
        p.numel() for p in ablated.parameters()) == expected
    out = ablated(images(), TargetBatch(features=_targets().features))
    assert set(out) == {"loss", "loss_feature"}
    torch.testing.assert_close(out["loss"], out["loss_feature"])


def test_input_adapter_switch_uses_the_cls_parameter_directly():
    model = tiny_new_model(use_input_adapter=False)
    assert not any("input_adapter" in n for n in _param_names(model))
    assert torch.equal(model.cls_input(), model.cls_token)
    assert set(model(images(), _targets())) == {"loss", "loss_feature", "loss_attention"}


def test_encoder_adapter_switch_feeds_the_final_norm_output_to_the_decoder():
    model = tiny_new_model(use_encoder_adapter=False, depth=4).eval()
    assert not any("encoder_adapter" in n for n in _param_names(model))
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(images(), noise)
        x = model.patch_embed(images()) + model.pos_embed[:, 1:]
        visible, _, _ = random_masking(x, 0.75, noise)
        x = torch.cat([model.cls_input().expand(2, -1, -1), visible], dim=1)
        for block in model.blocks:
            x = block(x)
        torch.testing.assert_close(latent, model.norm(x))


def test_pixel_mode_has_a_single_stream_and_a_pixel_loss():
    model = tiny_new_model(target="pixel", use_input_adapter=False, use_encoder_adapter=False)
    assert set(model.decoder_streams) == {"pixel"}
    assert model.decoder_streams["pixel"].head.out_features == 8 * 8 * 3
    out = model(images())
    assert set(out) == {"loss", "loss_pixel"}


def test_patchify_orders_patches_row_major_and_pixels_row_col_channel():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)  # 2 x 3 grid of 4x4 patches
    assert patches.shape == (2, 6, 4 * 4 * 3)
    for i in range(2):
        for j in range(3):
            for p in range(4):
                for q in range(4):
                    for c in range(3):
                        assert (patches[1, i * 3 + j, (p * 4 + q) * 3 + c]
                                == x[1, c, i * 4 + p, j * 4 + q])


def test_depth_not_a_multiple_of_three_with_encoder_adapter_is_a_clear_error():
    with pytest.raises(ValueError, match=r"depth=4.*multiple of adapter_group=3"):
        NewModel(tiny_config(depth=4))
    tiny_config(depth=4, use_encoder_adapter=False).validate()


def test_config_validation_and_round_trip():
    cfg = tiny_config()
    assert NewModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown new-model config keys"):
        NewModelConfig.from_dict({"embed_dims": 3})
    with pytest.raises(ValueError, match="target"):
        tiny_config(target="features").validate()
    with pytest.raises(ValueError, match="k=17"):
        tiny_config(k=17).validate()
    with pytest.raises(ValueError, match="attn_proj_dim"):
        tiny_config(attn_proj_dim=7).validate()


def test_tec_model_without_or_with_short_targets_is_an_error():
    model = tiny_new_model()
    with pytest.raises(ValueError, match="targets"):
        model(images())
    t = _targets(k_max=2)  # fewer rows than k=4
    with pytest.raises(ValueError, match="k=4"):
        model(images(), t)
