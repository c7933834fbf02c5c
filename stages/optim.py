"""Optimizer and learning-rate schedule of stage 2 (the paper's recipe, MAE's implementation).

AdamW with two parameter groups (weight decay on matrices only; none on biases and 1-D
parameters such as norms), lr = blr x global_batch / 256, a per-step linear warm-up, then a
half-cycle cosine down to ``min_lr`` (MAE's ``adjust_learning_rate``, evaluated per optimizer step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LRSchedule", "build_optimizer", "cosine_decay", "param_groups", "scaled_lr"]


def scaled_lr(blr: float, global_batch: int) -> float:
    """Absolute learning rate from the base rate: lr = blr x batch / 256 (linear scaling rule)."""
    return blr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed biases / 1-D parameters (MAE's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the lr is overwritten every step by :class:`LRSchedule`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))


def cosine_decay(progress: float, base_lr: float, min_lr: float = 0.0) -> float:
    """Half-cycle cosine from ``base_lr`` (progress 0) to ``min_lr`` (progress 1): the one cosine
    of the stage-2 schedule and the linear probe's."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """Per-step learning rate: linear warm-up over ``warmup_steps``, then half-cycle cosine.

    ``lr(step)`` for the 0-based optimizer step equals MAE's ``adjust_learning_rate`` at the
    fractional epoch ``step / steps_per_epoch`` (so step 0 of a warm-up runs at lr 0, as in MAE).
    """

    base_lr: float
    min_lr: float
    warmup_steps: float
    total_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1e-12)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return cosine_decay(progress, self.base_lr, self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step``; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
