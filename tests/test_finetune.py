"""End-to-end fine-tuning (stages.finetune): timm's recipe really applied, exact resume, CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from image_helpers import make_shards
from safetensors.torch import save_file
from tec_helpers import ARCH, BASE_KWARGS, tiny_vit

from stages.configs import ConfigError, from_dict
from stages.finetune import (
    FinetuneConfig,
    Finetuner,
    FinetuneSetupError,
    build_finetune_model,
    finetune,
)
from stages.train import DistEnv


def tiny_cfg(**overrides) -> FinetuneConfig:
    values = dict(epochs=2, batch_size=8, blr=1e-3, min_lr=1e-6, warmup_epochs=0.5,
                  layer_decay=0.5, drop_path=0.1, num_workers=0, eval_crop_pct=1.0,
                  log_every=1, eval_batch_size=16)
    values.update(overrides)
    cfg = FinetuneConfig(**values)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    train = make_shards(root / "train", n_shards=2, per_shard=12, size_range=(32, 40), seed=3,
                        num_classes=3)
    test = make_shards(root / "test", n_shards=1, per_shard=10, size_range=(32, 40), seed=4,
                       num_classes=3)
    ckpt = root / "base.safetensors"
    save_file(tiny_vit(seed=5).state_dict(), str(ckpt))
    return {"root": root, "train": train, "test": test, "ckpt": ckpt}


def run(data, out, cfg):
    return finetune(cfg, model_path=data["ckpt"], train_shards=data["train"],
                    test_shards=data["test"], out_dir=out, arch=ARCH,
                    timm_kwargs=dict(BASE_KWARGS), progress=False)


def final_state(out) -> dict:
    from stages.checkpoint import load_checkpoint

    return load_checkpoint(out)["model"]


def test_resumed_finetuning_equals_an_uninterrupted_run(data, tmp_path):
    cfg = tiny_cfg()
    full = run(data, tmp_path / "full", cfg)
    assert full.steps == full.total_steps == 6  # 24 images / batch 8 x 2 epochs
    assert full.top1 is not None and full.test_samples == 10
    assert (json.loads((tmp_path / "full" / "result.json").read_text())["summary"]["top1"]
            == full.top1)

    part = run(data, tmp_path / "split", dataclasses.replace(cfg, max_steps=4))
    assert part.steps == 4
    rest = run(data, tmp_path / "split", cfg)
    assert rest.resumed_from_step == 4 and rest.steps == 6
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert rest.top1 == full.top1
    # the weights moved away from the pretrained ones
    start = tiny_vit(seed=5).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_resume_refuses_a_checkpoint_of_other_settings_or_another_model(data, tmp_path):
    cfg = tiny_cfg(max_steps=1)
    run(data, tmp_path / "ft", cfg)
    with pytest.raises(FinetuneSetupError, match="other fine-tuning settings"):
        run(data, tmp_path / "ft", dataclasses.replace(cfg, layer_decay=0.9))
    other = tmp_path / "other.safetensors"
    save_file(tiny_vit(seed=6).state_dict(), str(other))
    with pytest.raises(FinetuneSetupError, match="different pretrained file"):
        finetune(cfg, model_path=other, train_shards=data["train"], test_shards=data["test"],
                 out_dir=tmp_path / "ft", arch=ARCH, timm_kwargs=dict(BASE_KWARGS),
                 progress=False)


def test_pretrained_encoder_is_loaded_with_a_fresh_pooled_head(data):
    model, kwargs = build_finetune_model(data["ckpt"], arch=ARCH, num_classes=3, cfg=tiny_cfg(),
                                         timm_kwargs=dict(BASE_KWARGS))
    source = tiny_vit(seed=5).state_dict()
    state = model.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.2.mlp.fc2.weight", "cls_token", "pos_embed"):
        assert torch.equal(state[key], source[key]), key
    assert model.global_pool == "avg" and "norm.weight" not in state  # fc_norm after the pool
    assert torch.equal(state["fc_norm.weight"], torch.ones(BASE_KWARGS["embed_dim"]))
    assert state["head.weight"].shape == (3, BASE_KWARGS["embed_dim"])
    assert 0 < state["head.weight"].std() < 1e-4  # MAE's trunc_normal(2e-5) head
    assert model.blocks[2].drop_path1.drop_prob == pytest.approx(0.1)  # drop path really on
    assert kwargs["drop_path_rate"] == 0.1


def test_wrong_geometry_is_a_one_line_error(data):
    with pytest.raises(ValueError, match="embed_dim|shape|kwargs"):
        build_finetune_model(data["ckpt"], arch=ARCH, num_classes=3, cfg=tiny_cfg(),
                             timm_kwargs=dict(BASE_KWARGS, embed_dim=64, num_heads=2))


def make_runner(data, tmp_path, cfg) -> Finetuner:
    from stages.finetune import _open_split

    train = _open_split(data["train"], tmp_path, None, "--train", write=True)
    test = _open_split(data["test"], tmp_path, None, "--test", write=True)
    return Finetuner(cfg, model_path=data["ckpt"], arch=ARCH, train_index=train,
                     test_index=test, out_dir=tmp_path, dist=DistEnv(),
                     timm_kwargs=dict(BASE_KWARGS), progress=False)


def test_layer_decay_scales_each_blocks_lr_and_schedule_warms_up_then_decays(data, tmp_path):
    cfg = tiny_cfg(layer_decay=0.5, epochs=4, warmup_epochs=1)
    runner = make_runner(data, tmp_path, cfg)
    depth = BASE_KWARGS["depth"]
    names = {id(p): n for n, p in runner.model.named_parameters()}

    def lr_of(name: str) -> float:
        for group in runner.optimizer.param_groups:
            if any(names[id(p)] == name for p in group["params"]):
                return group["lr"], group["weight_decay"]
        raise KeyError(name)

    peak = cfg.blr * cfg.batch_size / 256
    runner.global_step = runner.steps_per_epoch  # end of warm-up: the peak lr
    runner.lr_update()
    assert lr_of("head.weight") == (pytest.approx(peak), 0.05)
    assert lr_of("blocks.2.mlp.fc1.weight")[0] == pytest.approx(peak * 0.5)
    assert lr_of("blocks.0.mlp.fc1.weight")[0] == pytest.approx(peak * 0.5 ** depth)
    assert lr_of("patch_embed.proj.weight")[0] == pytest.approx(peak * 0.5 ** (depth + 1))
    assert lr_of("blocks.0.norm1.weight")[1] == 0.0  # no weight decay on 1-D parameters
    assert lr_of("pos_embed")[1] == 0.0 and lr_of("cls_token")[1] == 0.0
    runner.global_step = 0
    assert runner.lr_update() == 0.0  # warm-up starts at 0, as MAE's
    runner.global_step = 1  # linear warm-up over the first epoch's steps
    assert runner.lr_update() == pytest.approx(peak / runner.steps_per_epoch)
    runner.global_step = runner.total_steps
    assert runner.lr_update() == pytest.approx(cfg.min_lr)


def test_mixup_cutmix_and_label_smoothing_reach_the_loss(data, tmp_path):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    runner = make_runner(data, tmp_path, tiny_cfg(mixup=0.8, cutmix=1.0, smoothing=0.1))
    assert isinstance(runner.criterion, SoftTargetCrossEntropy)
    seen = []
    criterion = runner.criterion

    def recording(logits, target):
        seen.append(target.detach().clone())
        return criterion(logits, target)

    runner.criterion = recording
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    runner.train_step([(images, labels)])
    (target,) = seen
    assert target.shape == (8, 3)
    assert torch.allclose(target.sum(dim=1), torch.ones(8))
    assert target.max() < 1.0 - 0.1 / 3 + 1e-6  # smoothed, and mixed with another sample
    mixed = (target > 0.1 / 3 + 1e-6).sum(dim=1)
    assert (mixed >= 2).any()  # two classes share the target: mixup / cutmix happened

    plain = make_runner(data, tmp_path / "plain", tiny_cfg(mixup=0.0, cutmix=0.0, smoothing=0.1))
    assert plain.mixup is None and isinstance(plain.criterion, LabelSmoothingCrossEntropy)


def test_training_augmentation_is_randaugment_and_a_function_of_epoch_and_sample(data, tmp_path):
    from stages.data import PlanItem

    runner = make_runner(data, tmp_path, tiny_cfg())
    names = repr(runner.train_set.transform)
    assert "RandAugment" in names and "RandomErasing" in names
    ds = runner.train_set
    a = ds[PlanItem(0, 3, 0, True)][0]
    torch.manual_seed(123)  # the caller's RNG state must not matter, nor be changed
    state = torch.get_rng_state()
    b = ds[PlanItem(0, 3, 0, True)][0]
    assert torch.equal(torch.get_rng_state(), state)
    c = ds[PlanItem(1, 3, 0, True)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 32, 32)


def test_finetune_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="eval.finetune.layer_decay"):
        from_dict(FinetuneConfig, {"layer_decay": 1.5}, "eval.finetune")
    with pytest.raises(ConfigError, match="unknown key eval.finetune.lr_decay"):
        from_dict(FinetuneConfig, {"lr_decay": 0.5}, "eval.finetune")
    with pytest.raises(ConfigError, match="even"):
        from_dict(FinetuneConfig, {"batch_size": 9}, "eval.finetune")
    paper = FinetuneConfig()
    assert (paper.blr, paper.batch_size, paper.betas, paper.mixup, paper.cutmix,
            paper.smoothing, paper.drop_path) == (1e-3, 1024, (0.9, 0.999), 0.8, 1.0, 0.1, 0.1)


def test_unlabelled_data_is_refused(tmp_path, data):
    import numpy as np
    from image_helpers import encode, smooth_image, write_tar

    rng = np.random.default_rng(0)
    shard = tmp_path / "nolabels-000000.tar"
    write_tar(shard, [(f"k{i}.png", encode(smooth_image(rng, 32, 32), "PNG")) for i in range(8)])
    with pytest.raises(FinetuneSetupError, match="no class label"):
        finetune(tiny_cfg(), model_path=data["ckpt"], train_shards=str(shard),
                 test_shards=data["test"], out_dir=tmp_path / "o", arch=ARCH,
                 timm_kwargs=dict(BASE_KWARGS), progress=False)


def test_cli_eval_finetune_prints_top1_and_rejects_a_missing_model(data, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    runner = CliRunner()
    args = ["eval", "finetune", str(data["ckpt"]), "--train", data["train"][0], "--test",
            data["test"][0], "--arch", ARCH, "--timm-kwargs", json.dumps(BASE_KWARGS),
            "--out", str(tmp_path / "cli"), "--set", "epochs=1", "--set", "batch_size=4",
            "--set", "warmup_epochs=0", "--set", "num_workers=0", "--set", "eval_crop_pct=1.0"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output and "3/3 steps" in result.output
    bad = runner.invoke(main, ["eval", "finetune", str(tmp_path / "missing.safetensors"),
                               "--train", data["train"][0], "--test", data["test"][0]])
    assert bad.exit_code == 2 and "model file not found" in bad.output
    bad = runner.invoke(main, args[:-2] + ["--set", "layer_decay=2"])
    assert bad.exit_code == 2 and "layer_decay" in bad.output


def test_tec_run_finetune_column_fine_tunes_every_model_and_reuses_finished_runs(data, tmp_path):
    from pipeline.config import parse_config
    from pipeline.orchestrate import PipelineSummary, finetune_rows
    from stages.evaluate import format_table

    raw = {
        "workdir": str(tmp_path / "work"),
        "data": {"train": "::".join(data["train"]), "test": data["test"][0]},
        "base_model": {"arch": ARCH, "checkpoint": str(data["ckpt"]),
                       "timm_kwargs": dict(BASE_KWARGS)},
        "targets": {"views": 1},
        "eval": {"device": "cpu", "finetune": {
            "enabled": True, "epochs": 1, "batch_size": 8, "warmup_epochs": 0,
            "num_workers": 0, "eval_crop_pct": 1.0}},
    }
    cfg = parse_config(raw)
    assert cfg.eval.finetune.enabled and cfg.eval.finetune.batch_size == 8
    other = tmp_path / "other.safetensors"
    save_file(tiny_vit(seed=7).state_dict(), str(other))
    models = {"base": data["ckpt"], "tec": other}
    rows = [{"model": "base", "knn_cls": 50.0}, {"model": "tec", "knn_cls": 60.0}]
    summary = PipelineSummary()
    finetune_rows(cfg, models, rows, summary)
    assert all(0.0 <= r["finetune_top1"] <= 100.0 for r in rows)
    assert rows[0]["finetune_dir"] != rows[1]["finetune_dir"]
    table = format_table(rows)
    assert "fine-tune" in table.splitlines()[0]
    assert f"{rows[1]['finetune_top1']:.2f}" in table.splitlines()[-1]
    assert "fine-tune" not in format_table([{"model": "x", "knn_cls": 1.0}])

    again = [{"model": "base"}, {"model": "tec"}]
    finetune_rows(cfg, models, again, PipelineSummary())
    assert [r["finetune_top1"] for r in again] == [r["finetune_top1"] for r in rows]
    from stages.checkpoint import load_checkpoint

    assert load_checkpoint(rows[0]["finetune_dir"])["step"] == 3  # finished: nothing retrained


@pytest.mark.parametrize("stem,layer_decay,epochs,warmup,min_lr", [
    ("imagenet_mae_vitb", 0.55, 100, 20, 1e-6),
    ("imagenet_ibot_vitb", 0.65, 100, 20, 1e-6),
    ("imagenet_mae_vitl", 0.65, 50, 5, 1e-5),
])
def test_imagenet_configs_fine_tune_with_the_papers_tab10_settings(stem, layer_decay, epochs,
                                                                   warmup, min_lr):
    from pathlib import Path

    from pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{stem}.yaml")
    ft = cfg.eval.finetune
    assert ft.enabled
    assert (ft.layer_decay, ft.epochs, ft.warmup_epochs, ft.min_lr) == (
        layer_decay, epochs, warmup, pytest.approx(min_lr))
    assert (ft.blr, ft.batch_size, ft.weight_decay, ft.betas) == (1e-3, 1024, 0.05, (0.9, 0.999))
    assert (ft.smoothing, ft.mixup, ft.cutmix, ft.drop_path) == (0.1, 0.8, 1.0, 0.1)
    assert ft.auto_augment == "rand-m9-mstd0.5-inc1" and ft.global_pool == "avg"
    if stem == "imagenet_mae_vitl":  # the reference's ViT-L new model: decoder width 768
        assert cfg.runs[0].model.decoder_embed_dim == 768


@pytest.mark.slow
def test_two_process_torchrun_fine_tunes_the_single_process_model(data, tmp_path):
    """2 ranks (gloo) split every batch; without mixup and drop path (their draws are per rank)
    they train the single-process model, and the test set is split and summed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stages.checkpoint import load_checkpoint

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'tests'}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    sets = ["epochs=1", "batch_size=8", "warmup_epochs=0", "num_workers=0", "mixup=0",
            "cutmix=0", "drop_path=0", "eval_crop_pct=1.0", "device=cpu"]
    common = ["eval", "finetune", str(data["ckpt"]), "--train", "::".join(data["train"]),
              "--test", data["test"][0], "--arch", ARCH, "--timm-kwargs", json.dumps(BASE_KWARGS)]
    for item in sets:
        common += ["--set", item]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "pipeline.cli", *common, "--out",
                          str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=600, cwd=repo)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert ddp.stdout.count("test top-1") == 1  # rank 0 prints
    assert "2 process(es)" in ddp.stdout and "on 10 images" in ddp.stdout
    single = subprocess.run([sys.executable, "-m", "pipeline.cli", *common, "--out",
                             str(tmp_path / "single")], env=env, capture_output=True, text=True,
                            timeout=600, cwd=repo)
    assert single.returncode == 0, single.stderr[-2000:]
    a = load_checkpoint(tmp_path / "ddp")["model"]
    b = load_checkpoint(tmp_path / "single")["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


def test_randaugment_posterize_at_magnitude_ten_keeps_zero_bits_instead_of_failing():
    """'rand-m9-mstd0.5-inc1' draws magnitudes up to 10, where PosterizeIncreasing keeps 0 bits:
    Pillow >= 12 raises on that; the transform gives the black image older Pillow gave."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from stages.finetune import build_transforms

    train, _ = build_transforms(tiny_cfg(), 32)
    ra = next(t for t in train.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
    assert np.asarray(op(image)).max() == 0
    op.magnitude = 5  # 4 - int(0.5 * 4) = 2 bits: 200 -> 192
    assert np.asarray(op(image)).max() == 192


def _bench_quality():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("bench_quality_ft", root / "quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return module


def test_quality_benchmark_fine_tunes_a_row_reuses_it_and_scores_the_goals(data, tmp_path):
    from tec_helpers import tiny_new_model

    from tec.export import export_timm

    quality_mod = _bench_quality()
    export = tmp_path / "runs" / "tec" / "export" / "model.safetensors"
    export_timm(tiny_new_model(embed_dim=40, num_heads=2), export)
    quality = {"eval_train_shards": "::".join(data["train"]),
               "finetune": {"rows": ["tec"], "epochs": 1, "batch_size": 8, "warmup_epochs": 0,
                            "num_workers": 0, "eval_crop_pct": 1.0}}
    raw = {"data": {"test": data["test"][0]}}
    first = quality_mod.finetune_row(export, "tec", ARCH, raw, quality, tmp_path / "work")
    assert 0.0 <= first["finetune_top1"] <= 100.0 and first["finetune_steps"] == 3
    again = quality_mod.finetune_row(export, "tec", ARCH, raw, quality, tmp_path / "work")
    assert again["finetune_dir"] == first["finetune_dir"]
    assert again["finetune_top1"] == first["finetune_top1"]
    quality["finetune"]["layer_decay"] = 0.9  # another setting: another run folder
    other = quality_mod.finetune_row(export, "tec", ARCH, raw, quality, tmp_path / "work")
    assert other["finetune_dir"] != first["finetune_dir"]

    rows = [{"name": "pixels", "knn_top1": 84.0, "linear_top1": 84.5},
            {"name": "base", "knn_top1": 67.0, "linear_top1": 75.0, "finetune_top1": 86.0},
            {"name": "tec", "knn_top1": 74.0, "linear_top1": 78.0, "finetune_top1": 87.0},
            {"name": "mae_long", "knn_top1": 74.0, "linear_top1": 78.0, "finetune_top1": 87.5}]
    per_seed = {0: {"eval": {r["name"]: r for r in rows}}}
    goals = quality_mod.goals(rows, per_seed)
    assert goals["tec_minus_base_finetune_top1"]["mean"] == pytest.approx(1.0)
    assert goals["tec_minus_base_finetune_top1"]["met"]
    assert not goals["tec_minus_mae_long_finetune_top1"]["met"]
    lowest = goals["lowest_finetune_top1_minus_pixels"]
    assert lowest["row"] == "base" and lowest["mean"] == pytest.approx(1.5) and lowest["met"]
