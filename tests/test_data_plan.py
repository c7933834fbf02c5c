"""Stage-2 data plumbing without a cache: source index, sample plan, sampler, optimizer, checkpoints."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from image_helpers import make_bad_shard, make_shards
from stages.checkpoint import Checkpointer, capture_rng_state, load_checkpoint, restore_rng_state
from stages.data import DataError, PlanSampler, SamplePlan, SourceIndex, mask_noise
from stages.optim import LRSchedule, param_groups, scaled_lr
from stages.sources import WebDatasetSource


def test_source_index_matches_the_webdataset_source(tmp_path):
    shards = make_shards(tmp_path / "src", n_shards=2, per_shard=5)
    bad = str(tmp_path / "bad.tar")
    make_bad_shard(bad)
    shards = shards + [bad]
    index = SourceIndex.load_or_build("webdataset", shards, tmp_path / "index.npz")
    source = WebDatasetSource(shards)
    expected = [(s.key, s.data, s.label) for shard in shards for s in source.samples(shard)
                if s.error is None]
    assert index.keys == [k for k, _, _ in expected]
    for i, (key, data, label) in enumerate(expected):
        assert index.read_bytes(i) == data
        assert index.labels[i] == label
    # the saved index is reused, and rebuilt when a shard changes
    again = SourceIndex.load_or_build("webdataset", shards, tmp_path / "index.npz")
    assert again.keys == index.keys and np.array_equal(again.offsets, index.offsets)
    make_shards(tmp_path / "src", n_shards=1, per_shard=3, seed=5)
    changed = SourceIndex.load_or_build("webdataset", shards, tmp_path / "index.npz")
    assert len(changed) == len(index) - 2


def _plan(n=40, **kw):
    args = dict(cache_index=np.arange(n), views=4, seed=3, online_fraction=0.0,
                can_compute_online=True)
    args.update(kw)
    return SamplePlan(n, **args)


def test_plan_is_deterministic_per_epoch_and_fraction_is_respected():
    plan = _plan(2000, online_fraction=0.3)
    i0, v0, f0 = plan.epoch(0)
    i0b, v0b, f0b = _plan(2000, online_fraction=0.3).epoch(0)
    assert np.array_equal(i0, i0b) and np.array_equal(v0, v0b) and np.array_equal(f0, f0b)
    i1, _, _ = plan.epoch(1)
    assert not np.array_equal(i0, i1) and sorted(i0) == sorted(i1) == list(range(2000))
    assert abs(f0.mean() - 0.3) < 0.05
    assert (v0[f0] == 4).all() and ((v0[~f0] >= 0) & (v0[~f0] < 4)).all()  # fresh view K + epoch
    assert set(v0[~f0]) == {0, 1, 2, 3}
    _, v_rr, _ = _plan(10, view_selection="round_robin").epoch(6)
    assert (v_rr == 6 % 4).all()


def test_plan_missing_samples_go_online_or_are_skipped():
    index = np.arange(10)
    index[[2, 5]] = -1
    online = _plan(10, cache_index=index)
    _, views, fresh = online.epoch(0)
    order = online.epoch(0)[0]
    assert fresh[np.isin(order, [2, 5])].all() and not fresh[~np.isin(order, [2, 5])].any()
    skipped = _plan(10, cache_index=index, can_compute_online=False)
    assert len(skipped) == 8 and skipped.skipped_per_epoch == 2
    assert not np.isin(skipped.epoch(0)[0], [2, 5]).any()
    with pytest.raises(DataError, match="no base model"):
        _plan(10, cache_index=None, can_compute_online=False)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_sampler_ranks_are_disjoint_and_resume_skips_exactly_what_was_consumed(world, accum):
    plan = _plan(100)
    batch = 12 if world * accum != 6 else 18
    samplers = [PlanSampler(plan, batch_size=batch, accum_steps=accum, world_size=world, rank=r)
                for r in range(world)]
    steps = samplers[0].steps
    index, _, _ = plan.epoch(2)
    per_rank = []
    for s in samplers:
        s.set_position(2, 0)
        per_rank.append([it.index for it in s])
    micro = batch // (world * accum)
    for step in range(steps):  # every step consumes exactly items [step*B, (step+1)*B)
        got = sorted(i for r in range(world)
                     for i in per_rank[r][step * accum * micro:(step + 1) * accum * micro])
        assert got == sorted(index[step * batch:(step + 1) * batch])
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == steps * batch
    for r, s in enumerate(samplers):
        s.set_position(2, 3)
        assert [it.index for it in s] == per_rank[r][3 * accum * micro:]
        assert len(s) == len(per_rank[r]) - 3 * accum * micro


def test_sampler_refuses_indivisible_batch_and_tiny_data():
    with pytest.raises(DataError, match="not divisible"):
        PlanSampler(_plan(100), batch_size=10, world_size=3)
    with pytest.raises(DataError, match="fewer than batch_size"):
        PlanSampler(_plan(5), batch_size=8)


def test_mask_noise_depends_only_on_seed_epoch_sample():
    a = mask_noise(0, 1, 7, 16)
    assert torch.equal(a, mask_noise(0, 1, 7, 16))
    assert not torch.equal(a, mask_noise(0, 2, 7, 16))
    assert not torch.equal(a, mask_noise(1, 1, 7, 16))


def test_lr_schedule_matches_mae_adjust_learning_rate():
    def mae(epoch, lr, min_lr, warmup, epochs):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

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
