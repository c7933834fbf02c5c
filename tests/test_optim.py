"""stages/optim.py: the MAE learning-rate schedule and the weight-decay parameter groups."""
from __future__ import annotations

import math

import pytest
import torch

from stages.optim import LRSchedule, param_groups, scaled_lr


def test_lr_schedule_matches_mae_adjust_learning_rate():
    def mae(epoch, lr, min_lr, warmup, epochs):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

    spe, epochs, warm = 7, 10, 2.5
    lr = scaled_lr(1.5e-4, 512)
    assert lr == pytest.approx(3e-4)
    sched = LRSchedule(base_lr=lr, min_lr=1e-6, warmup_steps=warm * spe, total_steps=epochs * spe)
    for step in range(epochs * spe):
        assert sched.lr(step) == pytest.approx(mae(step / spe, lr, 1e-6, warm, epochs))
    assert sched.lr(0) == 0.0


def test_param_groups_exclude_biases_and_1d_params_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    no_decay, decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model.token)}
    assert len(no_decay["params"]) == 3
