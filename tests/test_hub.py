"""The Hugging Face Hub, in and out, with no network: `tec export --push-to-hub` uploads exactly
the pretrained folder it writes (the upload API is replaced by a recorder), and its failures are
one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from hub_helpers import offline_hub
from pipeline.cli import main
from tec_helpers import images, tiny_new_model


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
