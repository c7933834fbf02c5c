"""Export the new model's encoder as a timm ``VisionTransformer`` checkpoint (.safetensors).

The input adapter is folded into the cls token (cls_token = MLP(cls) + its zero position
embedding), the fixed sin-cos position embedding is written as timm's ``pos_embed`` (zero cls row
included), and every other key is already a timm name (``patch_embed.proj``, ``blocks.N...``,
``norm``). So::

    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                      num_classes=0, **timm_kwargs_for(cfg))

loads it strictly, and ``tec.teacher.load_base_model(arch, path)`` loads it as a base model
for the next TEC round (the architecture kwargs come from the file's metadata).

``keep_adapters=True`` additionally writes the adapters for parameter-efficient fine-tuning to
a *separate* file next to the export, ``<stem>.adapters.safetensors`` (keys prefixed
``tec_adapters.``: the unfolded ``cls_token``, ``input_adapter.*``, ``encoder_adapter.*``),
because timm's pretrained loading is strict and would refuse extra keys in the main file.

:func:`export_timm_folder` writes timm's pretrained-folder layout (what timm's ``save_for_hf`` /
``push_to_hf_hub`` write): ``config.json`` (architecture, ``model_args`` with the whole geometry,
``pretrained_cfg`` with our input normalisation) beside ``model.safetensors``, plus a model card
``README.md``. Then, with no other arguments::

    timm.create_model("local-dir:FOLDER", pretrained=True)     # timm >= 1.0.20
    timm.create_model("hf-hub:OWNER/REPO", pretrained=True)     # the same folder on the Hub

``config.json`` is made by timm's own ``save_config_for_hf`` (on a meta-device model, so no
weights are allocated), so its fields are the ones timm reads back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import NewModel, NewModelConfig
from .teacher import TEC_EXPORT_FORMAT

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_PREFIX",
    "DEFAULT_EXPORT_ARCH",
    "TIMM_CONFIG_NAME",
    "TIMM_WEIGHTS_NAME",
    "adapters_path",
    "adapter_state_dict",
    "encoder_state_dict",
    "export_timm",
    "export_timm_folder",
    "load_adapters",
    "model_card",
    "timm_config",
    "timm_kwargs_for",
    "write_timm_config",
]

ADAPTER_PREFIX = "tec_adapters."
EXPORT_FORMAT_VERSION = "1"
# any timm ViT name works: timm_kwargs_for overrides its whole geometry
DEFAULT_EXPORT_ARCH = "vit_base_patch16_224"
# the file names timm's pretrained-folder loaders look for (timm.models._hub)
TIMM_CONFIG_NAME = "config.json"
TIMM_WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"


def timm_kwargs_for(cfg: NewModelConfig) -> dict[str, Any]:
    """timm.create_model kwargs that build the new model's encoder as a VisionTransformer."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


@torch.no_grad()
def encoder_state_dict(model: NewModel) -> dict[str, torch.Tensor]:
    """The encoder in timm VisionTransformer key names, input adapter folded into cls_token."""
    state = {"cls_token": _plain(model.cls_input()), "pos_embed": _plain(model.pos_embed)}
    for prefix, module in (("patch_embed.", model.patch_embed), ("blocks.", model.blocks),
                           ("norm.", model.norm)):
        for key, value in module.state_dict().items():
            state[prefix + key] = _plain(value)
    return state


@torch.no_grad()
def adapter_state_dict(model: NewModel) -> dict[str, torch.Tensor]:
    """Adapter weights with the ``tec_adapters.`` prefix (the cls token unfolded)."""
    state = {ADAPTER_PREFIX + "cls_token": _plain(model.cls_token)}
    for name in ("input_adapter", "encoder_adapter"):
        module: nn.Module | None = getattr(model, name)
        if module is not None:
            for key, value in module.state_dict().items():
                state[f"{ADAPTER_PREFIX}{name}.{key}"] = _plain(value)
    return state


def adapters_path(path: str | Path) -> Path:
    """Where export_timm(..., keep_adapters=True) writes the adapters for an export at ``path``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".adapters.safetensors")


def export_timm(model: NewModel, path: str | Path, *, keep_adapters: bool = False,
                arch: str = DEFAULT_EXPORT_ARCH) -> Path:
    """Write the encoder as a timm-loadable .safetensors file at ``path``; returns ``path``.

    keep_adapters: also write :func:`adapters_path` (``tec_adapters.*`` keys). ``arch`` is only
    recorded in the metadata (timm_kwargs_for fixes the geometry whatever the name).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": TEC_EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "arch": arch,
        "timm_kwargs": json.dumps(timm_kwargs_for(model.cfg), sort_keys=True),
        "new_model_config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "input_adapter_folded": str(model.input_adapter is not None).lower(),
        "adapters_file": adapters_path(path).name if keep_adapters else "",
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(encoder_state_dict(model), str(tmp), metadata=metadata)
    tmp.replace(path)
    if keep_adapters:
        side = adapters_path(path)
        tmp = side.with_name(side.name + ".tmp")
        save_file(adapter_state_dict(model), str(tmp),
                  metadata={"format": "tec-adapters", "format_version": EXPORT_FORMAT_VERSION,
                            "encoder_file": path.name})
        tmp.replace(side)
        logger.info("exported encoder to %s and adapters to %s", path, side)
    else:
        logger.info("exported encoder to %s", path)
    return path


def load_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    """Adapter weights of an export (``path`` is the export or its adapters file), prefix
    removed."""
    from safetensors.torch import load_file

    path = Path(path)
    side = path if path.name.endswith(".adapters.safetensors") else adapters_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"{side} does not exist; export with keep_adapters=True to "
                                "write it")
    return {k.removeprefix(ADAPTER_PREFIX): v for k, v in load_file(str(side)).items()}


def timm_config(cfg: NewModelConfig, arch: str = DEFAULT_EXPORT_ARCH) -> dict[str, Any]:
    """The ``config.json`` timm's ``save_for_hf`` writes for the encoder of ``cfg``.

    ``model_args`` holds the whole geometry (so ``create_model("local-dir:...")`` needs no
    kwargs), ``num_classes`` 0 (no head: fine-tuning asks for ``num_classes=N`` and gets a new
    one), ``pretrained_cfg`` the ImageNet mean/std and bicubic resizing the model was trained
    with. The registry tag and licence of ``arch``'s default weights are not carried over.
    """
    import tempfile

    import timm
    from timm.models._hub import save_config_for_hf

    from .targets import IMAGENET_MEAN, IMAGENET_STD

    with torch.device("meta"):  # geometry only: no weights are allocated
        vit = timm.create_model(arch, pretrained=False, num_classes=0,
                                pretrained_cfg_overlay=dict(tag=None, license=None, hf_hub_id=None,
                                                            url=None),
                                **timm_kwargs_for(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TIMM_CONFIG_NAME
        save_config_for_hf(vit, str(path), data_config=dict(
            mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"))
        return json.loads(path.read_text())


def write_timm_config(cfg: NewModelConfig, folder: str | Path,
                      arch: str = DEFAULT_EXPORT_ARCH) -> Path:
    """Write :func:`timm_config` as ``<folder>/config.json`` (atomically, byte-stable)."""
    path = Path(folder) / TIMM_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(timm_config(cfg, arch), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def model_card(cfg: NewModelConfig, *, name: str, details: dict[str, Any] | None = None) -> str:
    """A Hub model card (``README.md``) for an exported encoder: front matter and how to load it.

    name: the Hub repo id (``OWNER/NAME``) or just a name (the snippet then says ``OWNER/NAME``).
    """
    geometry = timm_kwargs_for(cfg)
    repo = name if "/" in name else f"OWNER/{name}"
    rows = "\n".join(f"| {k} | {v} |" for k, v in {**geometry, **(details or {})}.items())
    return (
        "---\ntags:\n- image-feature-extraction\n- timm\n- tec\nlibrary_name: timm\n---\n"
        f"# {name}\n\n"
        "A ViT encoder pretrained with TEC (masked reconstruction of a frozen base model's "
        "feature and attention targets), exported in timm's pretrained-folder layout; the input "
        "adapter is folded into the cls token, the decoder and encoder adapter are dropped.\n\n"
        "```python\nimport timm\n\n"
        f"model = timm.create_model(\"hf-hub:{repo}\", pretrained=True)  # features\n"
        f"model = timm.create_model(\"hf-hub:{repo}\", pretrained=True, num_classes=1000)"
        "  # fine-tuning\n```\n\n"
        "Inputs: RGB, ImageNet mean/std, bicubic resizing.\n\n"
        f"| | |\n|---|---|\n{rows}\n"
    )


def export_timm_folder(model: NewModel, folder: str | Path, *, keep_adapters: bool = False,
                       arch: str = DEFAULT_EXPORT_ARCH, name: str | None = None,
                       details: dict[str, Any] | None = None) -> Path:
    """Write timm's pretrained-folder layout at ``folder``; returns the folder.

    ``model.safetensors`` (:func:`export_timm`: timm keys, our metadata, so it is also a base
    model for the next round), ``config.json`` (:func:`timm_config`) and a model card
    ``README.md`` (``name``: the model's name in it, default the folder's name; ``details``: extra
    rows). keep_adapters: also ``model.adapters.safetensors`` (timm ignores it).
    """
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ValueError(f"{folder}: a pretrained folder, not a .safetensors file, is expected")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; give a folder for the export")
    export_timm(model, folder / TIMM_WEIGHTS_NAME, keep_adapters=keep_adapters, arch=arch)
    write_timm_config(model.cfg, folder, arch)
    card = folder / MODEL_CARD_NAME
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(model_card(model.cfg, name=name or folder.resolve().name, details=details))
    tmp.replace(card)
    logger.info("wrote timm pretrained folder %s (timm.create_model('local-dir:%s', "
                "pretrained=True))", folder, folder)
    return folder
