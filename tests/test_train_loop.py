"""Stage-2 training runs: learning, online fallback, refusals, non-finite loss, export."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_helpers import encode, smooth_image, write_tar
from train_helpers import K_MAX, Source, build_cache, make_data, run_config, save_base_model

from stages.checkpoint import load_checkpoint
from stages.configs import ConfigError
from stages.train import (
    CacheMismatchError,
    NonFiniteLossError,
    TrainSetupError,
    export_checkpoint,
    train,
)
from stages.views import ViewPolicy


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    shards = make_data(tmp, n_shards=2, per_shard=8)
    base = save_base_model(tmp / "base.safetensors")
    cache = build_cache(tmp / "cache", shards, base)
    return dict(tmp=tmp, shards=shards, base=base, cache=cache, source=Source(str(tmp / "shards")))


def _csv(out: Path) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_loss_goes_down_on_a_tiny_dataset(world, tmp_path):
    run = run_config(epochs=20, blr=0.3, warmup_epochs=1.0, min_lr=1e-4, log_every=1,
                     clip_grad=1.0)
    summary = train(run, cache=world["cache"], source=world["source"], base=None,
                    out_dir=tmp_path, progress=False)
    assert summary.steps == 40 and summary.cached_samples == 40 * 8 and summary.online_samples == 0
    rows = _csv(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    feature = [float(r["loss_feature"]) for r in rows]
    total = [float(r["loss"]) for r in rows]
    # (the tiny random base model's attention is nearly uniform, so the feature term carries it)
    assert np.mean(feature[-5:]) < 0.7 * feature[0], feature
    assert np.mean(total[-5:]) < total[0] - 0.4, total
    row = _csv(tmp_path)[-1]
    for column in ("loss_feature", "loss_attention", "lr", "samples_per_s", "loader_samples_per_s"):
        assert column in row
    assert list((tmp_path / "logs" / "tensorboard").iterdir())
    # exports: folded (timm-loadable) + adapters, and the JSON that says how to load them
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert Path(summary.export).is_file() and Path(summary.export_adapters).is_file()
    import timm

    model = timm.create_model(info["arch"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=summary.export), **{
                                  k: v for k, v in info["timm_kwargs"].items()
                                  if k != "num_classes"})
    assert model.embed_dim == 48 and len(model.blocks) == 3
    # export/ is also timm's pretrained folder: the same encoder with no arguments at all
    folder = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(folder.eval().forward_features(x), model.eval().forward_features(x))
    assert summary.loader_samples_per_s and summary.loader_samples_per_s > 0
    assert "samples/s" in summary.format()


@pytest.mark.parametrize("fraction,workers", [(0.0, 0), (0.5, 2), (1.0, 0)])
def test_online_fractions_all_run(world, tmp_path, fraction, workers):
    run = run_config(epochs=2, online_fraction=fraction, num_workers=workers)
    summary = train(run, cache=world["cache"], source=world["source"], base=world["base"],
                    out_dir=tmp_path, progress=False)
    assert summary.samples == 32 and summary.online_samples + summary.cached_samples == 32
    if fraction == 0.0:
        assert summary.online_samples == 0
    elif fraction == 1.0:
        assert summary.cached_samples == 0
    else:
        assert 0 < summary.online_samples < 32
    assert np.isfinite(summary.losses["loss"])


def test_fully_online_needs_no_cache_and_pixel_mode_needs_no_base(world, tmp_path):
    policy = ViewPolicy(seed=0, output_size=32)
    online = train(run_config(epochs=1, online_fraction=1.0), cache=None, source=world["source"],
                   base=world["base"], view_policy=policy, out_dir=tmp_path / "online",
                   progress=False)
    assert online.online_samples == 16 and online.cached_samples == 0
    pixel = train(run_config(epochs=1, model={"target": "pixel", "patch_size": 8}), cache=None,
                  source=world["source"], base=None, view_policy=policy,
                  out_dir=tmp_path / "pixel", progress=False)
    assert "loss_pixel" in pixel.losses and pixel.steps == 2
    assert Path(pixel.export).is_file()


def test_a_cache_of_another_base_model_is_refused(world, tmp_path):
    other = save_base_model(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(CacheMismatchError,
                       match=r"different base model \(checkpoint_sha256: cache="):
        train(run_config(), cache=world["cache"], source=world["source"], base=other,
              out_dir=tmp_path / "out", progress=False)


def test_an_incomplete_cache_or_another_source_is_refused(world, tmp_path):
    part = Path(sorted(world["shards"])[1]).name.removesuffix(".tar")
    partial = build_cache(tmp_path / "partial", world["shards"], world["base"], skip_parts=(part,))
    with pytest.raises(CacheMismatchError, match=part):
        train(run_config(), cache=partial, source=world["source"], base=None,
              out_dir=tmp_path / "out", progress=False)
    other = make_data(tmp_path / "other", n_shards=1, per_shard=8, seed=3)
    with pytest.raises(CacheMismatchError, match="use the source the cache was built from"):
        train(run_config(), cache=world["cache"], source=Source(other[0]), base=None,
              out_dir=tmp_path / "out", progress=False)


def test_k_above_k_max_and_a_wrong_patch_size_are_refused(world, tmp_path):
    with pytest.raises(CacheMismatchError, match=f"model.k 9 exceeds the cache's k_max {K_MAX}"):
        train(run_config(model={"k": 9}), cache=world["cache"], source=world["source"],
              base=None, out_dir=tmp_path, progress=False)
    with pytest.raises(CacheMismatchError, match="model.patch_size 16"):
        train(run_config(model={"patch_size": 16}), cache=world["cache"], source=None, base=None,
              out_dir=tmp_path, progress=False)


def test_online_fraction_without_base_model_is_refused(world, tmp_path):
    with pytest.raises(TrainSetupError, match="no base_model is configured"):
        train(run_config(online_fraction=0.5), cache=world["cache"], source=None, base=None,
              out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("values,key", [
    ({"online_fraction": 1.5}, "online_fraction"),
    ({"batch_size": 10, "accum_steps": 4}, "batch_size"),
    ({"model": {"img_size": 64}}, "model.img_size"),
    ({"model": {"tau": 0.0}}, "model.tau"),
    ({"model": {"depth": 4}}, "depth"),
    ({"model": {"widht": 4}}, "model.widht"),
    ({"view_selection": "random"}, "view_selection"),
])
def test_bad_run_settings_give_one_line_errors_naming_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        run_config(**values)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    from tec.model import NewModel

    forward = NewModel.forward
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 5:  # the 6th step's forward: step index 5
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(NewModel, "forward", exploding)
    run = run_config(epochs=5, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        train(run, cache=world["cache"], source=world["source"], base=None, out_dir=tmp_path,
              progress=False)
    message = str(info.value)
    assert "\n" not in message and "at step 5" in message and "step_00000004.pt" in message
    last = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (tmp_path / "export").exists()


def _tar_with_a_corrupt_sample(path: Path) -> None:
    rng = np.random.default_rng(7)
    members = []
    for i in range(8):
        data = encode(smooth_image(rng, 40, 40), "PNG")
        if i == 3:
            data = data[: len(data) // 3]  # truncated: stage 1 skips it, stage 2 cannot decode it
        members += [(f"x{i:03d}.png", data), (f"x{i:03d}.cls", b"1")]
    write_tar(path, members)


def test_samples_missing_from_the_cache_are_skipped_or_tried_online(tmp_path, world):
    shards = make_data(tmp_path, n_shards=1, per_shard=8)
    _tar_with_a_corrupt_sample(tmp_path / "shards" / "shard-000001.tar")
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    cache = build_cache(tmp_path / "cache", shards, world["base"])
    source = Source(str(tmp_path / "shards"))
    no_base = train(run_config(epochs=2, batch_size=5), cache=cache, source=source, base=None,
                    out_dir=tmp_path / "a", progress=False)
    assert no_base.skipped_missing == 2 and no_base.samples == 30  # 15 usable, 3 steps of 5
    with_base = train(run_config(epochs=1, batch_size=5), cache=cache, source=source,
                      base=world["base"], out_dir=tmp_path / "b", progress=False)
    # stage 1 reported the missing sample as bad: skipped, not tried online again, and not a
    # fall-back from a missing record (stages.records.KNOWN_BAD)
    assert (with_base.skipped_missing, with_base.skipped_bad, with_base.samples,
            with_base.online_samples, with_base.fallback_online) == (1, 0, 15, 0, 0)


def test_export_checkpoint_rebuilds_the_model_from_any_checkpoint(world, tmp_path):
    import timm

    run = run_config(epochs=2, checkpoint_every=1, keep_checkpoints=5)
    train(run, cache=world["cache"], source=None, base=None, out_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoints" / "step_00000002.pt"
    out = export_checkpoint(ckpt, tmp_path / "step2.safetensors", keep_adapters=True)
    assert out.is_file() and (tmp_path / "step2.adapters.safetensors").is_file()
    info = json.loads((tmp_path / "step2.json").read_text())
    kwargs = {k: v for k, v in info["timm_kwargs"].items() if k != "num_classes"}
    model = timm.create_model(info["arch"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out)), **kwargs).eval()
    from tec.model import NewModel, NewModelConfig

    state = load_checkpoint(ckpt)
    new = NewModel(NewModelConfig(**state["new_model_config"])).eval()
    new.load_state_dict(state["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), new.forward_encoder_features(x), atol=1e-5)
    with pytest.raises(ValueError, match="not a stage-2 training checkpoint|not a readable"):
        export_checkpoint(out, tmp_path / "x.safetensors")

    # a folder: timm's pretrained layout, titled with the given name
    folder = export_checkpoint(ckpt, tmp_path / "hf", name="me/tec-tiny")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "model.json",
                                                  "README.md"}
    assert "hf-hub:me/tec-tiny" in (folder / "README.md").read_text()
    assert "checkpoint" not in json.loads((folder / "model.json").read_text())  # no local path
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), new.forward_encoder_features(x), atol=1e-5)
    assert export_checkpoint(ckpt, folder) == folder  # an earlier export is rewritten
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files .todo.txt"):
        export_checkpoint(ckpt, tmp_path / "notes")


def _copy_cache(src: str, dst: Path, restamp: bool = False, **manifest_changes) -> str:
    """A copy of a cache with manifest sections changed. restamp: also record the changed
    manifest in the commit markers, as a stage 1 that ran with those settings (but wrote the
    records it did) would have: a consistent cache whose records disagree with its manifest."""
    import shutil

    from storage.schema import manifest_identity, manifest_section_digests

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        if isinstance(value, dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    if restamp:
        for status in (dst / "status").glob("*.json"):
            marker = json.loads(status.read_text())
            marker["manifest_identity"] = manifest_identity(manifest)
            marker["manifest_sections"] = manifest_section_digests(manifest)
            status.write_text(json.dumps(marker))
    return str(dst)


def test_an_unknown_schema_is_refused(world, tmp_path):
    cache = _copy_cache(world["cache"], tmp_path / "cache", schema_version=99)
    with pytest.raises(CacheMismatchError) as info:
        train(run_config(), cache=cache, source=None, base=None, out_dir=tmp_path / "out",
              progress=False)
    assert "99" in str(info.value) and "\n" not in str(info.value)


def test_a_replay_mismatch_in_a_loader_worker_is_one_line(world, tmp_path):
    from stages.data import ReplayMismatchError

    cache = _copy_cache(world["cache"], tmp_path / "cache", restamp=True, view_policy={"seed": 5})
    with pytest.raises(ReplayMismatchError) as info:
        train(run_config(num_workers=1), cache=cache, source=None, base=None,
              out_dir=tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and "rebuild the cache" in str(info.value)


def test_int8_webdataset_cache_trains(world, tmp_path):
    cache = build_cache(tmp_path / "cache", world["shards"], world["base"], backend="webdataset",
                        codec="int8")
    summary = train(run_config(epochs=1, feature_norm="channel", view_selection="round_robin"),
                    cache=cache, source=world["source"], base=None, out_dir=tmp_path / "out",
                    progress=False)
    assert summary.cached_samples == 16 and np.isfinite(summary.losses["loss"])


def test_image_folder_source_trains_fully_online(world, tmp_path):
    from PIL import Image

    from stages.data import SourceIndex
    from stages.sources import ImageFolderSource

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(rng, 36, 40)).save(folder / f"im{i}.png")
    index = SourceIndex.build("imagefolder", [], root=str(tmp_path / "images"))
    source = ImageFolderSource(tmp_path / "images")
    expected = [s for shard in source.shards() for s in source.samples(shard)]
    assert index.keys == [s.key for s in expected]
    assert [index.read_bytes(i) for i in range(len(index))] == [s.data for s in expected]
    assert index.labels.tolist() == [s.label for s in expected]
    summary = train(run_config(epochs=1, online_fraction=1.0, batch_size=4), cache=None,
                    source=Source(str(tmp_path / "images"), kind="imagefolder"),
                    base=world["base"], view_policy=ViewPolicy(output_size=32),
                    out_dir=tmp_path / "out", progress=False)
    assert summary.online_samples == 8


def test_a_finished_run_keeps_its_export_and_gains_the_timm_config(world, tmp_path):
    run = run_config(epochs=1)
    train(run, cache=world["cache"], source=None, base=None, out_dir=tmp_path, progress=False)
    weights = (tmp_path / "export" / "model.safetensors").read_bytes()
    config = tmp_path / "export" / "config.json"
    expected = config.read_text()
    config.unlink()  # as an export written before config.json existed
    again = train(run, cache=world["cache"], source=None, base=None, out_dir=tmp_path,
                  progress=False)
    assert again.resumed_from_step == again.steps  # trained nothing
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == weights
    assert config.read_text() == expected
