"""stages/checkpoint.py: atomic, rotated checkpoints that restore the RNG state."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from stages.checkpoint import Checkpointer, capture_rng_state, load_checkpoint, restore_rng_state


def test_checkpoints_are_atomic_rotated_and_restore_rng(tmp_path):
    import random

    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    assert ckpt.latest() is None
    for step in (2, 4, 6):
        rng = capture_rng_state()
        path = ckpt.save({"step": step, "w": torch.full((3,), float(step)), "rng": [rng]}, step)
    expected = (torch.rand(3), np.random.rand(), random.random())
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["last", "step_00000004.pt", "step_00000006.pt"]  # no temp files left
    assert os.path.islink(tmp_path / "ck" / "last") and ckpt.latest() == path.resolve()
    state = load_checkpoint(tmp_path / "ck" / "last")  # weights_only load
    assert state["step"] == 6 and torch.equal(state["w"], torch.full((3,), 6.0))
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    restore_rng_state(state["rng"][0])
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_checkpoint_temp_files_of_killed_writes_are_removed_and_a_failed_write_says_so(
        tmp_path, monkeypatch):
    import errno

    from stages.checkpoint import CheckpointWriteError

    directory = tmp_path / "ck"
    directory.mkdir()
    for name in (".step_00000008.pt.tmp-12345", ".last.tmp-12345"):
        (directory / name).write_bytes(b"partial")
    (directory / "notes.tmp-1").write_text("not ours")
    ckpt = Checkpointer(directory, keep=2)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.tmp-1"]
    Checkpointer(tmp_path / "other", is_writer=False)  # a reader rank touches nothing
    assert not (tmp_path / "other").exists()
    first = ckpt.save({"step": 4}, 4)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.save({"step": 8}, 8)
    exc = info.value
    assert isinstance(exc, OSError) and isinstance(exc, ValueError) and exc.errno == errno.ENOSPC
    message = str(exc)
    assert "\n" not in message and "step_00000008.pt" in message
    assert "No space left on device" in message and str(first) in message
    assert "free space and rerun to resume" in message
    assert sorted(p.name for p in directory.iterdir()) == ["last", "notes.tmp-1", first.name]
    assert ckpt.latest() == first.resolve()
