"""Export: timm loads the new model's encoder unchanged; our loader reads it back as a base model."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

from tec.export import (ADAPTER_PREFIX, adapters_path, export_timm, load_adapters,
                        timm_kwargs_for)
from tec.teacher import load_base_model
from tec_helpers import ARCH, images, tiny_new_model


def _trained_a_little(model):
    """One optimiser step so that weights are not at their init values."""
    from tec.model import TargetBatch

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    feats = torch.randn(2, 16, model.cfg.base_embed_dim)
    targets = TargetBatch(features=feats, attn_logits=torch.randn(2, 2, 5, 16),
                          attn_index=torch.arange(4).repeat(2, 1))
    model(images(), targets)["loss"].backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"use_input_adapter": False}])
def test_export_loads_in_timm_with_identical_features(tmp_path, overrides):
    model = _trained_a_little(tiny_new_model(**overrides))
    path = export_timm(model, tmp_path / "new_model.safetensors")
    vit = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            num_classes=0, **timm_kwargs_for(model.cfg)).eval()
    x = images(3)
    with torch.no_grad():
        diff = (vit.forward_features(x) - model.forward_encoder_features(x)).abs().max()
    assert diff <= 1e-5
    # the input adapter is folded into the cls token, the zero cls row kept in pos_embed
    torch.testing.assert_close(vit.cls_token, model.cls_input().detach())
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(48))


def test_timm_kwargs_for_gives_the_encoder_geometry():
    cfg = tiny_new_model().cfg
    assert timm_kwargs_for(cfg) == dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48,
                                        depth=3, num_heads=3, mlp_ratio=4.0)


def test_export_is_a_base_model_for_the_next_round(tmp_path):
    model = _trained_a_little(tiny_new_model())
    path = export_timm(model, tmp_path / "round1.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "tec-export"
    assert json.loads(meta["timm_kwargs"]) == timm_kwargs_for(model.cfg)
    base = load_base_model(ARCH, path)  # geometry comes from the metadata
    with torch.no_grad():
        torch.testing.assert_close(base.forward_features(images()),
                                   model.forward_encoder_features(images()), atol=1e-5, rtol=1e-5)


def test_keep_adapters_writes_them_beside_a_still_timm_loadable_export(tmp_path):
    model = _trained_a_little(tiny_new_model())
    path = export_timm(model, tmp_path / "peft.safetensors", keep_adapters=True)
    side = adapters_path(path)
    assert side.name == "peft.adapters.safetensors" and side.is_file()
    timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                      num_classes=0, **timm_kwargs_for(model.cfg))
    with safe_open(str(side), framework="pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(ADAPTER_PREFIX) for k in keys)
    adapters = load_adapters(path)
    expected = {"cls_token"} | {f"input_adapter.{k}" for k in model.input_adapter.state_dict()} | {
        f"encoder_adapter.{k}" for k in model.encoder_adapter.state_dict()}
    assert set(adapters) == expected
    torch.testing.assert_close(adapters["cls_token"], model.cls_token.detach())
    torch.testing.assert_close(adapters["encoder_adapter.fuse.0.weight"],
                               model.encoder_adapter.fuse[0].weight.detach())


def test_export_path_must_be_safetensors(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        export_timm(tiny_new_model(), tmp_path / "model.pth")
