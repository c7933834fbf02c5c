"""Reliability: stage 2 survives SIGKILL at random steps and a full disk mid-checkpoint.

A killed run is a forked child process (same imports, so it starts in milliseconds) that
SIGKILLs itself at a seeded random point:

    forward            inside step s, after the forward pass (before backward/update)
    update             after step s's optimizer update, before the step is counted/saved
    checkpoint_write   while checkpoint s is being written (half of the temp file on disk)
    checkpoint_done    right after checkpoint s is in place

The parent then reruns the same run (resume) and the final model and optimizer state must equal
those of an uninterrupted run bit for bit (CPU, deterministic settings, one thread). A full disk
is simulated in-process: the checkpoint writer writes half of the file and raises ENOSPC; the
previous checkpoint must stay `last` and loadable, and the run must resume to the same weights.
"""
from __future__ import annotations

import errno
import io
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (
    category,
    fsync_off,
    invoke_cli,
    make_data,
    one_line_error,
    pipeline_yaml,
    record_details,
    run_config,
    save_base_model,
    sigkill_self,
    stage1_config,
    stage1_in_process,
)

pytestmark = pytest.mark.usefixtures("no_fsync", "one_thread")

# 8 samples, batch 2: 4 steps per epoch, 3 epochs = 12 steps; checkpoints at steps 4, 5, 8, 10, 12
RUN = dict(epochs=3, batch_size=2, checkpoint_every=5, keep_checkpoints=2, seed=3, blr=0.05,
           log_every=1)
TOTAL_STEPS = 12
CHECKPOINT_STEPS = (4, 5, 8, 10, 12)
PHASES = ("forward", "update", "checkpoint_write", "checkpoint_done")
FAST_SEEDS = (0,)
SLOW_SEEDS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_crash")
    make_data(tmp / "shards", n_shards=2, per_shard=4)
    base = save_base_model(tmp / "base.safetensors")
    cfg = stage1_config(tmp / "shards", tmp / "cache")
    with fsync_off():
        stage1_in_process(cfg, base)
    return {"tmp": tmp, "cache": str(cfg.cache), "base": base, "shards": str(tmp / "shards")}


def _train(world, out_dir: Path, **overrides):
    from stages.train import train

    return train(run_config(**{**RUN, **overrides}), cache=world["cache"], source=None,
                 base=None, out_dir=out_dir, progress=False)


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run's final checkpoint."""
    from stages.checkpoint import load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = _train(world, world["tmp"] / "reference")
    finally:
        torch.set_num_threads(threads)
    assert summary.steps == TOTAL_STEPS
    return load_checkpoint(world["tmp"] / "reference" / "checkpoints" / "last")


def kill_point(seed: int) -> dict:
    """A seeded random kill point: {'seed', 'phase', 'step'}. The phase cycles with the seed (so
    a few seeds cover every phase); the step is random: the step index being computed for
    forward/update, the checkpoint's step for the checkpoint phases."""
    rng = np.random.default_rng([7, seed])
    phase = PHASES[seed % len(PHASES)]
    if phase in ("forward", "update"):
        step = int(rng.integers(0, TOTAL_STEPS))
    else:
        step = int(rng.choice(CHECKPOINT_STEPS))
    return {"seed": seed, "phase": phase, "step": step}


def _install_kill(point: dict) -> None:
    """Patch the trainer (in the child) to SIGKILL itself at ``point``."""
    from stages import checkpoint, train

    phase, at = point["phase"], point["step"]
    if phase == "forward":
        forward = train.Trainer._forward

        def forward_then_die(self, batch):
            out = forward(self, batch)
            if self.global_step == at:
                sigkill_self()
            return out
        train.Trainer._forward = forward_then_die
    elif phase == "update":
        step = train.Trainer.train_step

        def step_then_die(self, micro):
            out = step(self, micro)
            if self.global_step == at:
                sigkill_self()
            return out
        train.Trainer.train_step = step_then_die
    else:
        save = checkpoint.Checkpointer.save
        real_torch_save = torch.save
        current = {"step": None}

        def half_save(obj, f, *args, **kwargs):
            if current["step"] == at:
                buf = io.BytesIO()
                real_torch_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                sigkill_self()
            return real_torch_save(obj, f, *args, **kwargs)

        def save_and_maybe_die(self, state, step):
            current["step"] = step
            path = save(self, state, step)
            if step == at and phase == "checkpoint_done":
                sigkill_self()
            return path
        checkpoint.Checkpointer.save = save_and_maybe_die
        if phase == "checkpoint_write":
            torch.save = half_save


def _child(world, out_dir: str, point: dict) -> None:
    try:
        torch.set_num_threads(1)
        _install_kill(point)
        _train(world, Path(out_dir))
    except BaseException:  # noqa: BLE001 - the child must never return into pytest
        os._exit(3)
    os._exit(0)


def run_killed(world, out_dir: Path, point: dict, timeout: float = 300) -> int:
    """Run the training in a forked child that SIGKILLs itself at ``point``; its exit code."""
    proc = multiprocessing.get_context("fork").Process(target=_child,
                                                       args=(world, str(out_dir), point))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the killed run did not stop within {timeout} s")
    return proc.exitcode


def compare_final(reference: dict, out_dir: Path) -> list[str]:
    """Differences between the reference's final checkpoint and ``out_dir``'s ([] = equal)."""
    from stages.checkpoint import load_checkpoint

    got = load_checkpoint(out_dir / "checkpoints" / "last")
    diffs = [k for k in ("step", "epoch", "step_in_epoch") if got[k] != reference[k]]
    diffs += [f"model.{k}" for k in reference["model"]
              if not torch.equal(reference["model"][k], got["model"][k])]
    ref_state, got_state = reference["optimizer"]["state"], got["optimizer"]["state"]
    if ref_state.keys() != got_state.keys():
        diffs.append("optimizer state keys")
    else:
        diffs += [f"optimizer.{k}.{n}" for k in ref_state for n in ref_state[k]
                  if not torch.equal(torch.as_tensor(ref_state[k][n]),
                                     torch.as_tensor(got_state[k][n]))]
    return diffs


def _progress(point: dict) -> int:
    """Optimizer steps completed by a run killed at ``point``."""
    return point["step"] + 1 if point["phase"] == "update" else point["step"]


def kill_and_resume(world, reference, out_dir: Path, points: list[dict]) -> dict:
    """Kill the run at each point in turn (each kill resumes the previous one), then finish it;
    returns details, with 'diffs' ([] when the final state equals the reference)."""
    from stages.checkpoint import load_checkpoint

    details = {"kills": []}
    for point in points:
        code = run_killed(world, out_dir, point)
        last = out_dir / "checkpoints" / "last"
        resumed_from = load_checkpoint(last)["step"] if last.exists() else None
        # steps the killed run had completed beyond its last checkpoint: done again on resume
        details["kills"].append({**point, "exit_code": code, "checkpoint_after_kill": resumed_from,
                                 "steps_recomputed": _progress(point) - (resumed_from or 0)})
        assert code == -signal.SIGKILL, f"the child exited with {code}, not SIGKILL"
    summary = _train(world, out_dir)
    details["resumed_from_step"] = summary.resumed_from_step
    assert summary.resumed_from_step == details["kills"][-1]["checkpoint_after_kill"]
    details["diffs"] = compare_final(reference, out_dir)
    details["temp_files_left"] = sorted(p.name for p in (out_dir / "checkpoints").iterdir()
                                        if ".tmp" in p.name)
    return details


def _check(details: dict) -> None:
    assert not details["diffs"], f"final state differs from the reference: {details['diffs']}"


# ------------------------------------------------------------------------------ tests
@category("stage2_crashes")
@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_sigkill_at_a_random_step_resumes_to_identical_weights(world, reference, tmp_path, seed,
                                                              record_property):
    details = kill_and_resume(world, reference, tmp_path / "run", [kill_point(seed)])
    record_details(record_property, **details)
    _check(details)


@pytest.mark.slow
@category("stage2_crashes")
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_sigkill_at_random_steps_resumes_to_identical_weights(world, reference, tmp_path, seed,
                                                             record_property):
    details = kill_and_resume(world, reference, tmp_path / "run", [kill_point(seed)])
    record_details(record_property, **details)
    _check(details)


@pytest.mark.slow
@category("stage2_crashes")
def test_killed_twice_then_resumed_gives_identical_weights(world, reference, tmp_path,
                                                          record_property):
    """A crash, a resume that crashes again (in the middle of a checkpoint write), a resume."""
    points = [{"seed": None, "phase": "update", "step": 2},
              {"seed": None, "phase": "checkpoint_write", "step": 8}]
    details = kill_and_resume(world, reference, tmp_path / "run", points)
    record_details(record_property, **details)
    _check(details)


def test_a_resume_removes_the_temp_file_of_a_killed_checkpoint_write(world, reference, tmp_path):
    out = tmp_path / "run"
    assert run_killed(world, out, {"seed": None, "phase": "checkpoint_write", "step": 5}) \
        == -signal.SIGKILL
    _train(world, out)
    assert not compare_final(reference, out)
    left = sorted(p.name for p in (out / "checkpoints").iterdir() if ".tmp" in p.name)
    assert not left, left


def _full_disk_save(fail_at_call: int, calls: dict):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    return save


@category("stage2_crashes")
@pytest.mark.parametrize("fail_at_call", [3, 1])
def test_a_checkpoint_write_failing_midway_keeps_the_previous_one(world, reference, tmp_path,
                                                                 monkeypatch, fail_at_call,
                                                                 record_property):
    """ENOSPC half-way through checkpoint number ``fail_at_call``: the run stops with the
    error, `last` still points to the previous (complete) checkpoint, no temp file is left,
    and rerunning resumes to the weights of an uninterrupted run."""
    from stages.checkpoint import load_checkpoint

    out = tmp_path / "run"
    calls = {"n": 0}
    monkeypatch.setattr(torch, "save", _full_disk_save(fail_at_call, calls))
    with pytest.raises(OSError) as info:
        _train(world, out)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    failed_step = CHECKPOINT_STEPS[fail_at_call - 1]
    ckpt = out / "checkpoints"
    files = sorted(p.name for p in ckpt.iterdir())
    assert not any(".tmp" in name for name in files), files
    assert f"step_{failed_step:08d}.pt" not in files, files
    if fail_at_call == 1:
        assert not (ckpt / "last").exists()  # nothing to resume from: the rerun starts over
    else:
        previous = CHECKPOINT_STEPS[fail_at_call - 2]
        assert os.readlink(ckpt / "last") == f"step_{previous:08d}.pt"
        assert load_checkpoint(ckpt / "last")["step"] == previous
    summary = _train(world, out)
    record_details(record_property, failed_checkpoint_step=failed_step,
                   resumed_from_step=summary.resumed_from_step, files_after_failure=files,
                   steps_recomputed=failed_step - (summary.resumed_from_step or 0))
    assert summary.resumed_from_step == (None if fail_at_call == 1 else previous)
    diffs = compare_final(reference, out)
    assert not diffs, diffs


def test_tec_train_on_a_full_disk_says_so_in_one_line(world, tmp_path, monkeypatch):
    """The CLI's view of the same failure: exit != 0 and one line naming the disk problem."""
    config = pipeline_yaml(tmp_path / "c.yaml", shards=world["shards"], base=world["base"],
                           cache=world["cache"], workdir=tmp_path / "work",
                           run={"checkpoint_every": 5, "epochs": 1})
    monkeypatch.setattr(torch, "save", _full_disk_save(1, {"n": 0}))
    code, stderr, exc = invoke_cli(["train", config, "--run", "tec"])
    monkeypatch.undo()
    ok, detail = one_line_error(code, stderr, exc, ("No space left on device",))
    assert ok, detail
