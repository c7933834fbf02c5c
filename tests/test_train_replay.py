"""Stage 2 replays cached views exactly: same pixels as stage 1, same loss as online targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import K_MAX, STUDENT, VIEWS, build_cache, make_data, save_base_model

from stages.data import (
    CacheRead,
    PlanItem,
    ReplayMismatchError,
    SourceIndex,
    TargetBuilder,
    TrainDataset,
    collate,
)
from stages.sources import WebDatasetSource, decode_image
from stages.views import ViewPolicy, render_view, view_params
from storage import open_cache


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Source shards, a base model, and one cache per backend (stage-1 inputs captured)."""
    tmp = tmp_path_factory.mktemp("replay")
    shards = make_data(tmp, n_shards=2, per_shard=5)
    base = save_base_model(tmp / "base.safetensors")
    captured: dict[str, list] = {}
    caches = {}
    for backend in ("zarr", "webdataset"):
        captured[backend] = []
        caches[backend] = build_cache(tmp / f"cache-{backend}", shards, base, backend=backend,
                                      capture=captured[backend])
    index = SourceIndex.build("webdataset", sorted(shards))
    return dict(tmp=tmp, shards=sorted(shards), base=base, caches=caches, captured=captured,
                index=index)


def _dataset(world, backend, *, k=4, policy=None, half=True):
    reader = open_cache(world["caches"][backend])
    positions = {key: i for i, key in enumerate(reader.keys)}
    cache_index = np.array([positions.get(k_, -1) for k_ in world["index"].keys])
    policy = policy or ViewPolicy.from_dict(reader.manifest["view_policy"])
    return TrainDataset(world["index"], policy, seed=0, num_patches=16,
                        cache=CacheRead(world["caches"][backend], cache_index, k, True,
                                        half)), reader


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_cached_view_pixels_are_bit_identical(world, backend):
    dataset, reader = _dataset(world, backend)
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    stage1_views = torch.cat(world["captured"][backend])  # in sample order, K views each
    source = WebDatasetSource(world["shards"])
    samples = [s for shard in world["shards"] for s in source.samples(shard)]
    assert len(samples) == len(world["index"]) == reader.num_samples
    for i, sample in enumerate(samples):
        image = decode_image(sample.data)  # decoded independently of the dataset
        for v in range(VIEWS):
            item = dataset[PlanItem(epoch=0, index=i, view=v, fresh=False)]
            expected = render_view(image, view_params(policy, sample.key, v, *image.shape[:2]),
                                   policy.output_size, policy.interpolation)
            assert item["image"].dtype == torch.uint8
            assert torch.equal(item["image"], expected)
            assert torch.equal(item["image"], stage1_views[i * VIEWS + v])  # what stage 1 fed
            record = reader.read(reader.index_of(sample.key), v)
            assert np.array_equal(item["features"].float().numpy(), record["features"])
            assert np.array_equal(item["attn_logits"].float().numpy(), record["attn_logits"][:, :5])
            assert np.array_equal(item["attn_index"].numpy(), record["attn_index"][:4])
            # a fresh view of the same index renders the same pixels, without cache reads
            fresh = dataset[PlanItem(epoch=0, index=i, view=v, fresh=True)]
            assert torch.equal(fresh["image"], expected) and "features" not in fresh


def test_replay_refuses_a_cache_whose_views_disagree_with_the_policy(world):
    dataset, _ = _dataset(world, "zarr", policy=ViewPolicy(seed=1, output_size=32))
    with pytest.raises(ReplayMismatchError, match="rebuild the cache"):
        dataset[PlanItem(epoch=0, index=0, view=0, fresh=False)]


@pytest.mark.parametrize("mode", ["patch", "channel", "none"])
def test_loss_on_cached_targets_equals_loss_on_online_targets(world, mode):
    from tec.model import NewModel, NewModelConfig
    from tec.targets import normalize_images

    dataset, _ = _dataset(world, "zarr")
    base_model = world["base"].load()
    n = len(world["index"])
    cached = collate([dataset[PlanItem(0, i, i % VIEWS, False)] for i in range(n)])
    online = collate([dataset[PlanItem(0, i, i % VIEWS, True)] for i in range(n)])
    mixed = collate([dataset[PlanItem(0, i, i % VIEWS, i % 3 == 0)] for i in range(n)])
    assert torch.equal(cached.images, online.images) and torch.equal(cached.noise, online.noise)
    builder = TargetBuilder(base_model=base_model, k=4, mode=mode, attention=True, last_n=2,
                            k_max=K_MAX)
    images = normalize_images(cached.images)
    t_cached, t_online, t_mixed = (builder(images, b) for b in (cached, online, mixed))
    torch.manual_seed(0)
    model = NewModel(NewModelConfig(img_size=32, patch_size=8, base_embed_dim=48, base_num_heads=3,
                                    **STUDENT)).eval()
    with torch.no_grad():
        losses = [model(images, t, noise=cached.noise) for t in (t_cached, t_online, t_mixed)]
    assert torch.equal(t_cached.attn_index, t_online.attn_index)
    for name in ("loss", "loss_feature", "loss_attention"):
        ref = losses[1][name].item()
        assert losses[0][name].item() == pytest.approx(ref, rel=2e-3, abs=1e-4), name
        assert losses[2][name].item() == pytest.approx(ref, rel=2e-3, abs=1e-4), name
    # the targets themselves agree to float16 precision
    scale = t_online.features.abs().max().item()
    assert (t_cached.features - t_online.features).abs().max().item() <= 2e-3 * max(scale, 1.0)
