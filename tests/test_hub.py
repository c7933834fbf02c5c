"""The Hugging Face Hub, in and out, with no network: `tec export --push-to-hub` uploads exactly
the pretrained folder it writes (the upload API is replaced by a recorder), and its failures are
one-line errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from hub_helpers import offline_hub
from tec_helpers import images, tiny_new_model

from pipeline.cli import main


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A stage-2 training checkpoint of a tiny new model (as Checkpointer writes it)."""
    from stages.checkpoint import FORMAT

    model = tiny_new_model(seed=3).eval()
    path = tmp_path / "step_00000003.pt"
    torch.save({"format": FORMAT, "new_model_config": model.cfg.to_dict(),
                "model": model.state_dict(), "step": 3}, path)
    return path, model


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records the repo made and every uploaded file's bytes
    at upload time (what the Hub would have received)."""

    calls: list = []

    def __init__(self, token=None, library_name=None, **_):
        self.token = token
        self.endpoint = "https://huggingface.co"

    def create_repo(self, repo_id, private=False, exist_ok=False, **_):
        RecordingHub.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                 for p in sorted(Path(folder_path).rglob("*")) if p.is_file()}
        RecordingHub.calls.append(("upload_folder", repo_id, files, kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.fixture
def recording_hub(monkeypatch, tmp_path):
    import huggingface_hub

    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    RecordingHub.calls = []
    return RecordingHub


def test_push_to_hub_uploads_exactly_the_exported_folder(checkpoint, recording_hub, tmp_path,
                                                         monkeypatch):
    ckpt, model = checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "tec-tiny"
    result = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out), "--push-to-hub",
                                       "me/tec-tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert "pushed to me/tec-tiny: https://huggingface.co/me/tec-tiny/commit/1" in result.output
    (_, repo, private, exist_ok, token), (_, up_repo, files, extra) = recording_hub.calls
    assert (repo, private, exist_ok, token, up_repo) == ("me/tec-tiny", True, True,
                                                         "hf_test_token", "me/tec-tiny")
    assert not extra  # no allow/ignore patterns: the whole folder, nothing else
    on_disk = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == on_disk
    assert set(files) == {"config.json", "model.safetensors", "model.json", "README.md"}
    config = json.loads(files["config.json"])
    assert config["model_args"]["embed_dim"] == 48 and config["num_classes"] == 0
    assert "hf-hub:me/tec-tiny" in files["README.md"].decode()
    # what was uploaded is a model timm builds with no arguments, equal to the trained one
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images()),
                                   model.forward_encoder_features(images()), atol=1e-5, rtol=0)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()  # (stdout: at most the "wrote" line before it)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert all(line.startswith("wrote ") for line in lines[:-1]), result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_push_without_a_token_is_one_line_before_any_export(checkpoint, recording_hub, tmp_path):
    ckpt, _ = checkpoint
    out = tmp_path / "tec-tiny"
    result = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out), "--push-to-hub",
                                       "me/tec-tiny"])
    _one_line_error(result, "me/tec-tiny", "no Hugging Face token", "HF_TOKEN")
    assert not out.exists() and recording_hub.calls == []


@pytest.mark.parametrize("argv_tail,needle", [
    (["--out", "{tmp}/x.safetensors", "--push-to-hub", "me/x"], "give --out FOLDER"),
    (["--out", "{tmp}/x", "--push-to-hub", "not a repo!"], "not a Hub repo id"),
])
def test_push_bad_arguments_are_one_line(checkpoint, recording_hub, tmp_path, monkeypatch,
                                         argv_tail, needle):
    ckpt, _ = checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    argv = ["export", str(ckpt), *[a.format(tmp=tmp_path) for a in argv_tail]]
    _one_line_error(CliRunner().invoke(main, argv), needle)
    assert recording_hub.calls == []


def test_push_to_an_unreachable_hub_is_one_line(checkpoint, tmp_path, monkeypatch):
    """The real huggingface_hub client against a closed loopback port (no network here)."""
    import socket

    import huggingface_hub

    ckpt, _ = checkpoint
    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    result = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "m"),
                                       "--push-to-hub", "me/tec-tiny"])
    _one_line_error(result, "me/tec-tiny", f"cannot reach {endpoint}")
    assert (tmp_path / "m" / "config.json").is_file()  # the folder is kept: push it again later


def test_push_while_offline_is_one_line(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    result = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "m"),
                                       "--push-to-hub", "me/tec-tiny"])
    _one_line_error(result, "me/tec-tiny", "HF_HUB_OFFLINE")


# ---- base models from timm's pretrained tags and hf-hub: repos, offline ------------------------

TAG = "vit_base_patch16_224.mae"


def _save_timm_weights(model, path: Path) -> Path:
    """A timm-format weights file as on the Hub (safetensors or a torch .bin)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An offline Hugging Face cache holding a tiny ViT as timm/vit_base_patch16_224.mae (its
    safetensors) and timm/vit_base_patch16_224.dino (a pytorch_model.bin only)."""
    from hub_helpers import populate_hub_cache
    from tec_helpers import tiny_vit

    cache = offline_hub(monkeypatch, tmp_path / "hf")
    mae, dino = tiny_vit(seed=1), tiny_vit(seed=2)
    files = tmp_path / "files"
    files.mkdir()
    populate_hub_cache(cache, "timm/" + TAG, {
        "model.safetensors": _save_timm_weights(mae, files / "model.safetensors")})
    populate_hub_cache(cache, "timm/vit_base_patch16_224.dino", {
        "pytorch_model.bin": _save_timm_weights(dino, files / "pytorch_model.bin")})
    return dict(cache=cache, mae=mae, dino=dino, mae_file=files / "model.safetensors")


def _base_config(**raw):
    from stages.configs import BaseModelConfig, from_dict

    return from_dict(BaseModelConfig, raw, "base_model")


def test_a_pretrained_tag_loads_the_cached_weights_as_timm_does(hub_cache):
    from tec_helpers import BASE_KWARGS

    from tec.teacher import file_sha256

    base = _base_config(arch=TAG, pretrained=True, timm_kwargs=BASE_KWARGS)
    model = base.load()
    x = images()
    with torch.no_grad():
        want = hub_cache["mae"].forward_features(x)
        assert torch.equal(model.forward_features(x), want)
        # timm itself, from the same cache, with the same tag
        through_timm = timm.create_model(TAG, pretrained=True, num_classes=0, **BASE_KWARGS)
        assert torch.equal(through_timm.eval().forward_features(x), want)
    assert not any(p.requires_grad for p in model.parameters())
    fingerprint = base.fingerprint(model, last_n=2, k_max=4)
    assert fingerprint["arch"] == TAG and fingerprint["pretrained"] == TAG
    assert fingerprint["checkpoint_sha256"] == file_sha256(hub_cache["mae_file"])
    weights = base.pretrained_weights()
    assert (weights.repo_id, weights.arch, weights.file.name) == (
        "timm/" + TAG, "vit_base_patch16_224", "model.safetensors")
    assert str(weights.file).startswith(str(hub_cache["cache"]))


def test_cached_weights_load_without_touching_the_network(hub_cache, monkeypatch):
    """Not offline, the endpoint a loopback server that counts connections: cache first, none."""
    import socket
    import threading

    import huggingface_hub
    from tec_helpers import BASE_KWARGS

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        base = _base_config(arch=TAG, pretrained=True, timm_kwargs=BASE_KWARGS)
        with torch.no_grad():
            assert torch.equal(base.load().forward_features(images()),
                               hub_cache["mae"].forward_features(images()))
    finally:
        stop.set()
        thread.join()
        server.close()
    assert connections == []


def test_a_tag_whose_repo_has_only_a_torch_bin_loads_it(hub_cache):
    from tec_helpers import BASE_KWARGS

    base = _base_config(arch="vit_base_patch16_224.dino", pretrained=True,
                        timm_kwargs=BASE_KWARGS)
    with torch.no_grad():
        assert torch.equal(base.load().forward_features(images()),
                           hub_cache["dino"].forward_features(images()))
    assert base.pretrained_weights().file.name == "pytorch_model.bin"


def test_an_hf_hub_export_is_a_base_model_with_its_own_geometry(monkeypatch, tmp_path):
    """A TEC export pushed to the Hub is the next round's base model: hf-hub:OWNER/NAME, no
    kwargs."""
    from hub_helpers import populate_hub_cache

    from tec.export import export_timm_folder

    model = tiny_new_model(seed=4).eval()
    folder = export_timm_folder(model, tmp_path / "round1", name="me/round1")
    cache = offline_hub(monkeypatch, tmp_path / "hf")
    populate_hub_cache(cache, "me/round1", {p.name: p for p in folder.iterdir()})
    base = _base_config(arch="hf-hub:me/round1", pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(base.load().forward_features(images()),
                                   model.forward_encoder_features(images()), atol=1e-5, rtol=0)
    plain = base.as_checkpoint()  # what evaluation loads: the file, its arch and geometry
    assert (plain.arch, plain.pretrained, Path(plain.checkpoint).name) == (
        "vit_base_patch16_224", False, "model.safetensors")
    assert plain.timm_kwargs["embed_dim"] == 48 and "num_classes" not in plain.timm_kwargs
    assert base.fingerprint(base.load(), last_n=2, k_max=4)["pretrained"] == "hf-hub:me/round1"


@pytest.mark.parametrize("raw,needle", [
    (dict(arch="vit_base_patch16_224.nope", pretrained=True),
     "base_model.arch: vit_base_patch16_224.nope: timm has no pretrained weights tagged 'nope'"),
    (dict(arch="vit_nope_224.mae", pretrained=True), "unknown timm architecture 'vit_nope_224'"),
    (dict(arch="hf-hub:not a repo", pretrained=True), "not a Hub repo id"),
    (dict(arch="hf-hub:me/round1"), "set base_model.pretrained: true"),
    (dict(arch=TAG, pretrained=True, checkpoint="/x.pth"), "remove base_model.checkpoint"),
])
def test_bad_pretrained_names_are_one_line_config_errors(raw, needle):
    from stages.configs import ConfigError

    with pytest.raises(ConfigError) as info:
        _base_config(**raw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def _pipeline_file(tmp_path: Path, arch: str) -> Path:
    from tec_helpers import BASE_KWARGS

    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({
        "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "shards")},
        "base_model": {"arch": arch, "pretrained": True, "timm_kwargs": BASE_KWARGS},
        "targets": {"cache": str(tmp_path / "cache"), "views": 2, "k_max": 4,
                    "view_policy": {"output_size": 32}},
    }))
    return path


def test_weights_not_in_the_offline_cache_fail_in_one_line_before_any_work(monkeypatch,
                                                                          tmp_path):
    offline_hub(monkeypatch, tmp_path / "hf")  # an empty cache
    result = CliRunner().invoke(main, ["targets", str(_pipeline_file(tmp_path, TAG))])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {TAG}: timm/{TAG}"), result.output
    assert "is not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_stage1_actors_compute_the_same_targets_from_a_tag_as_from_its_file(hub_cache, tmp_path):
    """The actor gets the config as a dict (as Ray ships it) and resolves the tag itself; the
    cache's fingerprint names the tag and the file's sha256."""
    from image_helpers import make_shards
    from tec_helpers import BASE_KWARGS

    from stages.configs import to_dict
    from stages.stage1 import (
        BaseModelActor,
        _check_base_model,
        _prepare_cache,
        process_shard,
    )
    from storage import open_cache
    from tec.teacher import file_sha256

    make_shards(tmp_path / "shards", n_shards=1, per_shard=3, size_range=(20, 40))
    tagged = _base_config(arch=TAG, pretrained=True, timm_kwargs=BASE_KWARGS)
    filed = _base_config(arch="vit_base_patch16_224", checkpoint=str(hub_cache["mae_file"]),
                         timm_kwargs=BASE_KWARGS)
    caches = {}
    for name, base in (("tagged", tagged), ("filed", filed)):
        from pipeline.config import load_config

        cfg = load_config(_pipeline_file(tmp_path, TAG), [
            f"targets.cache={tmp_path / name}"]).targets
        writer, jobs = _prepare_cache(cfg, _check_base_model(cfg, base), measure_error=False)
        actor = BaseModelActor(to_dict(base), cfg.last_n, cfg.k_max, float16=True)
        for job in jobs:
            process_shard(job, [actor], writer)
        writer.finalize()
        caches[name] = open_cache(tmp_path / name)
    a, b = caches["tagged"], caches["filed"]
    assert a.manifest["base_model"]["pretrained"] == TAG
    assert a.manifest["base_model"]["checkpoint_sha256"] == file_sha256(hub_cache["mae_file"]) \
        == b.manifest["base_model"]["checkpoint_sha256"]
    assert a.keys == b.keys and len(a.keys) == 3
    for i in range(len(a.keys)):
        for v in range(2):
            ra, rb = a.read(i, v), b.read(i, v)
            for field in ("features", "attn_logits", "attn_index", "crop"):
                np.testing.assert_array_equal(ra[field], rb[field])


@pytest.mark.slow
def test_tec_run_end_to_end_from_a_pretrained_tag_offline(tmp_path):
    """`tec run` as a user runs it (a subprocess, HF_HOME + HF_HUB_OFFLINE=1): stage 1 on its own
    Ray (actors resolve the tag), a TEC run, evaluation of the tag's weights and the new model."""
    import os
    import subprocess
    import sys

    import yaml
    from hub_helpers import populate_hub_cache
    from image_helpers import make_shards
    from tec_helpers import BASE_KWARGS, tiny_vit

    from tec.teacher import file_sha256

    hf_home = tmp_path / "hf"
    weights = _save_timm_weights(tiny_vit(seed=5), tmp_path / "model.safetensors")
    populate_hub_cache(hf_home / "hub", "timm/" + TAG, {"model.safetensors": weights})
    make_shards(tmp_path / "shards", n_shards=2, per_shard=8, size_range=(28, 40), prefix="train")
    make_shards(tmp_path / "shards", n_shards=1, per_shard=8, size_range=(28, 40), prefix="test",
                seed=1)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "shards" / "train-{000000..000001}.tar"),
                 "test": str(tmp_path / "shards" / "test-000000.tar")},
        "base_model": {"arch": TAG, "pretrained": True, "timm_kwargs": dict(BASE_KWARGS)},
        "targets": {"views": 2, "k_max": 8, "batch_size": 8, "view_policy": {"output_size": 32},
                    "ray": {"num_cpus": 1}},
        "runs": [{"name": "tec", "epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu",
                  "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "decoder_embed_dim": 32,
                            "decoder_depth": 1, "decoder_num_heads": 2, "k": 4, "tau": 1.0}}],
        "eval": {"enabled": True, "linear_epochs": 2, "knn_k": 3, "viz_images": 2,
                 "device": "cpu"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               TQDM_DISABLE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "work"
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert manifest["base_model"]["pretrained"] == TAG
    assert manifest["base_model"]["checkpoint_sha256"] == file_sha256(weights)
    assert [r["model"] for r in json.loads((work / "eval.json").read_text())] == ["base", "tec"]
    vit = timm.create_model(f"local-dir:{work / 'runs' / 'tec' / 'export'}", pretrained=True)
    assert vit.embed_dim == 48


def test_a_node_whose_cache_holds_other_weights_is_refused(hub_cache, monkeypatch, tmp_path):
    """Stage 1 pins the sha256 it fingerprinted; an actor whose own Hugging Face cache resolves
    the tag to other weights (an older snapshot of main) refuses instead of mixing targets."""
    from hub_helpers import populate_hub_cache
    from tec_helpers import BASE_KWARGS, tiny_vit

    from stages.configs import to_dict
    from stages.stage1 import BaseModelActor
    from tec.teacher import CheckpointError, file_sha256

    pinned = dataclasses.replace(_base_config(arch=TAG, pretrained=True, timm_kwargs=BASE_KWARGS),
                                 sha256=file_sha256(hub_cache["mae_file"]))
    BaseModelActor(to_dict(pinned), 2, 4)  # this node: the same file
    other = offline_hub(monkeypatch, tmp_path / "other-node")
    populate_hub_cache(other, "timm/" + TAG, {"model.safetensors": _save_timm_weights(
        tiny_vit(seed=9), tmp_path / "older.safetensors")})
    with pytest.raises(CheckpointError, match=r"not the pinned .*base_model.sha256"):
        BaseModelActor(to_dict(pinned), 2, 4)


def test_stage1_records_the_pinned_sha256_for_repairs(hub_cache, tmp_path):
    """A complete cache: run_stage1 starts no Ray, and records the settings (with the pin) that
    `tec cache repair` recomputes parts with."""
    from image_helpers import make_shards

    from pipeline.config import load_config
    from stages.configs import to_dict
    from stages.stage1 import (
        CONFIG_NAME,
        BaseModelActor,
        _check_base_model,
        _prepare_cache,
        process_shard,
        run_stage1,
    )
    from tec.teacher import file_sha256

    make_shards(tmp_path / "shards", n_shards=1, per_shard=2, size_range=(20, 40))
    cfg = load_config(_pipeline_file(tmp_path, TAG))
    writer, jobs = _prepare_cache(cfg.targets, _check_base_model(cfg.targets, cfg.base_model),
                                  measure_error=False)
    actor = BaseModelActor(to_dict(cfg.base_model), 2, 4, float16=True)
    for job in jobs:
        process_shard(job, [actor], writer)
    writer.finalize()
    summary = run_stage1(cfg.targets, cfg.base_model, progress=False)
    assert summary.parts_skipped == 1 and summary.parts_done == 0
    saved = json.loads((tmp_path / "cache" / CONFIG_NAME).read_text())["base_model"]
    assert saved["pretrained"] is True and saved["arch"] == TAG
    assert saved["sha256"] == file_sha256(hub_cache["mae_file"])


def test_a_pinned_checkpoint_file_that_changed_is_refused(tmp_path):
    from tec_helpers import BASE_KWARGS, tiny_vit

    from tec.teacher import CheckpointError, file_sha256

    path = _save_timm_weights(tiny_vit(seed=1), tmp_path / "base.safetensors")
    base = _base_config(checkpoint=str(path), timm_kwargs=BASE_KWARGS, sha256=file_sha256(path))
    base.load()
    _save_timm_weights(tiny_vit(seed=2), path)
    with pytest.raises(CheckpointError, match="not the pinned"):
        base.load()
    from stages.configs import ConfigError

    with pytest.raises(ConfigError, match="base_model.sha256: 'abc' is not a sha256"):
        _base_config(checkpoint=str(path), sha256="abc")
