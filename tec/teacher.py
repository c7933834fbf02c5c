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
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import timm
from timm.layers import resample_abs_pos_embed

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "TEC_EXPORT_FORMAT",
    "describe_vit",
    "detect_format",
    "file_sha256",
    "load_base_model",
    "read_checkpoint",
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
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle); "
                              "give a .pth/.pt/.safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle), {}
    except pickle.UnpicklingError as e:
        if not allow_pickle and "weights only" in str(e).lower():
            raise CheckpointError(
                f"{path}: checkpoint holds pickled Python objects that torch.load(weights_only=True) "
                "refuses; if you trust the file, set base_model.allow_pickle: true (CLI --allow-pickle)"
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


def _strip_prefixes(state_dict: dict[str, Any], prefixes=("module.", "backbone.")) -> dict[str, Any]:
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
        logger.info("loading base model %s from %s", arch, where)
    kwargs.update(timm_kwargs)
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
