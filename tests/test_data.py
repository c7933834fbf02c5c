"""stages/data.py without a cache: source index, sample plan, sampler, mask noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from image_helpers import encode, make_bad_shard, make_shards, smooth_image, write_tar

from stages.data import DataError, PlanSampler, SamplePlan, SourceIndex, mask_noise
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
    for i, (_key, data, label) in enumerate(expected):
        assert index.read_bytes(i) == data
        assert index.labels[i] == label
    # the saved index is reused, and rebuilt when a shard changes
    again = SourceIndex.load_or_build("webdataset", shards, tmp_path / "index.npz")
    assert again.keys == index.keys and np.array_equal(again.offsets, index.offsets)
    make_shards(tmp_path / "src", n_shards=1, per_shard=3, seed=5)
    changed = SourceIndex.load_or_build("webdataset", shards, tmp_path / "index.npz")
    assert len(changed) == len(index) - 2


def test_source_index_groups_tar_members_as_the_source_and_keeps_what_it_can_read(tmp_path):
    jpg = encode(smooth_image(np.random.default_rng(5), 16, 16), "JPEG")
    # x.pth stands alone: pickle fields are passed over, so the later x.jpg is not a repeat
    members = [("a.jpg", jpg), ("a.cls", b"1"), ("x.pth", b"p"), ("b.jpg", jpg), ("b.cls", b"2"),
               ("x.jpg", jpg), ("x.cls", b"3"), ("a.jpg", jpg), ("c.jpg", jpg), ("c.cls", b"4")]
    infos = {f"{i}:{m.name}": m for i, m in enumerate(write_tar(tmp_path / "s.tar", members))}
    path = str(tmp_path / "s.tar")
    source = WebDatasetSource(path)
    index = SourceIndex.build("webdataset", [path])
    assert index.keys == ["a", "b", "x", "c"] == [s.key for s in source.samples(path)
                                                  if s.error is None]
    assert index.labels.tolist() == [1, 2, 3, 4]
    # cut inside c.cls's header: the source reports c (it may have lost its label); the index
    # keeps c's complete image, label unknown, and training finds it missing from the cache
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: infos["9:c.cls"].offset + 100])
    assert [(s.key, s.error is None) for s in source.samples(path)][-2:] == [("a", False),
                                                                            ("c", False)]
    index = SourceIndex.build("webdataset", [path])
    assert index.keys == ["a", "b", "x", "c"] and index.labels.tolist() == [1, 2, 3, -1]
    assert index.read_bytes(3) == jpg
    # cut inside c.jpg's data: c's image is lost for both
    (tmp_path / "s.tar").write_bytes(data[: infos["8:c.jpg"].offset_data + 10])
    assert SourceIndex.build("webdataset", [path]).keys == ["a", "b", "x"]
    (tmp_path / "s.tar").write_bytes(b"not a tar archive " * 64)
    with pytest.raises(DataError, match="cannot be read as an uncompressed tar"):
        SourceIndex.build("webdataset", [path])


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
