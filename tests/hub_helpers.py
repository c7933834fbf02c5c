"""A local Hugging Face Hub cache for tests (there is no network here).

:func:`populate_hub_cache` lays files out exactly as ``huggingface_hub`` caches a download
(``models--OWNER--NAME/{blobs,refs/main,snapshots/<commit>/FILE}``), so ``hf_hub_download``,
``timm.create_model("hf-hub:...", pretrained=True)`` and timm's pretrained tags find them with
``HF_HUB_OFFLINE=1``. :func:`offline_hub` points this process (constants huggingface_hub read at
import) and its subprocesses (environment) at such a cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a fake 40-hex commit hash


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def populate_hub_cache(cache: str | Path, repo_id: str, files: dict[str, str | Path],
                       commit: str = COMMIT) -> Path:
    """Put ``files`` ({name in the repo: local file}) into the hub cache as revision ``main`` of
    model repo ``repo_id``; returns the snapshot folder."""
    root = repo_folder(Path(cache), repo_id)
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / "main").write_text(commit)
    return snapshot


def offline_hub(monkeypatch, hf_home: str | Path) -> Path:
    """HF_HOME=hf_home and HF_HUB_OFFLINE=1 for this process and its children; returns the hub
    cache folder (``<hf_home>/hub``)."""
    import huggingface_hub.constants as constants

    hf_home = Path(hf_home)
    cache = hf_home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    return cache
