"""Base models: load a frozen, pretrained ViT encoder from any supported checkpoint format.

A base model is a timm ``VisionTransformer`` (``num_classes=0``) in eval mode with every
parameter frozen. Checkpoints are recognised automatically; each format has one filter function
(like timm's ``checkpoint_filter_fn``) that maps its keys to timm's names:

========== ======================================================================================
format     recognised by / what the filter does
========== ======================================================================================
tec-export safetensors metadata ``format == "tec-export"`` (written by :mod:`tec.export`);
           keys are already timm names, the metadata supplies the architecture kwargs
mae        a ``{'model': ...}`` dict (MAE releases and full MAE training checkpoints);
           ``decoder_*`` and ``mask_token`` are ignored, ``fc_norm`` stands in for ``norm``
dino/ibot  a ``{'teacher' | 'student' | 'state_dict': ...}`` dict (teacher preferred);
           ``module.`` and ``backbone.`` prefixes removed, ``head.*`` / ``masked_embed`` ignored
timm       a plain state dict in ``.safetensors`` or ``.pth`` (timm, DINO releases);
           ``head.*`` ignored, ``fc_norm`` stands in for ``norm``
========== ======================================================================================

After filtering, every key the model has must be present with the right shape, and every key
left in the checkpoint must belong to the model: anything else is a :class:`CheckpointError`
naming the checkpoint and the keys, never a silently random base model. The one tolerated shape
difference is ``pos_embed`` on a different patch grid (same width, same prefix tokens): it is
resampled with timm's ``resample_abs_pos_embed`` (bicubic), as timm itself does.

``.pth`` files are read with ``torch.load(weights_only=True)``; full training checkpoints that
pickle Python objects (e.g. ``argparse.Namespace`` args) need ``allow_pickle=True``
(config ``base_model.allow_pickle: true`` / CLI ``--allow-pickle``), which runs arbitrary code
from the file: only for checkpoints you trust.

Pretrained weights by name (:func:`resolve_pretrained`): a timm pretrained tag such as
``vit_base_patch16_224.mae`` or ``vit_base_patch16_224.dino`` (timm's registry gives the Hub
repo, e.g. ``timm/vit_base_patch16_224.mae``), or ``hf-hub:OWNER/NAME[@REVISION]`` (the repo's
``config.json`` gives the architecture and geometry, as timm reads it). The weights file is
fetched into (or found in) the Hugging Face cache by ``huggingface_hub`` (``HF_HOME``,
``HF_HUB_OFFLINE``) and then loaded by :func:`load_base_model` like any file: strictly, through
the same filters. :func:`check_pretrained_name` checks a name against timm's registry with no
network, so bad names fail before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "PretrainedWeights",
    "TEC_EXPORT_FORMAT",
    "check_pretrained_name",
    "describe_vit",
    "detect_format",
    "file_sha256",
    "load_base_model",
    "read_checkpoint",
    "resolve_pretrained",
]

TEC_EXPORT_FORMAT = "tec-export"
_MAX_KEYS_IN_MESSAGE = 8


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the requested architecture (one line)."""


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed), used in the cache's base-model fingerprint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_vit(model: nn.Module) -> dict[str, int]:
    """Geometry of a timm ViT: img_size, patch_size, embed_dim, depth, num_heads, num_patches."""
    img_size = model.patch_embed.img_size
    patch_size = model.patch_embed.patch_size
    return dict(
        img_size=int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size),
        patch_size=int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
        num_patches=int(model.patch_embed.num_patches),
    )


# --------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file on the CPU.

    Returns (content, safetensors metadata); content is whatever the file holds (a state dict or
    a dict of them), metadata is ``{}`` for ``.pth`` files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base-model checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), metadata
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a "
                              "pickle); give a .pth/.pt/.safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle), {}
    except pickle.UnpicklingError as e:
        if not allow_pickle and "weights only" in str(e).lower():
            raise CheckpointError(
                f"{path}: checkpoint holds pickled Python objects that "
                "torch.load(weights_only=True) refuses; if you trust the file, set "
                "base_model.allow_pickle: true (CLI --allow-pickle)"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from e
    except Exception as e:  # torch.load raises many types on damaged files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from e


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (torch >= 1.6) or a legacy pickle (protocol >= 2)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] >= 2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# One filter per format: raw file content -> state dict with timm VisionTransformer key names


def _strip_prefixes(state_dict: dict[str, Any],
                    prefixes=("module.", "backbone.")) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _use_fc_norm_as_norm(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Global-pool checkpoints (MAE fine-tuning, timm avg pool) keep their final norm in fc_norm."""
    if "norm.weight" not in state_dict and "fc_norm.weight" in state_dict:
        logger.info("checkpoint has fc_norm but no norm: using fc_norm as the final norm")
        state_dict = dict(state_dict)
        for name in ("weight", "bias"):
            if f"fc_norm.{name}" in state_dict:
                state_dict[f"norm.{name}"] = state_dict.pop(f"fc_norm.{name}")
    return state_dict


def _drop(state_dict: dict[str, Any], predicate: Callable[[str], bool]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if not predicate(k)}


def _is_head_key(key: str) -> bool:
    return key.startswith("head.") or key.startswith("head_dist.") or key.startswith("pre_logits.")


def filter_tec_export(content: dict[str, Any]) -> dict[str, Any]:
    """Our own exports (:func:`tec.export.export_timm`): already timm names."""
    return dict(content)


def filter_mae(content: dict[str, Any]) -> dict[str, Any]:
    """MAE releases and training checkpoints: {'model': encoder + decoder_* + mask_token ...}."""
    state_dict = _strip_prefixes(content["model"], prefixes=("module.",))
    state_dict = _drop(state_dict, lambda k: k.startswith("decoder_") or k == "mask_token"
                       or _is_head_key(k))
    return _use_fc_norm_as_norm(state_dict)


def filter_dino_ibot(content: dict[str, Any]) -> dict[str, Any]:
    """DINO/iBOT checkpoints: {'teacher'|'student'|'state_dict': {[module.][backbone.]...}}."""
    for container in ("teacher", "student", "state_dict"):
        if isinstance(content.get(container), dict):
            state_dict = content[container]
            break
    state_dict = _strip_prefixes(state_dict, prefixes=("module.",))
    if any(k.startswith("backbone.") for k in state_dict):
        # the projection head lives beside the backbone: keep only the backbone
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    state_dict = _strip_prefixes(state_dict)
    state_dict = _drop(state_dict, lambda k: _is_head_key(k) or k == "masked_embed")
    return _use_fc_norm_as_norm(state_dict)


def filter_timm(content: dict[str, Any]) -> dict[str, Any]:
    """Plain timm-style state dicts (.safetensors / .pth, DINO backbone releases)."""
    state_dict = _strip_prefixes(content, prefixes=("module.",))
    state_dict = _drop(state_dict, _is_head_key)
    return _use_fc_norm_as_norm(state_dict)


_FILTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    TEC_EXPORT_FORMAT: filter_tec_export,
    "mae": filter_mae,
    "dino_ibot": filter_dino_ibot,
    "timm": filter_timm,
}


def detect_format(content: Any, metadata: dict[str, str]) -> str:
    """Name of the checkpoint format (a key of the filter table), or CheckpointError."""
    if metadata.get("format") == TEC_EXPORT_FORMAT:
        return TEC_EXPORT_FORMAT
    if not isinstance(content, dict):
        raise CheckpointError(f"holds a {type(content).__name__}, not a state dict")
    if isinstance(content.get("model"), dict):
        return "mae"
    if any(isinstance(content.get(k), dict) for k in ("teacher", "student", "state_dict")):
        return "dino_ibot"
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return "timm"
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level keys {_preview(sorted(content))}); expected "
        "a state dict, {'model': ...} (MAE) or {'teacher'|'student'|'state_dict': ...} (DINO/iBOT)"
    )


def _export_timm_kwargs(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        return dict(json.loads(metadata.get("timm_kwargs", "{}")))
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------------------------
# Loading


def _preview(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    if len(keys) > _MAX_KEYS_IN_MESSAGE:
        shown += f", ... ({len(keys)} in all)"
    return f"[{shown}]"


def _adapt_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module, where: str
                    ) -> dict[str, torch.Tensor]:
    """Check keys and shapes against ``model``; resample pos_embed to the model's patch grid."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing encoder keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise CheckpointError(
            f"{where}: {'; '.join(parts)}; check that the architecture and its kwargs "
            "(img_size, patch_size, embed_dim, depth, num_heads) match the checkpoint"
        )
    out = {}
    mismatched = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key} (not a tensor)")
            continue
        target_shape = expected[key].shape
        if key == "pos_embed" and value.shape != target_shape:
            value = _resample_pos_embed(value, model, where)
        if value.shape != target_shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(target_shape)}")
        out[key] = value
    if mismatched:
        raise CheckpointError(
            f"{where}: shape mismatch {_preview(mismatched)}; check the architecture kwargs"
        )
    return out


def _resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module, where: str) -> torch.Tensor:
    """pos_embed from another patch grid: resample when width and prefix tokens agree."""
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    target = model.pos_embed
    old_tokens = pos_embed.shape[1] - num_prefix
    side = int(round(old_tokens ** 0.5))
    if pos_embed.ndim != 3 or pos_embed.shape[-1] != target.shape[-1] or side * side != old_tokens:
        return pos_embed  # reported as a shape mismatch by the caller
    logger.warning("%s: resampling pos_embed from a %dx%d to a %dx%d patch grid", where, side, side,
                   *model.patch_embed.grid_size)
    return resample_abs_pos_embed(pos_embed.float(), new_size=list(model.patch_embed.grid_size),
                                  old_size=[side, side], num_prefix_tokens=num_prefix)


def load_base_model(arch: str, checkpoint: str | Path | None = None, *, allow_pickle: bool = False,
                    plain_kwargs: dict[str, Any] | None = None, **timm_kwargs) -> nn.Module:
    """Create a frozen timm ViT (``num_classes=0``, eval mode) and load ``checkpoint`` into it.

    arch: timm model name, e.g. ``vit_base_patch16_224``; timm_kwargs (img_size, patch_size,
    embed_dim, depth, num_heads, ...) override its defaults. For our own exports the kwargs stored
    in the file are the defaults (explicit kwargs still win). plain_kwargs: geometry used only for
    checkpoints that do not carry their own (everything but our exports). ``checkpoint=None``
    gives a randomly initialised model (tests, dry runs) and logs a warning.
    """
    kwargs: dict[str, Any] = {}
    state_dict = None
    where = str(checkpoint)
    if checkpoint is not None:
        content, metadata = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
        try:
            fmt = detect_format(content, metadata)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None
        if fmt == TEC_EXPORT_FORMAT:
            kwargs.update(_export_timm_kwargs(metadata))
        else:
            kwargs.update(plain_kwargs or {})
        state_dict = _FILTERS[fmt](content)
        where = f"{checkpoint} ({fmt} format)"
    kwargs.update(timm_kwargs)
    if checkpoint is not None:  # the geometry too: an export's overrides the arch's defaults
        geometry = {k: kwargs[k] for k in ("img_size", "patch_size", "embed_dim", "depth",
                                            "num_heads") if k in kwargs}
        logger.info("loading base model %s%s from %s", arch,
                    f" {geometry}" if geometry else "", where)
    kwargs.update(num_classes=0, pretrained=False)
    if not timm.is_model(arch):
        raise CheckpointError(f"unknown timm architecture {arch!r}; use a timm ViT name such as "
                              "vit_base_patch16_224")
    try:
        model = timm.create_model(arch, **kwargs)
    except (TypeError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"cannot create {arch} with {kwargs}: {_first_line(e)}") from e
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise CheckpointError(f"{arch} is not a ViT with patch_embed and blocks")
    if state_dict is None:
        logger.warning("base model %s has no checkpoint: randomly initialised", arch)
    else:
        model.load_state_dict(_adapt_to_model(state_dict, model, where), strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Pretrained weights by name: timm tags and hf-hub: repos, through the Hugging Face cache

HF_HUB_PREFIX = "hf-hub:"
# what timm's hub loader tries, in its order (timm.models._hub.load_state_dict_from_hf)
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# config.json model_args that describe a classifier, not the encoder we load (num_classes=0)
_HEAD_ARGS = ("num_classes", "global_pool")


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a pretrained name's weights are: ``file`` is a local file in the Hugging Face cache.

    name: the full name (``vit_base_patch16_224.mae``, ``hf-hub:OWNER/NAME``; a timm name without
    a tag gets timm's default tag); arch: the timm model it builds; model_kwargs: the geometry a
    hf-hub repo's config.json gives (``{}`` for registry tags: the arch name fixes it).
    """

    name: str
    arch: str
    repo_id: str
    revision: str | None
    file: Path
    model_kwargs: dict = field(default_factory=dict)


def _split_hub_id(hub_id: str) -> tuple[str, str | None]:
    repo_id, _, revision = hub_id.partition("@")
    return repo_id, revision or None


def check_pretrained_name(name: str) -> str:
    """The full name of pretrained weights ``name`` (tag completed), checked with no network.

    A timm name must be in timm's registry with weights on the Hugging Face Hub under that tag;
    an ``hf-hub:`` name must be a valid repo id. Anything else is a one-line CheckpointError.
    """
    if name.startswith(HF_HUB_PREFIX):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id, _ = _split_hub_id(name[len(HF_HUB_PREFIX):])
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise CheckpointError(f"{name}: not a Hub repo id ({_first_line(e)}); use "
                                  "hf-hub:OWNER/NAME[@REVISION]") from None
        return name
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise CheckpointError(f"{name}: unknown timm architecture {arch!r}; use a timm ViT name "
                              "with a pretrained tag, e.g. vit_base_patch16_224.mae")
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
    if not tags:
        raise CheckpointError(f"{name}: timm has no pretrained weights for {arch}")
    if tag and tag not in tags:
        raise CheckpointError(f"{name}: timm has no pretrained weights tagged {tag!r} for {arch}; "
                              f"its tags: {', '.join(tags)}")
    cfg = get_pretrained_cfg(name if tag else arch)
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    if not cfg.hf_hub_id:
        raise CheckpointError(f"{full}: timm has these weights only at {cfg.url} (not on the "
                              "Hugging Face Hub); download the file and set base_model.checkpoint")
    if cfg.custom_load:
        raise CheckpointError(f"{full}: timm loads these weights with custom code; download them "
                              "and set base_model.checkpoint")
    return full


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_download(name: str, repo_id: str, filenames: tuple[str, ...], revision: str | None
                  ) -> Path:
    """The first of ``filenames`` the repo has, from the Hugging Face cache or the Hub."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def not_cached(why: str) -> CheckpointError:
        return CheckpointError(
            f"{name}: {repo_id} ({' or '.join(filenames)}) is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and {why}; fetch it once with network (`hf download "
            f"{repo_id}`) and copy HF_HOME, or set base_model.checkpoint to a file")

    # The cache first: weights already there load with no network at all (the fingerprint's
    # sha256 pins what was used either way).
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision,
                                        local_files_only=True, library_name="tec-pipeline"))
        except LocalEntryNotFoundError:
            continue
    if _hub_offline():
        raise not_cached("HF_HUB_OFFLINE is set")
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision,
                                        library_name="tec-pipeline"))
        except LocalEntryNotFoundError:  # the Hub cannot be reached: the next name neither
            raise not_cached("the Hub cannot be reached") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{name}: no Hub repo {repo_id} (or it is gated or private: "
                                  "log in with `hf auth login` or set HF_TOKEN)") from None
        except EntryNotFoundError:  # the repo exists but lacks this file: try the next name
            continue
        except HfHubHTTPError as e:
            raise CheckpointError(f"{name}: cannot download {repo_id}/{filename} from the Hub "
                                  f"({_first_line(e)})") from None
    raise CheckpointError(f"{name}: the Hub repo {repo_id} has none of {', '.join(filenames)}")


def resolve_pretrained(name: str) -> PretrainedWeights:
    """Find (downloading if needed and allowed) the weights of a pretrained name; see the module
    docstring. Failures are one-line CheckpointErrors naming ``name``."""
    full = check_pretrained_name(name)
    if full.startswith(HF_HUB_PREFIX):
        repo_id, revision = _split_hub_id(full[len(HF_HUB_PREFIX):])
        config_path = _hub_download(full, repo_id, ("config.json",), revision)
        try:
            config = json.loads(config_path.read_text())
            if "pretrained_cfg" not in config:  # timm's legacy one-dict layout
                config = {"architecture": config["architecture"], "model_args": {}}
            arch = config["architecture"]
            model_kwargs = {k: v for k, v in dict(config.get("model_args") or {}).items()
                            if k not in _HEAD_ARGS}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{full}: config.json is not a timm model config "
                                  f"({_first_line(e)})") from None
        if not timm.is_model(arch):
            raise CheckpointError(f"{full}: config.json names {arch!r}, not a timm architecture")
        filenames = HUB_WEIGHTS_FILES
    else:
        from timm.models import get_pretrained_cfg, split_model_name_tag

        cfg = get_pretrained_cfg(full)
        arch = split_model_name_tag(full)[0]
        repo_id, revision = _split_hub_id(cfg.hf_hub_id)
        model_kwargs = {}
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS_FILES
    file = _hub_download(full, repo_id, filenames, revision)
    logger.info("pretrained base model %s: %s", full, file)
    return PretrainedWeights(name=full, arch=arch, repo_id=repo_id, revision=revision, file=file,
                             model_kwargs=model_kwargs)
