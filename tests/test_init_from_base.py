"""init_from_base (paper Tab. 6(d)): the new model's encoder can start from the base model."""
from __future__ import annotations

import pytest
import torch
from tec_helpers import tiny_new_model, tiny_vit
from train_helpers import Source, build_cache, make_data, run_config, save_base_model

from stages.checkpoint import load_checkpoint
from stages.train import TrainSetupError, train
from tec.model import init_from_base_model


def test_encoder_weights_are_copied_and_the_rest_is_left_alone():
    base = tiny_vit(seed=1)  # width 40, depth 3, 2 heads
    model = tiny_new_model(embed_dim=40, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pos_embed = model.pos_embed.clone()
    keys = init_from_base_model(model, base)
    state, source = model.state_dict(), base.state_dict()
    assert "blocks.2.mlp.fc2.weight" in keys and "cls_token" in keys and "norm.bias" in keys
    for key in keys:
        assert torch.equal(state[key], source[key]), key
    for key in ("decoder_blocks.0.attn.qkv.weight", "encoder_adapter.fuse.0.weight",
                "input_adapter.fc1.weight"):
        assert torch.equal(state[key], before[key]), key  # adapters and decoder untouched
    assert torch.equal(model.pos_embed, pos_embed)  # the fixed sin-cos stays


def test_another_geometry_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"cls_token is \(1, 1, 40\) in the base model and "
                                         r"\(1, 1, 48\) in the new model"):
        init_from_base_model(tiny_new_model(), tiny_vit(seed=1))
    with pytest.raises(ValueError, match="more blocks"):
        init_from_base_model(tiny_new_model(embed_dim=40, num_heads=2, depth=3),
                             tiny_vit(seed=1, depth=6))


def test_training_run_with_init_from_base_starts_at_the_base_weights(tmp_path):
    shards = make_data(tmp_path, n_shards=1, per_shard=8)
    base = save_base_model(tmp_path / "base.safetensors")  # width 48, depth 2, 3 heads
    cache = build_cache(tmp_path / "cache", shards, base)
    source = Source(str(tmp_path / "shards"))
    model = dict(depth=2, use_encoder_adapter=False)
    # one step at the warm-up's lr 0: AdamW leaves the weights where they started
    run = run_config(epochs=1, max_steps=1, warmup_epochs=1.0, init_from_base=True, model=model)
    train(run, cache=cache, source=source, base=base, out_dir=tmp_path / "a", progress=False)
    state = load_checkpoint(tmp_path / "a")["model"]
    reference = base.load().state_dict()
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.weight",
                "cls_token"):
        assert torch.equal(state[key], reference[key]), key

    plain = run_config(epochs=1, max_steps=1, warmup_epochs=1.0, model=model)
    train(plain, cache=cache, source=source, base=base, out_dir=tmp_path / "b", progress=False)
    random_start = load_checkpoint(tmp_path / "b")["model"]
    assert not torch.equal(random_start["blocks.1.attn.qkv.weight"],
                           reference["blocks.1.attn.qkv.weight"])

    wrong = run_config(epochs=1, max_steps=1, init_from_base=True, name="wrong",
                       model=dict(depth=3))
    with pytest.raises(TrainSetupError, match="run wrong: init_from_base: the base model has "
                                              "no 'blocks.2"):
        train(wrong, cache=cache, source=source, base=base, out_dir=tmp_path / "c",
              progress=False)
