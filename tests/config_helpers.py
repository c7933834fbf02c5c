"""A tiny valid pipeline mapping and the shipped configs, for config and plan tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.configs import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
ROOT_PIPELINE = REPO / "pipeline.yaml"
ALL_CONFIGS = SHIPPED + ([ROOT_PIPELINE] if ROOT_PIPELINE.is_file() else [])

BASE_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 40, "depth": 3, "num_heads": 2}


def minimal_pipeline(tmp: Path | str = "/tmp/tec-test") -> dict:
    """A complete, valid, tiny pipeline mapping (nothing on disk is needed to parse or plan it)."""
    tmp = Path(tmp)
    return {
        "workdir": str(tmp / "work"),
        "data": {"train": str(tmp / "shards" / "train-{000000..000001}.tar"), "num_samples": 16},
        "base_model": {"arch": "vit_base_patch16_224", "checkpoint": str(tmp / "base.safetensors"),
                       "timm_kwargs": dict(BASE_KWARGS)},
        "targets": {"views": 2, "k_max": 8, "batch_size": 8,
                    "view_policy": {"output_size": 32}, "ray": {"num_cpus": 1}},
        "runs": [
            {"name": "tec", "epochs": 1, "batch_size": 4, "num_workers": 0,
             "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "decoder_embed_dim": 32,
                       "decoder_depth": 1, "decoder_num_heads": 2, "k": 4, "tau": 1.0}},
            {"name": "feature_only", "epochs": 2, "batch_size": 4,
             "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "use_attention": False}},
        ],
        "eval": {"enabled": False},
    }


def config_error(fn, *args, **kwargs) -> str:
    """The message of the ConfigError ``fn`` raises; checks it is one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg
