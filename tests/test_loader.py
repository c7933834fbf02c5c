"""Stage-2 input path: view pixels in the cache, batched reads, device dequantisation, settings."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from train_helpers import K_MAX, VIEWS, Source, build_cache, make_data, run_config, save_base_model

from stages.data import (
    CacheRead,
    PlanItem,
    ReplayMismatchError,
    SourceIndex,
    TargetBuilder,
    TrainDataset,
)
from stages.loader import BatchedTrainDataset, cached_to_device, loader_settings
from stages.views import ViewPolicy
from storage import CacheError, CacheSpec, create_cache, open_cache


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SETTINGS = [("zarr", "none", "float16"), ("zarr", "jpeg", "float16"), ("zarr", "png", "int8"),
            ("webdataset", "jpeg", "int8"), ("webdataset", "png", "float16"),
            ("zarr", "jpeg", "lowrank")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Source shards, a base model, and one cache per (backend, pixels, codec) setting, with
    the uint8 views stage 1 fed the base model captured."""
    tmp = tmp_path_factory.mktemp("loader")
    shards = sorted(make_data(tmp, n_shards=2, per_shard=4))
    base = save_base_model(tmp / "base.safetensors")
    caches, captured = {}, {}
    for backend, pixels, codec in SETTINGS:
        name = f"{backend}-{pixels}-{codec}"
        captured[name] = []
        caches[name] = build_cache(tmp / name, shards, base, backend=backend, codec=codec,
                                   pixels=pixels, pixels_quality=75, capture=captured[name])
    return dict(tmp=tmp, shards=shards, base=base, caches=caches, captured=captured,
                index=SourceIndex.build("webdataset", shards))


def _batched(world, name, *, source=True, k=4):
    reader = open_cache(world["caches"][name])
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    index = world["index"]
    if source:
        positions = {key: i for i, key in enumerate(reader.keys)}
        cache_index = np.array([positions.get(key, -1) for key in index.keys])
        items = TrainDataset(index, policy, seed=0, num_patches=16,
                             cache=CacheRead(world["caches"][name], cache_index, k, True,
                                             reader.spec.codec == "float16"))
        keys = index.keys
    else:
        cache_index, items, keys = np.arange(reader.num_samples), None, reader.keys
    return BatchedTrainDataset(reader=reader, cache_index=cache_index, keys=keys, policy=policy,
                               seed=0, num_patches=16, k=k, attention=True, items=items), reader


@pytest.mark.parametrize("backend,pixels,codec", SETTINGS)
def test_replayed_pixels_are_what_stage1_fed_the_base_model(world, backend, pixels, codec):
    name = f"{backend}-{pixels}-{codec}"
    dataset, reader = _batched(world, name, source=pixels == "none")
    fed = torch.cat(world["captured"][name])  # stage 1's base-model input, K views per sample
    n = reader.num_samples
    items = [PlanItem(epoch=0, index=i, view=v, fresh=False)
             for i in range(n) for v in range(VIEWS)]
    batch = dataset.__getitems__(items)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == fed.shape
    assert torch.equal(batch.images, fed)
    assert batch.keys == [reader.keys[i] for i in range(n) for _ in range(VIEWS)]
    targets = cached_to_device(batch.cached, torch.device("cpu"), k=4)
    # lowrank: features are a matmul of the factors, on the device as in the codec (to rounding)
    same = torch.equal if codec != "lowrank" else lambda a, b: torch.allclose(a, b, atol=1e-5)
    for r, it in enumerate(items):
        record = reader.read(it.index, it.view)
        assert same(targets["features"][r], torch.from_numpy(record["features"]))
        assert same(targets["attn_logits"][r], torch.from_numpy(record["attn_logits"][:, :5]))
        assert torch.equal(targets["attn_index"][r], torch.from_numpy(record["attn_index"][:4]))
        assert torch.equal(targets["feature_mean"][r], torch.from_numpy(record["feature_mean"]))


@pytest.mark.parametrize("pixels", ["jpeg", "png"])
def test_cached_targets_match_the_base_model_on_the_replayed_pixels(world, pixels):
    """The targets stored for a jpeg view were computed on the decode of its stored bytes: the
    base model run online on stage 2's pixels gives the same targets (to float16 rounding)."""
    from tec.targets import normalize_images

    name = {"jpeg": "zarr-jpeg-float16", "png": "webdataset-png-float16"}[pixels]
    dataset, reader = _batched(world, name, source=False)
    items = [PlanItem(0, i, i % VIEWS, False) for i in range(reader.num_samples)]
    batch = dataset.__getitems__(items)
    builder = TargetBuilder(base_model=world["base"].load(), k=4, mode="patch", attention=True,
                            last_n=2, k_max=K_MAX)
    images = normalize_images(batch.images)
    cached = builder(images, batch)
    online = builder.online(images)
    assert torch.equal(cached.attn_index, online.attn_index[:, :4])
    assert torch.allclose(cached.features, online.features, rtol=2e-3, atol=2e-3)


def test_jpeg_pixels_are_the_decode_of_the_stored_bytes_not_the_render(world):
    from storage.pixels import decode_pixels

    dataset, reader = _batched(world, "zarr-jpeg-float16")
    item = PlanItem(0, 0, 1, False)
    stored = reader.read(0, 1)["pixels"]
    image = dataset.__getitems__([item]).images[0]
    assert torch.equal(image, torch.from_numpy(decode_pixels(stored)).permute(2, 0, 1))
    rendered = dataset.items[PlanItem(0, 0, 1, True)]["image"]  # a fresh render from the source
    assert not torch.equal(image, rendered)  # quality 75 is lossy
    assert (image.float() - rendered.float()).abs().mean() < 12


def test_mixed_batch_keeps_row_order_and_renders_fresh_views_from_the_source(world):
    dataset, reader = _batched(world, "zarr-png-int8")
    items = [PlanItem(0, 0, 0, False), PlanItem(0, 1, 5, True), PlanItem(0, 2, 1, False)]
    batch = dataset.__getitems__(items)
    assert batch.fresh.tolist() == [False, True, False]
    assert torch.equal(batch.images[1], dataset.items[items[1]]["image"])
    assert torch.equal(batch.noise[1], dataset.items[items[1]]["noise"])
    assert batch.cached["features"].shape[0] == 2 and batch.cached["features"].dtype == torch.int8
    targets = cached_to_device(batch.cached, torch.device("cpu"), k=4)
    assert torch.equal(targets["features"][1], torch.from_numpy(reader.read(2, 1)["features"]))


def test_replay_refuses_a_recorded_view_that_disagrees_with_the_policy(world):
    dataset, _ = _batched(world, "zarr-jpeg-float16", source=False)
    dataset.policy = ViewPolicy(seed=1, output_size=32)
    with pytest.raises(ReplayMismatchError, match="rebuild the cache"):
        dataset.__getitems__([PlanItem(0, 0, 0, False)])


@pytest.mark.parametrize("name", ["zarr-png-int8", "webdataset-jpeg-int8", "zarr-jpeg-float16"])
def test_read_batch_equals_read_per_record(world, name):
    reader = open_cache(world["caches"][name])
    samples = np.array([3, 0, 5, 0, 7])
    views = np.array([1, 0, 0, 1, 1])
    batch = reader.read_batch(samples, views, pixels=True)
    for j, (i, v) in enumerate(zip(samples, views)):
        record = reader.read(int(i), int(v), decode=False)
        for field, value in record.items():
            if field in ("key", "view", "label", "source_size"):
                continue
            assert np.array_equal(np.asarray(batch[field][j]), np.asarray(value)), field
    only = reader.read_batch(samples, views, ["features"])
    assert set(only) == {"features"}
    with pytest.raises(CacheError, match="no stored field"):
        reader.read_batch(samples, views, ["pixels_of_nothing"])


def test_read_batch_of_a_cache_without_pixels_refuses_pixels(world):
    reader = open_cache(world["caches"]["zarr-none-float16"])
    with pytest.raises(CacheError, match="stores no view pixels"):
        reader.read_batch([0], [0], pixels=True)


def test_reader_pickles_without_reopening(world):
    import pickle

    reader = open_cache(world["caches"]["zarr-jpeg-float16"])
    reader.read(0, 0)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.keys == reader.keys
    assert bytes(clone.read(1, 1)["pixels"]) == bytes(reader.read(1, 1)["pixels"])


def test_pixels_are_part_of_the_cache_identity(tmp_path):
    kwargs = dict(base_model={"arch": "x"}, view_policy={"seed": 0}, source={"shards": []},
                  parts=[("p0", 1)])
    spec = CacheSpec(num_patches=4, channels=8, heads=2, k_max=2, views=1)
    create_cache(tmp_path / "c", spec, **kwargs)
    assert "pixels" not in spec.to_dict()  # caches without pixels keep their identity
    with pytest.raises(CacheError, match="spec.image_size.*spec.pixels"):
        create_cache(tmp_path / "c", CacheSpec(num_patches=4, channels=8, heads=2, k_max=2,
                                               views=1, pixels="jpeg", image_size=8), **kwargs)
    with pytest.raises(CacheError, match="pixels_quality"):
        CacheSpec(num_patches=4, channels=8, heads=2, k_max=2, views=1, pixels="jpeg",
                  pixels_quality=101, image_size=8)
    with pytest.raises(CacheError, match="pixels='webp'"):
        CacheSpec(num_patches=4, channels=8, heads=2, k_max=2, views=1, pixels="webp")


def test_cached_to_device_dequantises_int8_like_the_cpu_decoder():
    from storage.codecs import dequantize_rows, quantize_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 24)).astype(np.float32)
    logits = rng.normal(size=(3, 2, 5, 16)).astype(np.float32)
    q, s = quantize_rows(x)
    ql, sl = quantize_rows(logits)
    cached = {"features": torch.from_numpy(q), "features_scale": torch.from_numpy(s),
              "feature_mean": torch.zeros(3, 24), "feature_std": torch.ones(3, 24),
              "attn_logits": torch.from_numpy(ql), "attn_logits_scale": torch.from_numpy(sl),
              "attn_index": torch.arange(12, dtype=torch.int16).reshape(3, 4)}
    out = cached_to_device(cached, torch.device("cpu"), k=2)
    assert set(out) == {"features", "feature_mean", "feature_std", "attn_logits", "attn_index"}
    assert torch.equal(out["features"], torch.from_numpy(dequantize_rows(q, s)))
    assert torch.equal(out["attn_logits"], torch.from_numpy(dequantize_rows(ql, sl))[:, :, :3])
    assert out["attn_index"].dtype == torch.int64 and out["attn_index"].shape == (3, 2)


def test_loader_settings_follow_the_machine_and_the_config():
    gpu = loader_settings(torch.device("cuda"), cpus=32, local_ranks=4)
    assert (gpu.workers, gpu.prefetch_factor, gpu.persistent_workers,
            gpu.pin_memory) == (7, 4, True, True)
    assert "8 per rank" in gpu.reason
    assert loader_settings(torch.device("cuda"), cpus=96, local_ranks=1).workers == 16
    cpu = loader_settings(torch.device("cpu"), cpus=2, local_ranks=1)
    assert (cpu.workers, cpu.pin_memory) == (1, False)
    assert loader_settings(torch.device("cpu"), cpus=1).kwargs() == {
        "num_workers": 0, "pin_memory": False, "persistent_workers": False}
    set_ = loader_settings(torch.device("cuda"), workers=3, prefetch_factor=2, cpus=32,
                           persistent_workers=False)
    assert (set_.workers, set_.prefetch_factor, set_.persistent_workers) == (3, 2, False)
    assert "num_workers, prefetch_factor, persistent_workers" in set_.reason
    with pytest.raises(ValueError, match="pin_memory: true needs a CUDA device"):
        loader_settings(torch.device("cpu"), pin_memory=True)


@pytest.mark.parametrize("device,pin,expected", [("cuda", None, True), ("cuda", False, False),
                                                 ("cuda", True, True), ("cpu", None, False),
                                                 ("cpu", False, False)])
@pytest.mark.parametrize("read", ["random", "stream"])
def test_the_trainers_loader_pins_memory_exactly_on_cuda_unless_switched_off(
        world, device, pin, expected, read):
    """The trainer's DataLoader decision with the device mocked (pinning itself needs CUDA)."""
    from types import SimpleNamespace

    from stages.loader import StreamingCacheDataset
    from stages.train.trainer import Trainer

    dataset, reader = _batched(world, "webdataset-jpeg-int8", source=False)
    trainer = Trainer.__new__(Trainer)
    trainer.run = run_config(pin_memory=pin, num_workers=None, read=read,
                             view_selection="round_robin")
    trainer.dist = SimpleNamespace(is_main=False)
    trainer.device = torch.device(device)
    trainer.batched, trainer.stream = dataset, None
    trainer.sampler = SimpleNamespace(micro=4)
    if read == "stream":
        trainer.stream = StreamingCacheDataset(reader, policy=dataset.policy, seed=0,
                                               num_patches=16, k=4, attention=True, batch_size=4)
    trainer._build_loader(None)
    assert trainer.loader.pin_memory is expected and trainer.loader_settings.pin_memory is expected
    assert trainer.loader.dataset is (trainer.stream if read == "stream" else dataset)


INT8 = {"features": torch.int8, "attn_logits": torch.int8}
FLOAT16 = {"features": torch.float16, "attn_logits": torch.float16}


@pytest.mark.parametrize("name,read,big", [
    ("webdataset-jpeg-int8", "random", INT8), ("webdataset-jpeg-int8", "stream", INT8),
    ("webdataset-png-float16", "stream", FLOAT16), ("zarr-jpeg-float16", "random", FLOAT16),
    ("zarr-jpeg-lowrank", "random", {"features_u": torch.int8, "features_v": torch.int8})])
def test_pinned_batches_hold_uint8_pixels_and_the_stored_targets(world, name, read, big,
                                                                  monkeypatch):
    """What the DataLoader's pin thread pins (torch's pin_memory, which calls Batch.pin_memory):
    the uint8 images and the targets in their stored dtypes, no float32 copy of either."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from stages.loader import StreamingCacheDataset

    dataset, reader = _batched(world, name, source=False)
    if read == "stream":
        stream = StreamingCacheDataset(reader, policy=dataset.policy, seed=0, num_patches=16,
                                       k=4, attention=True, batch_size=4)
        batch = next(iter(stream))
    else:
        batch = dataset.__getitems__([PlanItem(0, i, i % VIEWS, False) for i in range(4)])
    pinned = []

    def fake_pin(self, *args, **kwargs):  # page-locking needs CUDA: record what is pinned
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    images, cached = batch.images, dict(batch.cached)
    out = pin_memory(batch)
    assert len(pinned) == 2 + len(cached)  # images, noise and every target tensor
    assert pinned[0] is images and out.images.dtype == torch.uint8
    assert out.images.shape == (4, 3, 32, 32)
    for field, dtype in big.items():
        assert out.cached[field].dtype == dtype and out.cached[field] is not cached[field]
    small = {"feature_mean", "feature_std", "features_scale", "attn_logits_scale",
             "features_u_scale", "features_v_scale", "attn_max", "attn_step"}
    floats = {n for n, t in out.cached.items() if t.dtype == torch.float32}
    assert floats <= small, floats  # float32 only for per-row scales and statistics
    assert "features" not in out.cached or out.cached["features"].dtype != torch.float32


def test_self_contained_cache_trains_without_the_source(world, tmp_path):
    from stages.train import TrainSetupError, train

    shards = [tmp_path / "src" / p.split("/")[-1] for p in world["shards"]]
    shards[0].parent.mkdir()
    for src, dst in zip(world["shards"], shards):
        shutil.copy(src, dst)
    jpeg = build_cache(tmp_path / "jpeg", [str(s) for s in shards], world["base"], pixels="jpeg")
    plain = build_cache(tmp_path / "plain", [str(s) for s in shards], world["base"])
    for s in shards:
        s.unlink()
    # the configured source (as `tec train` passes it) is neither read nor checked
    summary = train(run_config("sc", epochs=1, max_steps=1), cache=jpeg, base=world["base"],
                    source=Source(str(shards[0].parent)), out_dir=tmp_path / "run",
                    progress=False)
    assert summary.steps == 1 and summary.cached_samples == 8 and summary.online_samples == 0
    with pytest.raises(TrainSetupError, match=r"online_fraction 0.5 draws fresh views.*"
                                              r"does not exist.*set online_fraction: 0"):
        train(run_config("mixed", online_fraction=0.5), cache=jpeg, base=world["base"],
              out_dir=tmp_path / "run2", progress=False)
    with pytest.raises(TrainSetupError, match=r"stores no view pixels.*targets.pixels: jpeg"):
        train(run_config("plain"), cache=plain, base=world["base"], out_dir=tmp_path / "run3",
              progress=False)


def test_stage1_config_refuses_a_quality_out_of_range():
    from stages.configs import ConfigError, from_dict
    from stages.stage1 import Stage1Config

    with pytest.raises(ConfigError, match="pixels_quality"):
        from_dict(Stage1Config, {"cache": "c", "source": {"path": "x"}, "pixels": "jpeg",
                                 "pixels_quality": 0})
    with pytest.raises(ConfigError, match="pixels"):
        from_dict(Stage1Config, {"cache": "c", "source": {"path": "x"}, "pixels": "webp"})


def test_plan_shows_the_bytes_of_the_view_pixels():
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.plan import make_plan

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "imagenet_mae_vitb.yaml")
    assert ("targets.pixels: jpeg makes the cache self-contained for ~14,430 B"
            in make_plan(cfg).format())
    cfg.targets.pixels, cfg.targets.pixels_quality = "jpeg", 75
    plan = make_plan(cfg)
    assert plan.pixel_bytes_per_view == 9_210  # mean of real 224 px photos at quality 75
    assert (f"view pixels      jpeg quality 75: ~9,210 B per view more (measured on real photos), "
            f"{plan.samples * plan.views * 9_210 / 1e9:,.1f} GB in all") in plan.format()
    cfg.targets.pixels = "png"
    assert make_plan(cfg).pixel_bytes_per_view == 60_728


@pytest.mark.parametrize("attention", [True, False])
def test_lowrank_payload_is_dequantised_on_the_device_like_the_codec_decoder(tmp_path, attention):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from storage_helpers import make_views, new_cache, spec

    from storage.batch import device_payload, fields_for

    s = spec(codec="lowrank", num_patches=16, channels=24, heads=2, k_max=3, views=2)
    writer = new_cache(tmp_path / "c", s, [("p0", 3)])
    rng = np.random.default_rng(0)
    with writer.open_part("p0") as pw:
        for slot in range(3):
            pw.write(slot, f"k{slot}", make_views(rng, s))
        pw.commit()
    writer.finalize()
    reader = open_cache(tmp_path / "c")
    samples, views = np.array([2, 0, 1]), np.array([1, 0, 1])
    fields = fields_for(s, attention=attention, views=False)
    payload = device_payload(s, reader.read_batch(samples, views, fields))
    out = cached_to_device({k: torch.from_numpy(np.asarray(v)) for k, v in payload.items()},
                           torch.device("cpu"), k=2 if attention else None)
    for j, (i, v) in enumerate(zip(samples, views)):
        record = reader.read(int(i), int(v))  # the codec's own float32 decode
        assert torch.allclose(out["features"][j], torch.from_numpy(record["features"]), atol=1e-5)
        assert torch.equal(out["feature_std"][j], torch.from_numpy(record["feature_std"]))
        if attention:
            assert torch.allclose(out["attn_logits"][j],
                                  torch.from_numpy(record["attn_logits"][:, :3]), atol=1e-5)
            assert torch.equal(out["attn_index"][j], torch.from_numpy(record["attn_index"][:2]))
        else:
            assert "attn_logits" not in out


def test_streaming_reads_each_sample_once_per_epoch_round_robin_and_shuffled(world):
    from stages.loader import StreamingCacheDataset
    from storage import open_cache

    reader = open_cache(world["caches"]["webdataset-jpeg-int8"])
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    kwargs = dict(policy=policy, seed=0, num_patches=16, k=4, attention=True, batch_size=2,
                  shuffle_buffer=3)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = StreamingCacheDataset(reader, rank=rank, world=2, **kwargs)
            stream.set_epoch(epoch)
            for batch in stream:
                assert batch.views == [epoch % VIEWS] * len(batch)
                targets = cached_to_device(batch.cached, torch.device("cpu"), k=4)
                for r, i in enumerate(batch.indices.tolist()):
                    record = reader.read(i, epoch % VIEWS)
                    assert torch.equal(targets["features"][r], torch.from_numpy(record["features"]))
                    from storage.pixels import decode_pixels

                    assert torch.equal(
                        batch.images[r],
                        torch.from_numpy(decode_pixels(record["pixels"])).permute(2, 0, 1))
                seen += batch.indices.tolist()
        assert sorted(seen) == list(range(reader.num_samples))  # 2 parts x 4, batches of 2
    order = [b.indices.tolist()
             for b in StreamingCacheDataset(reader, **{**kwargs, "shuffle_buffer": 8})]
    assert sum(order, []) != sorted(sum(order, [])) or len(order) == 0
    again = [b.indices.tolist()
             for b in StreamingCacheDataset(reader, **{**kwargs, "shuffle_buffer": 8})]
    assert order == again  # seeded
    with pytest.raises(ValueError, match="streaming needs a WebDataset cache with view pixels"):
        StreamingCacheDataset(open_cache(world["caches"]["zarr-jpeg-float16"]), **kwargs)


def test_dataloader_workers_build_the_same_batches_from_the_handed_over_reader(world):
    from stages.loader import passthrough

    dataset, reader = _batched(world, "zarr-jpeg-float16", source=False)
    items = [PlanItem(0, i, (i + 1) % VIEWS, False) for i in range(reader.num_samples)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=items, num_workers=1,
                                         collate_fn=passthrough)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 2]
    for b, start in zip(batches, (0, 3, 6)):
        ref = dataset.__getitems__(items[start:start + 3])
        assert torch.equal(b.images, ref.images) and torch.equal(b.noise, ref.noise)
        assert all(torch.equal(b.cached[k], ref.cached[k]) for k in ref.cached)


def test_inspect_names_the_view_pixels(world):
    from storage import format_inspect, inspect_cache

    text = format_inspect(inspect_cache(world["caches"]["zarr-jpeg-float16"]))
    assert "view pixels   jpeg quality 75, 32 px: stored with every view" in text
    assert "view pixels" not in format_inspect(inspect_cache(world["caches"]["zarr-none-float16"]))


def test_the_per_sample_dataset_takes_the_open_reader_to_its_workers(world, monkeypatch):
    import pickle

    import storage

    dataset, reader = _batched(world, "zarr-none-float16")
    dataset.items.use_reader(reader)
    clone = pickle.loads(pickle.dumps(dataset.items))  # what a spawned worker receives

    def no_reopen(*args, **kwargs):
        raise AssertionError("the worker re-opened the cache")

    monkeypatch.setattr(storage, "open_cache", no_reopen)
    item = clone[PlanItem(0, 1, 1, False)]
    assert torch.equal(item["features"].float(), torch.from_numpy(reader.read(1, 1)["features"]))
