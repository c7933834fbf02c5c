"""TEC: target-enhanced conditional pretraining as pure PyTorch + timm.

base models (:mod:`tec.teacher`), targets (:mod:`tec.targets`), the new model
(:mod:`tec.model`), losses (:mod:`tec.losses`) and the timm export (:mod:`tec.export`).
"""

from .export import adapters_path, export_timm, load_adapters, timm_kwargs_for
from .losses import attention_loss, feature_loss, pixel_loss
from .model import NewModel, NewModelConfig, TargetBatch, random_masking
from .targets import (
                      IMAGENET_MEAN,
                      IMAGENET_STD,
                      Targets,
                      extract_targets,
                      feature_target,
                      normalize_images,
)
from .teacher import CheckpointError, describe_vit, file_sha256, load_base_model

__all__ = [
    "CheckpointError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NewModel",
    "NewModelConfig",
    "TargetBatch",
    "Targets",
    "adapters_path",
    "attention_loss",
    "describe_vit",
    "export_timm",
    "extract_targets",
    "feature_loss",
    "feature_target",
    "file_sha256",
    "load_adapters",
    "load_base_model",
    "normalize_images",
    "pixel_loss",
    "random_masking",
    "timm_kwargs_for",
]
