"""`tec run` end to end, as a user runs it: a subprocess on a tiny pipeline.yaml.

A plain timm checkpoint of non-default geometry is the base model (so every step has to pass
``base_model.timm_kwargs`` on, evaluation included), stage 1 runs on its own local Ray, one TEC
run trains from the cache, evaluation writes eval.json and the attention picture. The second
`tec run` must reuse everything: no base-model forward pass, no training step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from image_helpers import make_shards
from safetensors.torch import save_file

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
ARCH = "vit_base_patch16_224"
GEOMETRY = {"img_size": 32, "patch_size": 8, "embed_dim": 40, "depth": 3, "num_heads": 2}


def plain_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **GEOMETRY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tec(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("tec_run")
    make_shards(ws / "shards", n_shards=2, per_shard=8, size_range=(28, 40), prefix="train")
    make_shards(ws / "shards", n_shards=1, per_shard=8, size_range=(28, 40), prefix="test",
                seed=1)
    plain_checkpoint(ws / "base.safetensors")
    return ws


def pipeline_yaml(ws: Path) -> Path:
    raw = {
        "workdir": str(ws / "work"),
        "data": {"train": str(ws / "shards" / "train-{000000..000001}.tar"),
                 "test": str(ws / "shards" / "test-000000.tar")},
        "base_model": {"arch": ARCH, "checkpoint": str(ws / "base.safetensors"),
                       "timm_kwargs": dict(GEOMETRY)},
        "targets": {"views": 2, "k_max": 8, "batch_size": 8, "view_policy": {"output_size": 32},
                    "ray": {"num_cpus": 1}},
        "runs": [{"name": "tec", "epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu",
                  "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "decoder_embed_dim": 32,
                            "decoder_depth": 1, "decoder_num_heads": 2, "k": 4, "tau": 1.0}}],
        "eval": {"enabled": True, "linear_epochs": 2, "knn_k": 3, "viz_images": 2,
                 "device": "cpu"},
    }
    path = ws / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_tec_run_end_to_end_then_reuses_everything(workspace):
    config = pipeline_yaml(workspace)
    first = tec("run", str(config), cwd=workspace)
    assert first.returncode == 0, first.stderr[-3000:]
    work = workspace / "work"
    rows = json.loads((work / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["base", "tec"]
    for row in rows:
        for metric in ("knn_cls", "knn_mean", "linear_cls", "linear_mean"):
            assert 0.0 <= row[metric] <= 100.0
    assert (work / "attention.png").stat().st_size > 0
    assert (work / "runs" / "tec" / "export" / "model.safetensors").is_file()

    second = tec("run", str(config), cwd=workspace)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "0 base-model forward passes" in out
    assert "reused finished run" in out


def test_eval_and_viz_of_a_plain_checkpoint_need_its_geometry(workspace, tmp_path):
    base = str(workspace / "base.safetensors")
    shards = str(workspace / "shards" / "test-000000.tar")
    common = ["--train", shards, "--test", shards, "--arch", ARCH, "--device", "cpu"]
    runner = CliRunner()
    without = runner.invoke(main, ["eval", "knn", base, *common, "-k", "3"])
    assert without.exit_code == 2
    assert "base.safetensors" in without.stderr and len(without.stderr.splitlines()) == 1

    geometry = json.dumps(GEOMETRY)
    ok = runner.invoke(main, ["eval", "knn", base, *common, "-k", "3", "--timm-kwargs", geometry])
    assert ok.exit_code == 0, ok.output
    assert "kNN cls" in ok.stdout

    png = tmp_path / "maps.png"
    ok = runner.invoke(main, ["viz", "attention", base, "--images", shards, "--out", str(png),
                              "-n", "2", "--arch", ARCH, "--timm-kwargs",
                              "{img_size: 32, patch_size: 8, embed_dim: 40, depth: 3, "
                              "num_heads: 2}"])
    assert ok.exit_code == 0, ok.output
    assert png.stat().st_size > 0

    for bad in ("[1, 2]", "{img_size: 32", "7"):
        result = runner.invoke(main, ["eval", "knn", base, *common, "--timm-kwargs", bad])
        assert result.exit_code == 2
        assert result.stderr.startswith("error: --timm-kwargs")
        assert len(result.stderr.splitlines()) == 1
