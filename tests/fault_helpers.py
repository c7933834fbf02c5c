"""Stage-1 fault injection, installed through the hook API of the shard task.

* :class:`FaultHooks`: stage-1 shard-task callbacks (``run_stage1(..., hooks=FaultHooks(...))``).
  crash_dir: a shard task whose part has a file DIR/<part>.crash renames it to .crashed and kills
  its own worker process half-way through the shard; batch_delay_s: every batch is slowed down
  (to interrupt a run midway); attempts_dir: every attempt at a part leaves a file
  DIR/<part>.<pid>.<ns> (to count retries). The hooks travel to Ray workers inside the shard
  jobs; this module is pickled by value, so workers need not import it.

Subprocess scripts import this module after putting :data:`TESTS` on ``sys.path``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from stages.stage1 import ShardHooks

TESTS = str(Path(__file__).resolve().parent)
logger = logging.getLogger("stages.stage1")


class FaultHooks(ShardHooks):
    def __init__(self, crash_dir=None, batch_delay_s: float = 0.0, attempts_dir=None):
        self.crash_dir = str(crash_dir) if crash_dir else None
        self.batch_delay_s = float(batch_delay_s or 0.0)
        self.attempts_dir = str(attempts_dir) if attempts_dir else None

    def __repr__(self) -> str:
        return (f"FaultHooks(crash_dir={self.crash_dir!r}, batch_delay_s={self.batch_delay_s}, "
                f"attempts_dir={self.attempts_dir!r})")

    def attempt(self, job) -> None:
        if self.attempts_dir:
            Path(self.attempts_dir, f"{job.part}.{os.getpid()}.{time.monotonic_ns()}").touch()

    def sample(self, job, slot: int) -> None:
        if self.crash_dir and slot == job.slots // 2:
            marker = Path(self.crash_dir) / f"{job.part}.crash"
            if marker.exists():
                marker.rename(marker.with_suffix(".crashed"))
                logger.warning("test hook: killing the worker of part %s", job.part)
                os._exit(1)

    def batch(self, job) -> None:
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)


try:  # Ray workers cannot import this test module: send FaultHooks by value
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:
    pass
