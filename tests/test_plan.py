"""`tec plan`: samples, bytes per view, FLOPs of both stages, checked against independent counts.

FLOPs against torch.utils.flop_counter on real timm / new-model forward passes (attention on its
explicit path, counted the same by every torch release), bytes per view against the bytes of a
cache written by storage/.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from config_helpers import ALL_CONFIGS, BASE_KWARGS, REPO, config_error, minimal_pipeline
from storage_helpers import write_gaussian_cache

from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.plan import bytes_per_view, make_plan, new_model_forward_flops, vit_forward_flops


def _plan_args(path: Path) -> list[str]:
    args = ["plan", str(path)]
    if load_config(path).data.num_samples is None:
        args += ["--set", "data.num_samples=60000"]  # the shards may not be prepared here
    return args


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_tec_plan_on_shipped_configs(path):
    result = CliRunner().invoke(main, _plan_args(path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in ("samples", "views (K)", "bytes per view", "cache size", "stage 1 compute",
                  "PFLOP", "stage 2 run"):
        assert label in out, out
    cfg = load_config(path)
    assert f"{cfg.targets.views}  ->" in out
    for run in cfg.runs:
        assert repr(run.name) in out


def test_plan_numbers_for_vit_b():
    """ViT-B/16 at 224 px: ~17.6 GMACs = 35.1 GFLOP per forward; the record of the config's
    codec; the planned FLOPs interpolate by the run's online_fraction."""
    cfg = load_config(REPO / "configs" / "imagenet_mae_vitb.yaml")
    plan = make_plan(cfg)
    per_view = plan.stage1_flops / (plan.samples * plan.views)
    assert per_view == pytest.approx(35.13e9, rel=1e-3)
    assert plan.bytes_per_view == bytes_per_view(num_patches=196, channels=768, heads=12,
                                                 k_max=16, codec=cfg.targets.codec,
                                                 codec_params=cfg.targets.codec_params)["stored"]
    assert plan.cache_bytes == plan.samples * plan.views * plan.bytes_per_view
    run = plan.runs[0]
    assert run["flops_online"] - run["flops_cached"] == pytest.approx(
        run["epochs"] * plan.samples * per_view)  # fully online adds one base forward per sample
    f = cfg.runs[0].online_fraction
    assert run["flops_planned"] == pytest.approx(
        run["flops_cached"] + f * (run["flops_online"] - run["flops_cached"]))


def test_plan_online_fraction_interpolates(tmp_path):
    raw = minimal_pipeline(tmp_path)
    raw["runs"][0]["online_fraction"] = 0.25
    run = make_plan(parse_config(raw)).runs[0]
    expected = run["flops_cached"] + 0.25 * (run["flops_online"] - run["flops_cached"])
    assert run["flops_planned"] == pytest.approx(expected)


def test_plan_counts_samples_in_shards(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from image_helpers import make_shards

    shards = make_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    raw = minimal_pipeline(tmp_path)
    del raw["data"]["num_samples"]
    raw["data"]["train"] = str(tmp_path / "shards" / "*.tar")
    plan = make_plan(parse_config(raw))
    assert plan.samples == 6 and "2 shards" in plan.samples_known, (shards, plan.samples_known)


def test_plan_without_shards_says_to_set_num_samples(tmp_path):
    raw = minimal_pipeline(tmp_path)
    del raw["data"]["num_samples"]
    msg = config_error(make_plan, parse_config(raw))
    assert msg.startswith("data.train:") and "data.num_samples" in msg


@pytest.mark.parametrize("change, expected", [
    ({"arch": "vit_nosuch_patch16"}, "base_model.arch: unknown timm architecture"),
    ({"timm_kwargs": {**BASE_KWARGS, "bogus": 1}}, "base_model.timm_kwargs: cannot create"),
])
def test_plan_bad_base_model(change, expected):
    raw = minimal_pipeline()
    raw["base_model"].update(change)
    assert expected in config_error(make_plan, parse_config(raw))


# ----------------------------------------------------------------------------- FLOPs, bytes
def _counted_flops(model, *args) -> float:
    """FLOPs of one forward pass, counted by torch independently of the torch release.

    ``FlopCounterMode``'s count for ``F.scaled_dot_product_attention`` differs between torch
    releases (2.14 counts 0 FLOPs for it on the CPU, 2.15 counts the two matmuls), so every timm
    attention layer is switched to its explicit path (``q @ k^T``, ``attn @ v``): plain matmuls,
    counted the same way by every release. The outputs are the same computation.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    switched = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            switched += 1
    assert switched, "no timm attention layer found: the count would miss attention"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("kwargs", [
    dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
])
def test_vit_flop_formula_matches_flop_counter(kwargs):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", num_classes=0, pretrained=False,
                              **kwargs).eval()
    batch = 2
    counted = _counted_flops(model, torch.randn(batch, 3, kwargs["img_size"], kwargs["img_size"]))
    L = (kwargs["img_size"] // kwargs["patch_size"]) ** 2
    estimate = vit_forward_flops(tokens=L + 1, width=kwargs["embed_dim"], depth=kwargs["depth"],
                                 mlp_ratio=kwargs.get("mlp_ratio", 4.0))
    estimate += 2 * L * 3 * kwargs["patch_size"] ** 2 * kwargs["embed_dim"]
    assert estimate == pytest.approx(counted / batch, rel=0.02)


def test_plan_stage1_flops_match_flop_counter():
    import torch

    from tec.teacher import load_base_model

    cfg = parse_config(minimal_pipeline())
    plan = make_plan(cfg)
    model = load_base_model("vit_base_patch16_224", None, **BASE_KWARGS)
    counted = _counted_flops(model, torch.randn(1, 3, 32, 32))
    assert plan.stage1_flops / (plan.samples * plan.views) == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("overrides", [
    {},
    {"use_attention": False},
    {"target": "pixel"},
    {"use_encoder_adapter": False, "use_input_adapter": False, "depth": 2, "mask_ratio": 0.5},
    {"attn_proj_dim": 24, "decoder_depth": 2},
])
def test_new_model_flops_match_flop_counter(overrides):
    import torch

    from tec.model import NewModel, NewModelConfig, TargetBatch

    values = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                  base_embed_dim=40, base_num_heads=2, k=4)
    values.update(overrides)
    cfg = NewModelConfig(**values)
    torch.manual_seed(0)
    model = NewModel(cfg)
    B, L = 4, cfg.num_patches
    targets = None
    if cfg.target == "tec":
        targets = TargetBatch(
            features=torch.randn(B, L, 40), attn_logits=torch.randn(B, 2, cfg.k + 1, L),
            attn_index=torch.stack([torch.randperm(L)[: cfg.k] for _ in range(B)]))
    counted = _counted_flops(model, torch.randn(B, 3, 32, 32), targets)
    assert new_model_forward_flops(cfg) == pytest.approx(counted / B, rel=0.03)


def test_plan_run_flops_are_three_forward_passes():
    from stages.resolve import BaseGeometry, build_model_config

    cfg = parse_config(minimal_pipeline())
    plan = make_plan(cfg)
    for run, row in zip(cfg.runs, plan.runs):
        m = build_model_config(run.model, BaseGeometry(img_size=32, patch_size=8, embed_dim=40,
                                                       num_heads=2))
        assert row["flops_cached"] == pytest.approx(
            run.epochs * plan.samples * 3 * new_model_forward_flops(m))


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_bytes_per_view_matches_a_written_cache(tmp_path, codec):
    storage = pytest.importorskip("storage")
    L, C, H, k_max, K, n = 64, 96, 3, 16, 2, 32
    spec = storage.CacheSpec(num_patches=L, channels=C, heads=H, k_max=k_max, views=K,
                             codec=codec, backend="zarr", compression="none")
    planned = bytes_per_view(num_patches=L, channels=C, heads=H, k_max=k_max, codec=codec)
    # the stored tensors of one record, as storage defines them
    assert planned["stored"] == pytest.approx(storage.record_nbytes(spec), rel=0.005)
    assert planned["raw"] == storage.decoded_nbytes(spec)

    write_gaussian_cache(tmp_path / "cache", spec, n)
    on_disk = storage.inspect_cache(tmp_path / "cache")["bytes_per_view"]
    # uncompressed: the plan's tensor bytes plus a little framing (index, keys, labels)
    assert planned["stored"] <= on_disk <= 1.10 * planned["stored"]
