"""Metrics of stage 2: loss/lr/throughput logs (CSV + TensorBoard), progress bar, loader timing.

Only rank 0 logs; other ranks get a :class:`MetricsLogger` that does nothing.
"""
from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LoaderMeter", "MetricsLogger", "ProgressBar", "StepLog", "Throughput", "WindowMean"]


class WindowMean:
    """Running means of named scalars since the last :meth:`pop`."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def pop(self) -> dict[str, float]:
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


class Throughput:
    """Samples per second over a window (reset at each read) and over the whole run."""

    def __init__(self):
        self.start = self._window_start = time.perf_counter()
        self.total = self._window = 0

    def add(self, samples: int) -> None:
        self.total += samples
        self._window += samples

    def window_rate(self) -> float:
        now = time.perf_counter()
        rate = self._window / max(now - self._window_start, 1e-9)
        self._window_start, self._window = now, 0
        return rate

    def overall_rate(self) -> float:
        return self.total / max(time.perf_counter() - self.start, 1e-9)


class LoaderMeter:
    """How fast the data loader can go, compared with how fast training consumes.

    Workers report the seconds they spent producing each batch (decode, render, cache read,
    collate); with ``workers`` processes in parallel the loader's capacity is
    ``workers x samples / busy seconds``. ``wait_seconds`` is the time the training loop spent
    blocked on the loader (near zero when loading keeps up).
    """

    def __init__(self, workers: int):
        self.workers = max(int(workers), 1)
        self.samples = 0
        self.busy_seconds = 0.0
        self.wait_seconds = 0.0

    def add(self, samples: int, busy_seconds: float, wait_seconds: float) -> None:
        self.samples += samples
        self.busy_seconds += busy_seconds
        self.wait_seconds += wait_seconds

    def capacity(self) -> float | None:
        """Estimated loader samples/s (None before anything was loaded)."""
        if self.busy_seconds <= 0:
            return None
        return self.workers * self.samples / self.busy_seconds


class MetricsLogger:
    """Appends one row per logged step to ``<log_dir>/metrics.csv`` and TensorBoard scalars.

    On resume, rows for steps after the resumed step (written by the interrupted run after its
    last checkpoint) are dropped so the CSV describes exactly one training history.
    """

    def __init__(
        self, log_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None
    ):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._csv_file = None
        self._writer = None
        self._tb = None
        self._fields: list[str] | None = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.log_dir / "metrics.csv"
        if resume_step is not None and self.csv_path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.csv_path.exists():
            self.csv_path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard not installed: CSV only
            logger.warning("tensorboard is not installed; writing CSV logs only")

    def _truncate_after(self, step: int) -> None:
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        fields = list(rows[0].keys())
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        self._fields = fields

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (loss terms, lr, samples/s, ...) at optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self._csv_file is None:
            exists = self.csv_path.exists() and self.csv_path.stat().st_size > 0
            if self._fields is None or not exists:
                self._fields = list(row)
            self._csv_file = open(self.csv_path, "a", newline="")
            self._writer = csv.DictWriter(self._csv_file, fieldnames=self._fields,
                                          extrasaction="ignore")
            if not exists:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"train/{name}", float(value), step)

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """tqdm over optimizer steps with loss and samples/s (rank 0 and ``enabled`` only)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StepLog:
    """What a training loop (stage 2's Trainer, fine-tuning's runner) does after each optimizer
    step: advance the loop's position, move the progress bar, write the window's mean losses
    with lr, samples/s and epoch (and ``extra()``) every ``log_every`` steps and at the last
    one, and checkpoint every ``checkpoint_every`` steps (0: only at epoch ends), at each
    epoch's end and at the last step.

    ``loop`` has ``global_step``, ``epoch``, ``step_in_epoch``, ``steps_per_epoch``, ``lr``,
    ``save_checkpoint()``, ``out_dir`` (logs go to ``out_dir/logs``), ``resumed_from`` and
    ``dist.is_main`` (only the main rank logs). :meth:`close` closes the bar and the logs.
    """

    def __init__(self, loop: Any, *, total_steps: int, log_every: int, checkpoint_every: int,
                 progress: bool, desc: str, window: WindowMean | None = None):
        self.loop = loop
        self.total_steps = total_steps
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.metrics = MetricsLogger(Path(loop.out_dir) / "logs", enabled=loop.dist.is_main,
                                     resume_step=loop.resumed_from)
        self.bar = ProgressBar(total_steps, loop.global_step, enabled=progress, desc=desc)
        self.throughput = Throughput()
        self.window = window if window is not None else WindowMean()
        self.means: dict[str, float] = {}  # the window means logged last ({} before any)

    def after_step(self, losses: dict[str, float], samples: int,
                   extra: Callable[[], dict[str, float]] | None = None) -> bool:
        """Book one optimizer step that trained ``samples`` samples (all ranks) with ``losses``
        (a 'loss' entry for the bar); returns whether it ended an epoch."""
        loop = self.loop
        self.throughput.add(samples)
        self.window.add(losses)
        loop.global_step += 1
        loop.step_in_epoch += 1
        end_of_epoch = loop.step_in_epoch == loop.steps_per_epoch
        if end_of_epoch:
            loop.epoch += 1
            loop.step_in_epoch = 0
        self.bar.update(1, loss=losses["loss"], lr=loop.lr,
                        samples_s=f"{self.throughput.overall_rate():.1f}")
        done = loop.global_step >= self.total_steps
        if loop.global_step % self.log_every == 0 or done:
            values = self.window.pop()
            self.means = dict(values)
            values.update(lr=loop.lr, samples_per_s=self.throughput.window_rate(),
                          epoch=loop.global_step / loop.steps_per_epoch)
            if extra is not None:
                values.update(extra())
            self.metrics.log(loop.global_step, values)
        if (self.checkpoint_every and loop.global_step % self.checkpoint_every == 0) \
                or end_of_epoch or done:
            loop.save_checkpoint()
        return end_of_epoch

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
