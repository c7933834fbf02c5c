"""Export: timm loads the new model's encoder unchanged; our loader reads it back as a base
model."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from tec_helpers import ARCH, images, tiny_new_model

from tec.export import ADAPTER_PREFIX, adapters_path, export_timm, load_adapters, timm_kwargs_for
from tec.teacher import load_base_model


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


# ---- timm's pretrained-folder layout (config.json + model.safetensors) -------------------------


def test_local_dir_folder_builds_the_geometry_and_gives_identical_features(tmp_path):
    from tec.export import export_timm_folder

    model = _trained_a_little(tiny_new_model())
    folder = export_timm_folder(model, tmp_path / "tec_tiny")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # no other arguments
    assert (vit.patch_embed.img_size, vit.patch_embed.patch_size) == ((32, 32), (8, 8))
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (48, 3, 3)
    assert vit.num_classes == 0
    x = images(3)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.forward_encoder_features(x))
    # fine-tuning: a new head, the encoder still loaded
    clf = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=7)
    assert clf.head.out_features == 7
    torch.testing.assert_close(clf.cls_token, vit.cls_token, rtol=0, atol=0)


def test_folder_config_is_what_timm_save_for_hf_writes_for_the_same_model(tmp_path):
    from timm.models import save_for_hf

    from tec.export import export_timm_folder
    from tec.targets import IMAGENET_MEAN, IMAGENET_STD

    model = _trained_a_little(tiny_new_model(use_input_adapter=False))
    ours = json.loads((export_timm_folder(model, tmp_path / "ours") / "config.json").read_text())
    vit = timm.create_model(ARCH, num_classes=0, **timm_kwargs_for(model.cfg))
    save_for_hf(vit, tmp_path / "timm", safe_serialization=True,
                data_config=dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"))
    theirs = json.loads((tmp_path / "timm" / "config.json").read_text())
    # the same document, less the tag and licence of vit_base_patch16_224's default weights
    for key in ("tag", "license"):
        theirs["pretrained_cfg"].pop(key, None)
    assert json.loads(json.dumps(ours)) == json.loads(json.dumps(theirs))
    assert ours["pretrained_cfg"]["mean"] == list(IMAGENET_MEAN)


def test_folder_weights_are_the_single_file_export_and_a_base_model(tmp_path):
    from tec.export import export_timm_folder

    model = _trained_a_little(tiny_new_model())
    folder = export_timm_folder(model, tmp_path / "f", keep_adapters=True)
    assert (folder / "model.adapters.safetensors").is_file()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "tec-export"
    base = load_base_model(ARCH, folder / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(base.forward_features(images()),
                                   model.forward_encoder_features(images()), atol=1e-5, rtol=1e-5)


def test_folder_export_refuses_a_file_path(tmp_path):
    from tec.export import export_timm_folder

    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        export_timm_folder(tiny_new_model(), tmp_path / "taken")
    with pytest.raises(ValueError, match="folder"):
        export_timm_folder(tiny_new_model(), tmp_path / "m.safetensors")


def test_folder_on_the_hub_loads_with_hf_hub_name_offline(tmp_path, monkeypatch):
    from hub_helpers import offline_hub, populate_hub_cache

    from tec.export import export_timm_folder

    model = _trained_a_little(tiny_new_model())
    folder = export_timm_folder(model, tmp_path / "tec_tiny", name="me/tec_tiny")
    assert "hf-hub:me/tec_tiny" in (folder / "README.md").read_text()
    cache = offline_hub(monkeypatch, tmp_path / "hf")
    populate_hub_cache(cache, "me/tec_tiny", {p.name: p for p in folder.iterdir()})
    vit = timm.create_model("hf-hub:me/tec_tiny", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(vit.forward_features(images()), model.forward_encoder_features(images()))
