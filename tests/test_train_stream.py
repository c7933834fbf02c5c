"""Stage 2 with ``read: stream``: a self-contained WebDataset cache read sequentially.

Exact replay, every sample once per epoch over ranks and loader workers, the same steps per
epoch on every rank, resume equal to the uninterrupted run, and the one-line refusals."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import VIEWS, build_cache, make_data, run_config, save_base_model

from stages.checkpoint import load_checkpoint
from stages.configs import ConfigError
from stages.loader import StreamingCacheDataset, cached_to_device, make_loader, shuffle_order
from stages.train import TrainSetupError, train
from stages.views import ViewPolicy
from storage import open_cache
from storage.pixels import decode_pixels

STREAM = dict(read="stream", view_selection="round_robin", shuffle_buffer=5)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 source shards of 6 (18 samples), a base model, a self-contained WebDataset cache (int8)
    and, for the refusals, a WebDataset cache without pixels and a Zarr cache with pixels."""
    tmp = tmp_path_factory.mktemp("stream")
    shards = make_data(tmp, n_shards=3, per_shard=6)
    base = save_base_model(tmp / "base.safetensors")
    return dict(tmp=tmp, shards=shards, base=base,
                cache=build_cache(tmp / "wds-jpeg", shards, base, backend="webdataset",
                                  codec="int8", pixels="jpeg"))


def _dataset(reader, **kwargs) -> StreamingCacheDataset:
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    return StreamingCacheDataset(reader, policy=policy, seed=kwargs.pop("seed", 3), num_patches=16,
                                 k=4, attention=True, **kwargs)


def _delivered(stream: StreamingCacheDataset, epoch: int, step: int, workers: int) -> list:
    """The micro-batches a DataLoader with ``workers`` workers delivers from (epoch, step) on:
    round robin over its workers, worker w serving stream (w + J) % W (StreamingCacheDataset)."""
    J = step * stream.accum
    per_worker = [list(stream.stream_batches(epoch, step, (w + J) % workers, workers))
                  for w in range(workers)]
    out = []
    for i in range(max(len(b) for b in per_worker)):
        out += [b[i] for b in per_worker if i < len(b)]
    return out


def test_shuffle_order_is_a_seeded_permutation_within_the_buffer():
    order = shuffle_order(50, 8, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(50))
    assert order.tolist() != list(range(50))
    assert np.array_equal(order, shuffle_order(50, 8, np.random.default_rng(0)))
    # an item leaves no earlier than it arrives, and at most buffer - 1 items overtake the
    # stream: output t is one of the first t + buffer inputs
    assert all(order[t] < t + 8 for t in range(50))
    assert shuffle_order(5, 1, np.random.default_rng(0)).tolist() == list(range(5))


@pytest.mark.parametrize("world_size,accum,workers", [(2, 2, 3), (2, 1, 2), (1, 3, 1)])
def test_every_sample_once_per_epoch_over_ranks_and_workers_and_resume_continues(
        world, world_size, accum, workers):
    reader = open_cache(world["cache"])  # 18 samples in 3 parts
    micro = 2
    streams = [_dataset(reader, batch_size=micro, accum_steps=accum, rank=r, world=world_size,
                        shuffle_buffer=4) for r in range(world_size)]
    steps = 18 // (micro * accum * world_size)
    assert all(s.steps == steps for s in streams)
    for epoch in (0, 1):
        full = [_delivered(s, epoch, 0, workers) for s in streams]
        assert [len(f) for f in full] == [steps * accum] * world_size  # same steps on each rank
        seen = [i for f in full for b in f for i in b.indices.tolist()]
        assert len(seen) == len(set(seen)) == steps * accum * world_size * micro  # once each
        assert all(b.views == [epoch % VIEWS] * micro for f in full for b in f)
        for s, batches in zip(streams, full):
            for step in range(1, steps):  # a resume at any step continues with the same batches
                tail = _delivered(s, epoch, step, workers)
                assert [b.indices.tolist() for b in tail] == \
                    [b.indices.tolist() for b in batches[step * accum:]]
        if epoch == 0:
            first = seen
    assert first != seen  # another order (and view) in the next epoch


def test_the_dataloader_workers_deliver_the_simulated_order_and_see_the_position(world):
    reader = open_cache(world["cache"])
    stream = _dataset(reader, batch_size=3, shuffle_buffer=4)  # 6 steps per epoch
    from stages.loader import LoaderSettings

    loader = make_loader(stream, LoaderSettings(2, 2, True, False, "test"))
    got = []
    for epoch, step in ((0, 0), (1, 3), (1, 4)):  # persistent workers: the position is shared
        stream.set_position(epoch, step)
        got.append([b.indices.tolist() for b in loader])
        assert got[-1] == [b.indices.tolist() for b in _delivered(stream, epoch, step, 2)]
    assert got[1][1:] == got[2] and sorted(sum(got[0], [])) == list(range(18))


def test_stream_training_replays_exactly_the_cached_views(world, tmp_path):
    reader = open_cache(world["cache"])
    seen: list[tuple[int, list[int]]] = []

    def check(trainer, batches):
        for batch in batches:
            view = trainer.epoch % VIEWS
            assert batch.views == [view] * len(batch) and not batch.fresh.any()
            assert batch.images.dtype == torch.uint8
            targets = cached_to_device(batch.cached, torch.device("cpu"), k=4)
            for r, i in enumerate(batch.indices.tolist()):
                stored = reader.read(i, view, decode=False)
                pixels = torch.from_numpy(decode_pixels(stored["pixels"])).permute(2, 0, 1)
                assert torch.equal(batch.images[r], pixels)
                assert torch.equal(batch.cached["features"][r],
                                   torch.from_numpy(np.asarray(stored["features"])))
                decoded = reader.read(i, view)
                assert torch.allclose(targets["features"][r],
                                      torch.from_numpy(decoded["features"]), atol=1e-6)
                assert torch.allclose(targets["attn_logits"][r],
                                      torch.from_numpy(decoded["attn_logits"][:, :5]), atol=1e-5)
            seen.append((trainer.epoch, batch.indices.tolist()))

    summary = train(run_config("s", epochs=2, batch_size=4, **STREAM), cache=world["cache"],
                    base=world["base"], out_dir=tmp_path, progress=False, on_batches=check)
    assert summary.steps == 8 and summary.cached_samples == 32 and summary.online_samples == 0
    for epoch in (0, 1):
        used = [i for e, b in seen if e == epoch for i in b]
        assert len(used) == len(set(used)) == 16  # 18 // 4 steps of 4, 2 dropped
    state = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert state["data"]["read"] == "stream"
    assert state["data"]["stream"] == {"ranks": 1, "workers": 1, "shuffle_buffer": 5}


def _steps(out: Path) -> list[tuple[int, str]]:
    with open(out / "logs" / "metrics.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("workers,accum", [(3, 1), (0, 2)])
def test_resume_mid_epoch_equals_the_uninterrupted_run(world, tmp_path, workers, accum):
    run = dict(epochs=3, batch_size=4, accum_steps=accum, num_workers=workers, seed=1,
               deterministic=True, **STREAM)
    keys: dict[str, list] = {"straight": [], "resumed": []}

    def log(name):
        return lambda trainer, batches: keys[name].append(
            (trainer.global_step, [k for b in batches for k in b.keys]))

    straight = train(run_config(**run), cache=world["cache"], out_dir=tmp_path / "a",
                     progress=False, on_batches=log("straight"))
    # stopped after step 5 (epoch 1, step 1: a mid-epoch checkpoint), then resumed; a resume
    # with num_workers unset continues with the checkpoint's 3 loader workers
    train(run_config(**dict(run, max_steps=5)), cache=world["cache"], out_dir=tmp_path / "b",
          progress=False)
    resumed = train(run_config(**dict(run, num_workers=None if workers == 3 else workers)),
                    cache=world["cache"], out_dir=tmp_path / "b", progress=False,
                    on_batches=log("resumed"))
    assert straight.steps == resumed.steps == 12 and resumed.resumed_from_step == 5
    assert resumed.samples == 7 * 4  # only what was left
    assert keys["resumed"] == keys["straight"][5:]
    assert _steps(tmp_path / "b") == _steps(tmp_path / "a")  # every step's loss, to the digit
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_resume_with_another_read_mode_or_stream_layout_is_refused(world, tmp_path):
    run = dict(epochs=2, batch_size=4, max_steps=1, num_workers=2, **STREAM)
    train(run_config(**run), cache=world["cache"], out_dir=tmp_path, progress=False)
    with pytest.raises(TrainSetupError, match=r"changed: read stream -> random"):
        train(run_config(**dict(run, read="random")), cache=world["cache"], out_dir=tmp_path,
              progress=False)
    with pytest.raises(TrainSetupError, match=r"read: stream: checkpoint .* 1 rank\(s\) x 2 "
                                              r"loader worker\(s\).* 1 x 1 .*num_workers"):
        train(run_config(**dict(run, num_workers=1)), cache=world["cache"], out_dir=tmp_path,
              progress=False)


def test_a_checkpoint_of_another_read_mode_is_refused_without_the_identity(world, tmp_path):
    from stages.train.trainer import Trainer

    train(run_config(epochs=2, batch_size=4, max_steps=1), cache=world["cache"],
          out_dir=tmp_path, progress=False)  # read: random
    trainer = Trainer.__new__(Trainer)
    trainer.run, trainer.stream = run_config(**STREAM), None
    state = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert state["data"]["read"] == "random" and state["data"]["stream"] is None
    with pytest.raises(TrainSetupError, match=r"^read: checkpoint .* read: random, this run has "
                                              r"read: stream"):
        trainer._check_read_mode(state, "ckpt")
    del state["data"]["read"]  # written before read modes existed: random access
    with pytest.raises(TrainSetupError, match="read: random"):
        trainer._check_read_mode(state, "ckpt")


@pytest.mark.parametrize("values,match", [
    (dict(online_fraction=0.5), r"^read: stream reads cached views only.*online_fraction 0.5"),
    (dict(view_selection="uniform"), r"^read: stream .*view_selection: uniform cannot"),
    (dict(model=dict(target="pixel")), r"^read: stream reads the target cache; a pixel-target"),
    (dict(shuffle_buffer=0), r"^shuffle_buffer: must be >= 1"),
    (dict(read="sequential"), r"read"),
])
def test_stream_settings_it_cannot_honour_are_one_line_config_errors(values, match):
    with pytest.raises(ConfigError, match=match) as info:
        run_config(**{**STREAM, **values}).validate()
    assert "\n" not in str(info.value)


def test_stream_refuses_a_zarr_cache_or_one_without_pixels(world, tmp_path):
    shards = world["shards"][:1]
    zarr = build_cache(tmp_path / "zarr", shards, world["base"], pixels="jpeg")
    plain = build_cache(tmp_path / "plain", shards, world["base"], backend="webdataset")
    with pytest.raises(TrainSetupError, match=r"^read: stream reads WebDataset caches; cache "
                                              r".* is zarr.*set read: random$"):
        train(run_config(**STREAM), cache=zarr, out_dir=tmp_path / "r1", progress=False)
    with pytest.raises(TrainSetupError, match=r"^read: stream needs a self-contained cache.*"
                                              r"targets.pixels: none"):
        train(run_config(**STREAM), cache=plain, out_dir=tmp_path / "r2", progress=False)
