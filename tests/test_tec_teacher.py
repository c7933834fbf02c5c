"""Base-model loading: every checkpoint format round-trips, and bad checkpoints fail loudly."""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch
from safetensors.torch import save_file
from tec_helpers import ARCH, BASE_KWARGS, images, tiny_vit

from tec.teacher import CheckpointError, describe_vit, file_sha256, load_base_model


@pytest.fixture(scope="module")
def source():
    """(the tiny ViT whose weights get saved, its encoder state dict, its reference features)."""
    model = tiny_vit(seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.forward_features(images())
    return model, state, ref


def _features(model) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images())


def _decoder_keys(dim: int = 16) -> dict[str, torch.Tensor]:
    return {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, BASE_KWARGS["embed_dim"]),
        "decoder_embed.bias": torch.randn(dim),
        "decoder_pos_embed": torch.randn(1, 17, dim),
        "decoder_blocks.0.norm1.weight": torch.randn(dim),
        "decoder_norm.weight": torch.randn(dim),
        "decoder_pred.weight": torch.randn(8 * 8 * 3, dim),
    }


def _head_keys(prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}head.mlp.0.weight": torch.randn(64, 40),
            f"{prefix}head.last_layer.weight_g": torch.randn(128, 1)}


def _assert_loads_identically(path, ref, **kwargs):
    model = load_base_model(ARCH, path, **kwargs, **BASE_KWARGS)
    torch.testing.assert_close(_features(model), ref, rtol=0, atol=0)
    return model


def test_mae_checkpoint_with_decoder_and_mask_token_loads(tmp_path, source):
    _, state, ref = source
    path = tmp_path / "mae.pth"
    torch.save({"model": {**state, **_decoder_keys()}, "epoch": 799}, path)
    _assert_loads_identically(path, ref)


def test_mae_global_pool_checkpoint_uses_fc_norm_as_final_norm(tmp_path, source):
    _, state, _ = source
    state = dict(state)
    fc_norm = {"fc_norm.weight": state.pop("norm.weight"), "fc_norm.bias": state.pop("norm.bias")}
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": {**state, **fc_norm, "head.weight": torch.randn(10, 40),
                          "head.bias": torch.randn(10)}}, path)
    model = load_base_model(ARCH, path, **BASE_KWARGS)
    torch.testing.assert_close(model.norm.weight, fc_norm["fc_norm.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["backbone.", "module.backbone."])
def test_dino_teacher_checkpoint_with_head_loads(tmp_path, source, prefix):
    _, state, ref = source
    teacher = ({prefix + k: v for k, v in state.items()}
               | _head_keys(prefix.replace("backbone.", "")))
    # the student holds different weights: the teacher must win
    student = {"module.backbone." + k: torch.randn_like(v) for k, v in state.items()}
    path = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, path)
    _assert_loads_identically(path, ref)


def test_dino_student_only_checkpoint_loads(tmp_path, source):
    _, state, ref = source
    student = {"module.backbone." + k: v for k, v in state.items()} | _head_keys("module.")
    path = tmp_path / "dino_student.pth"
    torch.save({"student": student}, path)
    _assert_loads_identically(path, ref)


def test_ibot_state_dict_checkpoint_with_head_and_masked_embed_loads(tmp_path, source):
    _, state, ref = source
    content = dict(state) | _head_keys() | {"masked_embed": torch.randn(40)}
    path = tmp_path / "ibot_teacher.pth"
    torch.save({"state_dict": content}, path)
    _assert_loads_identically(path, ref)


def test_timm_safetensors_loads(tmp_path, source):
    _, state, ref = source
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_loads_identically(path, ref)


def test_timm_pth_with_classifier_head_loads(tmp_path, source):
    _, state, ref = source
    path = tmp_path / "vit.pth"
    torch.save(dict(state) | {"head.weight": torch.randn(10, 40), "head.bias": torch.randn(10)},
               path)
    _assert_loads_identically(path, ref)


def test_loaded_base_model_is_frozen_and_in_eval_mode(tmp_path, source):
    _, state, _ = source
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    model = load_base_model(ARCH, path, **BASE_KWARGS)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.num_classes == 0


def test_missing_encoder_key_is_an_error_naming_checkpoint_and_key(tmp_path, source):
    _, state, _ = source
    state = dict(state)
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_base_model(ARCH, path, **BASE_KWARGS)
    message = str(err.value)
    assert str(path) in message and "blocks.1.mlp.fc1.weight" in message and "missing" in message
    assert "\n" not in message


def test_misshaped_key_is_an_error_naming_checkpoint_and_key(tmp_path, source):
    _, state, _ = source
    state = dict(state)
    state["blocks.0.attn.qkv.weight"] = torch.randn(120, 20)
    path = tmp_path / "misshaped.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_base_model(ARCH, path, **BASE_KWARGS)
    assert str(path) in str(err.value) and "blocks.0.attn.qkv.weight" in str(err.value)


def test_checkpoint_of_a_deeper_model_is_an_error_naming_the_extra_keys(tmp_path, source):
    _, state, _ = source
    path = tmp_path / "deeper.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[blocks\.2\."):
        load_base_model(ARCH, path, **(BASE_KWARGS | {"depth": 2}))


def test_pos_embed_of_another_patch_grid_is_resampled(tmp_path, source):
    _, state, _ = source
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    model = load_base_model(ARCH, path, **(BASE_KWARGS | {"img_size": 48}))
    assert model.pos_embed.shape == (1, 1 + 36, 40)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_pickle_only_checkpoint_needs_allow_pickle_and_says_how(tmp_path, source):
    _, state, ref = source
    path = tmp_path / "mae_full.pth"
    torch.save({"model": dict(state), "args": argparse.Namespace(lr=1.5e-4)}, path)
    with pytest.raises(CheckpointError) as err:
        load_base_model(ARCH, path, **BASE_KWARGS)
    message = str(err.value)
    assert str(path) in message
    assert "base_model.allow_pickle: true" in message and "--allow-pickle" in message
    _assert_loads_identically(path, ref, allow_pickle=True)


def test_unrecognised_layout_and_missing_file_are_user_errors(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_base_model(ARCH, path, **BASE_KWARGS)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_base_model(ARCH, tmp_path / "nope.pth", **BASE_KWARGS)
    with pytest.raises(CheckpointError, match="unknown timm architecture"):
        load_base_model("not_a_model_name", None)


def test_describe_vit_and_file_sha256(tmp_path):
    model = tiny_vit()
    assert describe_vit(model) == dict(img_size=32, patch_size=8, embed_dim=40, depth=3,
                                       num_heads=2, num_patches=16)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"tec" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"tec" * 1000).hexdigest()
