"""Training checkpoints: atomic writes, rotation, and the state needed for an exact resume.

Layout under ``<out_dir>/checkpoints/``::

    step_00000120.pt     one file per saved optimizer step (the newest ``keep`` are kept)
    last                 symlink to the newest complete file (replaced atomically)

A file is written to a temporary name, fsynced, then ``os.replace``d into place, and only then
does ``last`` move to it, so a crash at any moment leaves ``last`` pointing at a complete
checkpoint. Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.layout import fsync_directory
from storage.util import first_line

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointFormatError",
    "CheckpointWriteError",
    "Checkpointer",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
]

FORMAT = "tec-train-checkpoint"
VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
# the temp names save() writes a step file and the `last` link under before renaming them
_STEP_TMP_FILE = re.compile(r"^\.(step_\d{8,}\.pt|last)\.tmp-\d+$")


class CheckpointFormatError(ValueError):
    """A file is not a stage-2 training checkpoint (one line naming it)."""


class CheckpointWriteError(OSError, ValueError):
    """Writing a checkpoint failed (disk full, I/O error): one line naming the file, the checkpoint
    that is kept and what to do. An OSError with the original errno, and a ValueError so that the
    CLI reports it as a user error (one line, no traceback)."""

    def __init__(self, errno_: int | None, message: str, filename: str | None = None):
        super().__init__(errno_, message)
        self.message = message
        self.filename = filename

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.errno, self.message, self.filename)


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and the current CUDA device, as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.array(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _to_tuple(value):
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Checkpointer` on the CPU (weights_only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last" if (path / "checkpoints").is_dir() else path / "last"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise CheckpointFormatError(f"{path}: not a readable training checkpoint "
                                    f"({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{path}: not a stage-2 training checkpoint (no '{FORMAT}' marker); "
            "pass a file from <run>/checkpoints/"
        )
    return state


class Checkpointer:
    """Saves and finds training checkpoints in ``directory`` (rank 0 writes, every rank reads)."""

    def __init__(self, directory: str | Path, *, keep: int = 2, is_writer: bool = True):
        self.directory = Path(directory)
        self.keep = max(int(keep), 1)
        self.is_writer = is_writer
        if is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()

    @property
    def last_path(self) -> Path:
        return self.directory / "last"

    def latest(self) -> Path | None:
        """The file ``last`` points to, or None when there is no checkpoint yet."""
        last = self.last_path
        if last.is_symlink() or last.exists():
            target = last.resolve()
            if target.is_file():
                return target
            logger.warning("%s points to missing %s; ignoring it", last, target)
        return None

    def load_latest(self) -> dict[str, Any] | None:
        path = self.latest()
        if path is None:
            return None
        state = load_checkpoint(path)
        state["_path"] = str(path)
        return state

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as ``step_<step>.pt`` atomically, move ``last`` to it, rotate old files.

        Only the writer rank touches the disk; other ranks return the path it will have.
        """
        path = self.directory / f"step_{step:08d}.pt"
        if not self.is_writer:
            return path
        payload = {"format": FORMAT, "version": VERSION, **state}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise self._write_error(exc, path) from exc
        finally:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError as exc:
                    logger.warning("could not remove partial checkpoint %s (%s)", tmp, exc)
        link_tmp = self.directory / f".last.tmp-{os.getpid()}"
        try:
            if link_tmp.is_symlink() or link_tmp.exists():
                link_tmp.unlink()
            os.symlink(path.name, link_tmp)
            os.replace(link_tmp, self.last_path)
        except OSError as exc:
            if link_tmp.is_symlink():
                link_tmp.unlink(missing_ok=True)
            raise self._write_error(exc, self.last_path) from exc
        fsync_directory(self.directory)
        self._rotate(keep_also=path)
        logger.info("saved checkpoint %s", path)
        return path

    def _write_error(self, exc: OSError, path: Path) -> CheckpointWriteError:
        """The one-line error for a failed write of ``path`` (the previous checkpoint is kept)."""
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is kept" if previous is not None
                else "no earlier checkpoint exists, so a rerun starts from step 0")
        reason = exc.strerror or str(exc) or type(exc).__name__
        return CheckpointWriteError(
            exc.errno, f"writing checkpoint {path} failed: {reason}; {kept}; "
            "free space and rerun to resume", str(path))

    def _remove_stale_temp_files(self) -> None:
        """Delete partial step files left by a write that was killed half-way (they are never
        read: only complete files are renamed into place)."""
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        for p in entries:
            if _STEP_TMP_FILE.match(p.name):
                try:
                    p.unlink()
                    logger.info("removed partial checkpoint %s left by an interrupted write", p)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    logger.warning("could not remove partial checkpoint %s (%s)", p, exc)

    def _rotate(self, keep_also: Path) -> None:
        files = sorted(
            (int(m.group(1)), p) for p in self.directory.iterdir()
            if (m := _STEP_FILE.match(p.name))
        )
        for _, old in files[: max(len(files) - self.keep, 0)]:
            if old != keep_also:
                old.unlink(missing_ok=True)
        self._remove_stale_temp_files()

