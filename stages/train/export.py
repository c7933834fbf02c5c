"""Writing the timm-loadable exports of a trained model (:func:`export_checkpoint`)."""
from __future__ import annotations

import logging
from pathlib import Path

from stages.checkpoint import (
    load_checkpoint,
)
from storage.layout import write_json_atomic

logger = logging.getLogger("stages.train")


# ---------------------------------------------------------------------------------------------
# Exports


def _write_export(model, out: Path, *, keep_adapters: bool, extra: dict | None = None,
                  timm_folder: str | None = None) -> dict:
    """Export ``model`` to ``out`` (.safetensors) plus ``<stem>.json`` describing how to load it.

    timm_folder: the model's name; ``out`` is then ``<folder>/model.safetensors`` and the folder
    gets timm's ``config.json`` and a model card too (``create_model("local-dir:<folder>")``).
    """
    from tec.export import (
        DEFAULT_EXPORT_ARCH,
        adapters_path,
        export_timm,
        export_timm_folder,
        timm_kwargs_for,
    )

    out = Path(out)
    if timm_folder is not None:
        export_timm_folder(model, out.parent, keep_adapters=keep_adapters, name=timm_folder,
                           details=extra)
    else:
        export_timm(model, out, keep_adapters=keep_adapters)
    info = {
        "arch": DEFAULT_EXPORT_ARCH,
        "timm_kwargs": dict(timm_kwargs_for(model.cfg), num_classes=0),
        "file": out.name,
        "adapters_file": adapters_path(out).name if keep_adapters else None,
        "new_model_config": model.cfg.to_dict(),
        "load": "timm.create_model(arch, pretrained=True, "
                "pretrained_cfg_overlay=dict(file=<file>), **timm_kwargs)"
                + (" or timm.create_model('local-dir:<folder>', pretrained=True)"
                   if timm_folder is not None else ""),
        **(extra or {}),
    }
    info_path = out.with_name(out.name.removesuffix(".safetensors") + ".json")
    write_json_atomic(info_path, info, style="sorted")
    return {"export": str(out), "adapters": str(adapters_path(out)) if keep_adapters else None,
            "info": str(info_path)}


# what an export folder holds (export_checkpoint rewrites such a folder, no other)
_EXPORT_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "model.adapters.safetensors",
                                  "model.json", "README.md"})


def export_checkpoint(checkpoint_path: str | Path, out: str | Path,
                      keep_adapters: bool = False, name: str | None = None) -> Path:
    """Export any stage-2 training checkpoint as a timm-loadable .safetensors file at ``out``.

    The input adapter is folded into the cls token; ``keep_adapters`` also writes the adapters
    (``<stem>.adapters.safetensors``). A ``<stem>.json`` next to it records the timm kwargs.
    An ``out`` not ending in .safetensors is a folder in timm's pretrained layout (config.json,
    model.safetensors, model.json, README.md model card titled ``name``, default the folder's).
    """
    from tec.model import NewModel, NewModelConfig

    out = Path(out)
    folder = out.suffix != ".safetensors"
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; give a .safetensors file "
                         "name or a folder for timm's pretrained layout")
    if folder and out.is_dir():  # rewrite an earlier export, never a folder holding other files
        others = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FOLDER_FILES)
        if others:
            raise ValueError(f"--out {out}: the folder holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")
    state = load_checkpoint(checkpoint_path)
    model = NewModel(NewModelConfig(**state["new_model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    if folder:  # no local checkpoint path in a folder that may be pushed to the Hub
        _write_export(model, out / "model.safetensors", keep_adapters=keep_adapters,
                      extra={"step": int(state["step"])},
                      timm_folder=name or out.resolve().name)
    else:
        _write_export(model, out, keep_adapters=keep_adapters,
                      extra={"checkpoint": str(checkpoint_path), "step": int(state["step"])})
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
