"""Push an export folder (timm's pretrained layout, :func:`tec.export.export_timm_folder`) to the
Hugging Face Hub with ``huggingface_hub`` (the ``hub`` extra; timm installs it too).

The folder is uploaded as it is on disk, so what `tec export --out FOLDER --push-to-hub REPO`
leaves in FOLDER is exactly what the repo receives; afterwards
``timm.create_model("hf-hub:REPO", pretrained=True)`` loads it with no other arguments.
The token comes from ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub's own lookup), the
endpoint from ``HF_ENDPOINT``. Every failure (no token, offline, unreachable endpoint, refused
by the Hub) is a one-line :class:`HubError` naming the repo.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from storage.util import first_line

logger = logging.getLogger(__name__)

__all__ = ["HubError", "check_push_ready", "push_folder"]

REQUIRED_FILES = ("config.json", "model.safetensors")


class HubError(ValueError):
    """Pushing to the Hugging Face Hub is not possible or failed (one line)."""


def _hub(repo_id: str):
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:
        raise HubError(f"--push-to-hub {repo_id}: huggingface_hub is not installed; "
                       "pip install -e '.[hub]'") from None


def check_push_ready(repo_id: str, token: str | None = None) -> str:
    """The token to push with, after checking the repo id and that a token exists (no network).

    Called before any export work so that a missing token costs nothing.
    """
    hub = _hub(repo_id)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--push-to-hub {repo_id!r}: not a Hub repo id ({first_line(e)}); "
                       "give OWNER/NAME") from None
    token = token or hub.get_token()
    if not token:
        raise HubError(f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run "
                       "`hf auth login` (a token with write access)")
    return token


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (its version decides)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def push_folder(folder: str | Path, repo_id: str, *, token: str | None = None,
                private: bool = False, commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder``; returns the commit URL."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{folder}: not a timm pretrained folder (no {', '.join(missing)}); "
                       "write it with `tec export CHECKPOINT --out FOLDER`")
    token = check_push_ready(repo_id, token)
    hub = _hub(repo_id)
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = hub.HfApi(token=token, library_name="tec-pipeline")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder),
                                 commit_message=commit_message or "Upload TEC export")
    except OfflineModeIsEnabled:
        raise HubError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload") \
            from None
    except HfHubHTTPError as e:
        raise HubError(f"--push-to-hub {repo_id}: the Hub at {api.endpoint} refused the upload "
                       f"({first_line(e)}); check the token's write access and the repo "
                       "name") from None
    except _transport_errors() as e:
        raise HubError(f"--push-to-hub {repo_id}: cannot reach {api.endpoint} ({first_line(e)}); "
                       "check the network or HF_ENDPOINT") from None
    url = str(getattr(info, "commit_url", None) or info)
    logger.info("pushed %s to %s (%s)", folder, repo.repo_id, url)
    return url
