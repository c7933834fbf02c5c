"""stages/metrics.py: the per-step bookkeeping shared by stage 2 and fine-tuning."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from stages.metrics import StepLog


class FakeLoop:
    """What StepLog needs of a training loop; remembers the steps it checkpointed at."""

    def __init__(self, out_dir, steps_per_epoch: int, resumed_from: int | None = None):
        self.out_dir = out_dir
        self.dist = SimpleNamespace(is_main=True)
        self.global_step = self.epoch = self.step_in_epoch = 0
        self.steps_per_epoch = steps_per_epoch
        self.resumed_from = resumed_from
        self.lr = 0.5
        self.saved: list[int] = []

    def save_checkpoint(self) -> None:
        self.saved.append(self.global_step)


def test_step_log_advances_logs_and_checkpoints_on_its_cadence(tmp_path):
    loop = FakeLoop(tmp_path, steps_per_epoch=4)
    log = StepLog(loop, total_steps=10, log_every=3, checkpoint_every=5, progress=False,
                  desc="t")
    ends = []
    for step in range(10):
        ends.append(log.after_step({"loss": float(step), "other": 1.0}, samples=8,
                                   extra=lambda: {"extra": 7.0}))
    log.close()
    assert [i + 1 for i, end in enumerate(ends) if end] == [4, 8]
    assert (loop.global_step, loop.epoch, loop.step_in_epoch) == (10, 2, 2)
    # every 5 steps, at each epoch's end (4, 8) and at the last step
    assert loop.saved == [4, 5, 8, 10]
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 10]  # every 3 steps and the last
    assert list(rows[0]) == ["step", "loss", "other", "lr", "samples_per_s", "epoch", "extra"]
    assert [float(r["loss"]) for r in rows] == [1.0, 4.0, 7.0, 9.0]  # window means
    assert float(rows[1]["epoch"]) == pytest.approx(1.5) and float(rows[1]["extra"]) == 7.0
    assert log.means == {"loss": 9.0, "other": 1.0}


def test_step_log_without_periodic_checkpoints_saves_at_epoch_ends_and_the_last(tmp_path):
    loop = FakeLoop(tmp_path, steps_per_epoch=3)
    log = StepLog(loop, total_steps=7, log_every=100, checkpoint_every=0, progress=False,
                  desc="t")
    for _ in range(7):
        log.after_step({"loss": 1.0}, samples=1)
    log.close()
    assert loop.saved == [3, 6, 7]
    assert log.means == {"loss": 1.0}
