"""Reliability: untrusted files never run code.

Every payload here is a pickle whose unpickling creates a marker file (``open(marker, 'w')``
through ``__reduce__``), one marker per payload, so a test can tell exactly which loader executed
code. Checked paths:

* shard members: .pyd/.pickle/.pkl/.pth fields next to images, a key with only a pickle member,
  pickle bytes posing as the image or the label, a double extension; read by stage 1 (the
  shard task), stage 2 (source index, training with and without a cache, loader workers) and the
  evaluation image loader: no marker may appear, the good images are still used;
* base-model checkpoints (zip and legacy pickle formats, a pickle renamed .safetensors): refused
  with an error that names ``allow_pickle`` unless the user opts in; the opt-in does load them
  (which proves the payload is live);
* stage-2 training checkpoints (resume, `tec export`), the run's source index (.npz) and a
  webdataset cache's records.npy: refused or rebuilt, never unpickled.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from image_helpers import encode, smooth_image, write_tar
from reliability_helpers import (
    MarkerOnUnpickle,
    Source,
    category,
    evil_pickle,
    fsync_off,
    invoke_cli,
    make_data,
    one_line_error,  # noqa: F401
    pipeline_yaml,
    record_cases,
    run_config,
    save_base_model,
    stage1_config,
    stage1_in_process,
)

pytestmark = pytest.mark.usefixtures("no_fsync", "one_thread")

# member kinds of the untrusted shard: name -> (members writer, is the sample's image good)
EVIL_MEMBERS = ("pyd", "pickle", "pkl", "pth", "only_pickle", "pickle_as_jpg", "pickle_as_cls",
                "double_extension", "npy_object_array")


def write_untrusted_shard(path: Path, markers: Path) -> dict[str, bool]:
    """A WebDataset tar mixing good images with pickle payloads (one marker per kind).

    Returns {key: True if the sample's image is good}. Marker files: markers/<kind>.
    """
    rng = np.random.default_rng(5)
    members, keys = [], {}

    def image(fmt="JPEG"):
        return encode(smooth_image(rng, 30, 36), fmt)

    for kind in ("pyd", "pickle", "pkl", "pth"):
        key = f"img_{kind}"
        members += [(f"{key}.jpg", image()), (f"{key}.cls", b"1"),
                    (f"{key}.{kind}", evil_pickle(markers / kind))]
        keys[key] = True
    members.append(("lonely.pickle", evil_pickle(markers / "only_pickle")))
    members += [("fake_image.jpg", evil_pickle(markers / "pickle_as_jpg")),
                ("fake_image.cls", b"2")]
    keys["fake_image"] = False
    members += [("fake_label.png", image("PNG")),
                ("fake_label.cls", evil_pickle(markers / "pickle_as_cls"))]
    keys["fake_label"] = True
    members += [("double.png", image("PNG")),
                ("double.jpg.pickle", evil_pickle(markers / "double_extension"))]
    keys["double"] = True
    buf = io.BytesIO()
    np.save(buf, np.array([MarkerOnUnpickle(markers / "npy_object_array")], dtype=object),
            allow_pickle=True)
    members += [("with_npy.jpg", image()), ("with_npy.npy", buf.getvalue())]
    keys["with_npy"] = True
    write_tar(path, members)
    return keys


def marker_results(markers: Path, kinds=EVIL_MEMBERS) -> dict[str, tuple[bool, str]]:
    return {kind: (not (markers / kind).exists(),
                   "marker created: the payload was unpickled" if (markers / kind).exists()
                   else "never unpickled") for kind in kinds}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("untrusted")
    markers = tmp / "markers"
    markers.mkdir()
    shards = tmp / "shards"
    make_data(shards, n_shards=1, per_shard=4)
    keys = write_untrusted_shard(shards / "shard-000001.tar", markers)
    base = save_base_model(tmp / "base.safetensors")
    return {"tmp": tmp, "markers": markers, "shards": shards, "keys": keys, "base": base}


@pytest.fixture(scope="module")
def cache(world):
    """Stage 1 over the untrusted shard (the shard task and base-model actor, no Ray)."""
    cfg = stage1_config(world["shards"], world["tmp"] / "cache")
    with fsync_off():
        stage1_in_process(cfg, world["base"])
    return cfg.cache


# ------------------------------------------------------------------------------ shard members
@category("untrusted_files")
def test_stage1_never_unpickles_shard_members(world, cache, record_property):
    from storage import open_cache

    results = marker_results(world["markers"])
    with open_cache(cache) as reader:
        good = sorted(k for k, ok in world["keys"].items() if ok)
        cached = sorted(k for k in reader.keys if not k.startswith("s000_"))
        results["good images next to pickles are cached"] = (cached == good, f"cached {cached}")
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), results


@category("untrusted_files")
@pytest.mark.parametrize("mode", ["cache", "cache+loader workers", "online", "eval loader"])
def test_stage2_data_loading_never_unpickles_shard_members(world, cache, mode, record_property,
                                                          tmp_path):
    from stages.train import train

    source = Source(str(world["shards"]))
    if mode == "cache":
        summary = train(run_config(epochs=1), cache=cache, source=source, base=None,
                        out_dir=tmp_path, progress=False)
        assert summary.cached_samples > 0
    elif mode == "cache+loader workers":
        summary = train(run_config(epochs=1, num_workers=1), cache=cache, source=source,
                        base=None, out_dir=tmp_path, progress=False)
        assert summary.cached_samples > 0
    elif mode == "online":
        from stages.views import ViewPolicy

        summary = train(run_config(epochs=1, online_fraction=1.0), cache=None, source=source,
                        base=world["base"], view_policy=ViewPolicy(seed=7, output_size=32),
                        out_dir=tmp_path, progress=False)
        assert summary.online_samples > 0
    else:
        from stages.evaluate import load_eval_images

        images, labels = load_eval_images(str(world["shards"]), 32)
        assert len(images) == 4 + sum(world["keys"].values())
    results = marker_results(world["markers"])
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), results


# ------------------------------------------------------------------------------ base model
def _evil_base_checkpoint(path: Path, marker: Path, *, legacy: bool = False) -> None:
    """An MAE-style release {'model': state_dict, 'args': <payload>} of the tiny base model."""
    from safetensors.torch import load_file

    state = load_file(str(path.parent / "base.safetensors"))
    torch.save({"model": state, "args": MarkerOnUnpickle(marker)}, path,
               _use_new_zipfile_serialization=not legacy)


@category("untrusted_files")
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_base_checkpoint_needs_an_explicit_opt_in_to_unpickle(world, fmt):
    from dataclasses import replace

    from tec.teacher import CheckpointError

    marker = world["markers"] / f"base_{fmt}"
    path = world["tmp"] / f"evil_base_{fmt}.pth"
    _evil_base_checkpoint(path, marker, legacy=fmt == "legacy")
    base = replace(world["base"], checkpoint=str(path))
    with pytest.raises(CheckpointError) as info:
        base.load()
    message = str(info.value)
    assert "allow_pickle" in message and "\n" not in message and str(path) in message
    assert not marker.exists(), "the base-model checkpoint ran code without allow_pickle"
    # the explicit opt-in loads it (and so runs the payload: the test's payload is live)
    model = replace(base, allow_pickle=True).load()
    assert marker.exists() and model.embed_dim == 48


@category("untrusted_files")
def test_a_pickle_renamed_safetensors_is_refused(world):
    from dataclasses import replace

    from tec.teacher import CheckpointError

    marker = world["markers"] / "renamed_safetensors"
    path = world["tmp"] / "evil.safetensors"
    path.write_bytes(evil_pickle(marker))
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        replace(world["base"], checkpoint=str(path)).load()
    assert not marker.exists()


def _cli_case(world, name: str, argv_of) -> tuple[bool, str]:
    """Run a CLI command on an evil base checkpoint: one error line naming allow-pickle, no
    marker. argv_of(checkpoint path, config path) -> argv."""
    marker = world["markers"] / f"cli_{name}"
    path = world["tmp"] / f"evil_{name}.pth"
    _evil_base_checkpoint(path, marker)
    base = type(world["base"])(arch=world["base"].arch, checkpoint=str(path),
                               timm_kwargs=dict(world["base"].timm_kwargs))
    config = pipeline_yaml(world["tmp"] / f"cli_{name}.yaml", shards=world["shards"], base=base,
                           cache=world["tmp"] / f"cli_{name}_cache",
                           workdir=world["tmp"] / f"cli_{name}_work")
    code, stderr, exc = invoke_cli(argv_of(path, config))
    ok, detail = one_line_error(code, stderr, exc, ("allow",))
    ok = ok and ("allow_pickle" in detail or "allow-pickle" in detail)
    if marker.exists():
        return False, "marker created: the checkpoint ran code"
    return ok, detail


CLI_CASES = {
    "tec targets": lambda ckpt, cfg: ["targets", cfg],
    "tec train (online fallback base model)": lambda ckpt, cfg: ["train", cfg, "--run", "tec"],
    "tec eval knn": lambda ckpt, cfg: ["eval", "knn", ckpt, "--train", str(cfg.parent / "shards"),
                                       "--test", str(cfg.parent / "shards")],
    "tec viz attention": lambda ckpt, cfg: ["viz", "attention", ckpt, "--images",
                                            str(cfg.parent / "shards"), "--out",
                                            str(cfg.parent / "att.png")],
}


@category("untrusted_files")
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses_a_pickled_base_checkpoint_and_says_how_to_opt_in(world, name):
    tag = "".join(c if c.isalnum() else "_" for c in name)
    ok, detail = _cli_case(world, tag, CLI_CASES[name])
    assert ok, detail


# ------------------------------------------------------------------------------ stage 2 files
def _plant_checkpoint(run_dir: Path, marker: Path) -> Path:
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    path = ckpt / "step_00000002.pt"
    torch.save({"format": "tec-train-checkpoint", "version": 1, "step": 2,
                "model": MarkerOnUnpickle(marker)}, path)
    os.symlink(path.name, ckpt / "last")
    return path


@category("untrusted_files")
def test_resume_never_unpickles_a_planted_training_checkpoint(world, cache, tmp_path):
    from stages.checkpoint import CheckpointFormatError
    from stages.train import train

    marker = world["markers"] / "training_checkpoint"
    path = _plant_checkpoint(tmp_path / "run", marker)
    with pytest.raises(CheckpointFormatError) as info:
        train(run_config(epochs=1), cache=cache, source=None, base=None, out_dir=tmp_path / "run",
              progress=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@category("untrusted_files")
def test_cli_train_resume_and_export_refuse_a_planted_checkpoint(world, cache, tmp_path):
    marker = world["markers"] / "cli_training_checkpoint"
    config = pipeline_yaml(tmp_path / "c.yaml", shards=world["shards"], base=world["base"],
                           cache=cache, workdir=tmp_path / "work")
    path = _plant_checkpoint(tmp_path / "work" / "runs" / "tec", marker)
    results = {}
    code, stderr, exc = invoke_cli(["train", config, "--run", "tec"])
    results["tec train (resume)"] = one_line_error(code, stderr, exc, (path.name,))
    code, stderr, exc = invoke_cli(["export", path, "--out", tmp_path / "x.safetensors"])
    results["tec export"] = one_line_error(code, stderr, exc, (path.name,))
    results["no code ran"] = (not marker.exists(), "marker created" if marker.exists() else "")
    assert all(ok for ok, _ in results.values()), results


@category("untrusted_files")
def test_a_planted_source_index_is_rebuilt_not_unpickled(world, cache, tmp_path):
    from stages.data import index_digest
    from stages.train import train
    from storage import open_cache

    marker = world["markers"] / "source_index"
    shards = [str(s) for s in open_cache(cache).manifest["source"]["shards"]]
    index = tmp_path / "source_index" / f"{index_digest(shards)}.npz"
    index.parent.mkdir(parents=True)
    evil = np.array([MarkerOnUnpickle(marker)], dtype=object)
    np.savez(index, meta=evil, files=evil, keys=evil, file_id=evil, offsets=evil, sizes=evil,
             labels=evil)
    summary = train(run_config(epochs=1), cache=cache, source=None, base=None, out_dir=tmp_path,
                    progress=False)
    assert summary.steps > 0 and not marker.exists()


@category("untrusted_files")
def test_a_webdataset_cache_never_unpickles_records_npy(world, tmp_path):
    """records.npy replaced by a pickled object array (and the marker, then the manifest's part
    status, edited to match, as an attacker with write access would): training refuses, nothing
    is unpickled."""
    import hashlib
    import json

    from stages.train import train

    cfg = stage1_config(world["shards"], tmp_path / "cache", backend="webdataset")
    stage1_in_process(cfg, world["base"])
    marker = world["markers"] / "records_npy"
    records = tmp_path / "cache" / "parts" / "shard-000001" / "records.npy"
    np.save(records, np.array([MarkerOnUnpickle(marker)], dtype=object), allow_pickle=True)
    status = tmp_path / "cache" / "status" / "shard-000001.json"
    commit = json.loads(status.read_text())
    data = records.read_bytes()
    commit["files"]["records.npy"] = {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    status.write_text(json.dumps(commit))
    # the manifest's part status no longer matches the edited marker: refused before any read
    with pytest.raises(ValueError, match="shard-000001 .*part status checksum"):
        train(run_config(epochs=1), cache=str(tmp_path / "cache"), source=None, base=None,
              out_dir=tmp_path / "run", progress=False)
    from storage.cache import part_checksum

    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # ... so the attacker edits it too
    manifest["part_status"]["shard-000001"]["checksum"] = part_checksum(commit["files"])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records.npy"):
        train(run_config(epochs=1), cache=str(tmp_path / "cache"), source=None, base=None,
              out_dir=tmp_path / "run", progress=False)
    assert not marker.exists()
