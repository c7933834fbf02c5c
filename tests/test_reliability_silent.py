"""Reliability: no silent wrong results (issue 18).

Paths that used to give silently wrong results or block a run forever, each checked end to end
on tiny data:

* ``duplicate_keys``: shards that share member names and image folders with ``x.jpg`` beside
  ``x.png``: every sample cached under its own key, never two samples trained against one record;
* ``missing_records``: a committed part whose records do not cover its shard (a part folder
  replaced by a link to another part): refused with one line naming the part, never a silent
  fall-back to online targets; an allowed fall-back is counted;
* ``stale_reuse``: ``tec run`` after the cache, the base model or a run setting changed trains
  anew and says what changed, never "reused finished run" for old results;
* ``deterministic_failures``: a failure a retry cannot change (a base model producing NaN) fails
  once, with a message saying what to change, not "rerun to resume";
* ``deep_damage``: damage that keeps the checksums right (non-finite values written by a broken
  writer) is found by ``tec cache verify --deep`` and ``tec cache repair`` recomputes exactly the
  damaged parts.

Plus YAML files with a key given twice and byte-reproducible WebDataset parts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reliability_helpers import category


# ------------------------------------------------------------------------------ YAML
def test_yaml_key_given_twice_is_one_line_naming_the_key_and_both_lines(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("workdir: w\nruns:\n  - name: a\n    epochs: 1\n    blr: 0.1\n"
                    "    epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert "runs.0.epochs" in message and "lines 4 and 6" in message and "p.yaml" in message


def test_yaml_same_key_in_different_mappings_is_fine(tmp_path):
    from pipeline.config import check_duplicate_keys

    check_duplicate_keys("a:\n  x: 1\nb:\n  x: 2\nc: [{x: 1}, {x: 2}]\n")


# ------------------------------------------------------------------------------ WebDataset bytes
def test_webdataset_parts_are_byte_reproducible(tmp_path, monkeypatch, no_fsync, one_thread):
    """Two identical stage-1 runs (at other times) write byte-identical WebDataset parts."""
    import hashlib
    import time

    from reliability_helpers import make_data, save_base_model, stage1_config, stage1_in_process

    make_data(tmp_path / "shards", n_shards=1, per_shard=3)
    base = save_base_model(tmp_path / "base.safetensors")
    digests = []
    for run, clock in enumerate((1.0e9, 2.0e9)):
        monkeypatch.setattr(time, "time", lambda clock=clock: clock)
        cfg = stage1_config(tmp_path / "shards", tmp_path / f"cache{run}", backend="webdataset")
        stage1_in_process(cfg, base)
        parts = tmp_path / f"cache{run}" / "parts"
        digests.append({p.relative_to(parts).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(parts.rglob("*")) if p.is_file()})
    assert digests[0] and digests[0] == digests[1]


# ------------------------------------------------------------------------------ duplicate keys
def _dup_shards(directory, n_shards: int = 2, per_shard: int = 4) -> str:
    """Shards cut from separate folders: every shard holds s0000.jpg .. s0003.jpg; the images
    differ (sizes too, so a sample trained against another's record cannot go unnoticed)."""
    from image_helpers import encode, smooth_image, write_tar

    rng = np.random.default_rng(5)
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            image = smooth_image(rng, 24 + 8 * s, 40 - 4 * i)
            members += [(f"s{i:04d}.jpg", encode(image, "JPEG", quality=90)),
                        (f"s{i:04d}.cls", str(s).encode())]
        write_tar(directory / f"shard-{s:06d}.tar", members)
    return str(directory)


def _stage2_inputs(cache, source_path, tmp_path, kind="webdataset"):
    from reliability_helpers import Source, run_config

    from stages.train import DistEnv, resolve_inputs

    run = run_config()
    return resolve_inputs(run, cache=str(cache), source=Source(source_path, kind), base=None,
                          view_policy=None, device=torch.device("cpu"), out_dir=tmp_path / "run",
                          dist=DistEnv())


def _one_record_per_sample(inputs) -> list[str]:
    """Problems of the stage-2 mapping: every source sample on its own record, whose key and
    source size are the sample's."""
    from stages.sources import decode_image
    from storage import open_cache

    problems = []
    index = inputs.cache_index
    rows = index[index >= 0]
    if len(set(rows.tolist())) != len(rows):
        problems.append(f"{len(rows) - len(set(rows.tolist()))} records serve two samples")
    reader = open_cache(inputs.cache_path)
    source = inputs.source_index
    for i, row in enumerate(index.tolist()):
        if row < 0:
            problems.append(f"sample {source.keys[i]} has no record")
            continue
        rec = reader.read(row, 0)
        size = decode_image(source.read_bytes(i)).shape[:2]
        if rec["key"] != source.keys[i] or tuple(rec["source_size"]) != tuple(size):
            problems.append(f"sample {source.keys[i]} {size} reads record {rec['key']} "
                            f"{tuple(rec['source_size'])}")
    return problems


@category("duplicate_keys")
@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_shards_sharing_member_names_are_cached_and_trained_apart(tmp_path, backend, no_fsync,
                                                                  one_thread, record_property):
    from reliability_helpers import (
        record_details,
        save_base_model,
        stage1_config,
        stage1_in_process,
    )

    from storage import open_cache, verify_cache

    shards = _dup_shards(tmp_path / "shards")
    cfg = stage1_config(shards, tmp_path / "cache", backend=backend)
    stage1_in_process(cfg, save_base_model(tmp_path / "base.safetensors"))
    reader = open_cache(cfg.cache)
    assert reader.num_samples == 8 and len(set(reader.keys)) == 8, reader.keys
    assert "shard-000001/s0000" in reader.keys
    assert verify_cache(cfg.cache) == []
    problems = _one_record_per_sample(_stage2_inputs(cfg.cache, shards, tmp_path))
    record_details(record_property, keys=sorted(reader.keys))
    assert not problems, problems


def _folder_with_shared_stems(root):
    from image_helpers import encode, smooth_image

    rng = np.random.default_rng(9)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, size in (("x.jpg", (30, 20)), ("x.png", (20, 36)), ("y.png", (28, 28))):
            image = smooth_image(rng, *size)
            (root / cls / name).write_bytes(encode(image, name.rsplit(".", 1)[1].replace(
                "jpg", "JPEG").upper()))
    return str(root)


@category("duplicate_keys")
def test_image_folder_files_sharing_a_stem_are_cached_under_their_own_keys(tmp_path, no_fsync,
                                                                          one_thread):
    """x.jpg beside x.png: both cached (keys keep the extension), never a failed part."""
    from reliability_helpers import save_base_model, stage1_config

    from stages.configs import to_dict
    from stages.resolve import resolve_base
    from stages.stage1 import BaseModelActor, _prepare_cache, process_shard
    from storage import open_cache

    root = _folder_with_shared_stems(tmp_path / "folder")
    base = save_base_model(tmp_path / "base.safetensors")
    cfg = stage1_config(root, tmp_path / "cache")
    cfg.source.kind, cfg.source.shard_size = "imagefolder", 4
    writer, jobs = _prepare_cache(cfg, resolve_base(base), measure_error=False)
    actor = BaseModelActor(to_dict(base), cfg.last_n, cfg.k_max, float16=True)
    for job in jobs:
        process_shard(job, [actor], writer)
    writer.finalize()
    reader = open_cache(cfg.cache)
    assert sorted(reader.keys) == ["a/x.jpg", "a/x.png", "a/y", "b/x.jpg", "b/x.png", "b/y"]
    problems = _one_record_per_sample(_stage2_inputs(cfg.cache, root, tmp_path, "imagefolder"))
    assert not problems, problems


def test_unique_keys_qualifies_repeats_and_reports_taken_names():
    from stages.sources import unique_keys

    renames = unique_keys([["a", "b", "x"], ["a", "c"], ["b", "s1/a"]], ["s0", "s1", "s2"])
    assert renames == [{"a": "s0/a", "b": "s0/b"}, {"a": None}, {"b": "s2/b"}]
    assert unique_keys([["a"], ["b"]], ["s0", "s1"]) == [{}, {}]


# ------------------------------------------------------------------------------ missing records
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two shards of distinct keys, a base model and an intact zarr cache (no Ray)."""
    from reliability_helpers import (
        fsync_off,
        make_data,
        save_base_model,
        stage1_config,
        stage1_in_process,
    )

    tmp = tmp_path_factory.mktemp("silent")
    make_data(tmp / "shards", n_shards=2, per_shard=4)
    base = save_base_model(tmp / "base.safetensors")
    cfg = stage1_config(tmp / "shards", tmp / "cache")
    with fsync_off():
        stage1_in_process(cfg, base)
    return {"tmp": tmp, "base": base, "cache": tmp / "cache", "shards": str(tmp / "shards")}


def _copy(world, name: str):
    import shutil

    root = world["tmp"] / "copies" / name
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(world["cache"], root, symlinks=True)
    return root


def _link_part(root, part="shard-000001", to="shard-000000"):
    import shutil

    shutil.rmtree(root / "parts" / part)
    (root / "parts" / part).symlink_to(to)


def _train_cli(world, cache, tag, run=None):
    from reliability_helpers import invoke_cli, pipeline_yaml

    config = pipeline_yaml(world["tmp"] / "configs" / f"{tag}.yaml", shards=world["shards"],
                           base=world["base"], cache=cache, workdir=world["tmp"] / "work" / tag,
                           run=run)
    return invoke_cli(["train", config, "--run", "tec"]), world["tmp"] / "work" / tag


@category("missing_records")
def test_a_part_linked_to_another_is_refused_naming_the_part(world, no_fsync, one_thread):
    """online_fraction 0: the part's samples must not go online without a word."""
    from reliability_helpers import one_line_error

    root = _copy(world, "linked")
    _link_part(root)
    (code, stderr, exc), _ = _train_cli(world, root, "linked")
    ok, detail = one_line_error(code, stderr, exc, ("shard-000001", "max_fallback_fraction",
                                                     "tec cache repair"))
    assert ok, detail


@category("missing_records")
def test_an_allowed_fallback_is_counted_in_the_summary_and_metrics(world, no_fsync, one_thread):
    import csv

    root = _copy(world, "allowed")
    _link_part(root)
    (code, stderr, exc), work = _train_cli(world, root, "allowed",
                                           run={"max_fallback_fraction": 0.5})
    assert code == 0 and exc is None, stderr[-2000:]
    with open(work / "runs" / "tec" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # 4 of 8 samples lack their record: half of every epoch's samples (2 epochs, batch 4)
    assert rows and int(float(rows[-1]["fallback_online"])) == 8, rows[-1]


@category("missing_records")
def test_samples_stage1_reported_bad_are_skipped_not_counted(tmp_path, no_fsync, one_thread):
    """A cache whose parts report bad samples is complete: no fallback, no refusal."""
    from image_helpers import make_bad_shard
    from reliability_helpers import (
        Source,
        make_data,
        run_config,
        save_base_model,
        stage1_config,
        stage1_in_process,
    )

    from stages.train import train

    make_data(tmp_path / "shards", n_shards=1, per_shard=4)
    make_bad_shard(tmp_path / "shards" / "zz-bad.tar")
    base = save_base_model(tmp_path / "base.safetensors")
    cfg = stage1_config(tmp_path / "shards", tmp_path / "cache")
    stage1_in_process(cfg, base)
    summary = train(run_config(epochs=1, batch_size=4), cache=cfg.cache,
                    source=Source(str(tmp_path / "shards")), base=base, out_dir=tmp_path / "run",
                    progress=False)
    assert summary.fallback_online == 0 and summary.skipped_missing > 0


# ------------------------------------------------------------------------------ stale reuse
def _run_cli(config, *extra):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["run", str(config), "--only", "train", *extra],
                                env={"TEC_DEBUG": ""})
    return result


@category("stale_reuse")
def test_tec_run_reuses_only_what_was_built_from_the_same_inputs(world, tmp_path, no_fsync,
                                                                 one_thread, record_property):
    from reliability_helpers import (
        invoke_cli,
        one_line_error,
        pipeline_yaml,
        record_cases,
        stage1_config,
        stage1_in_process,
    )

    work = tmp_path / "work"
    config = pipeline_yaml(tmp_path / "p.yaml", shards=world["shards"], base=world["base"],
                           cache=world["cache"], workdir=work)
    results = {}
    first = _run_cli(config)
    again = _run_cli(config)
    results["same inputs: reused"] = ("reused finished run" in again.stdout,
                                      again.stdout[-400:] + again.stderr[-400:])
    # a new cache with other views at another path
    other = stage1_config(world["shards"], tmp_path / "cache3", views=3)
    stage1_in_process(other, world["base"])
    config3 = pipeline_yaml(tmp_path / "p3.yaml", shards=world["shards"], base=world["base"],
                            cache=tmp_path / "cache3", workdir=work)
    new_cache = _run_cli(config3)
    out = new_cache.stdout
    results["other cache: trained anew, says the cache changed"] = (
        new_cache.exit_code == 0 and "reused" not in out and "trained anew" in out
        and "the cache (" in out and (work / "runs" / "tec.stale-1").is_dir(),
        out[-600:] + new_cache.stderr[-600:])
    changed = _run_cli(config3, "--set", "runs.tec.blr=0.01")
    results["other blr: trained anew, says blr changed"] = (
        changed.exit_code == 0 and "trained anew" in changed.stdout and "blr" in changed.stdout,
        changed.stdout[-600:] + changed.stderr[-600:])
    # `tec train` refuses to continue a run of other settings, naming them
    code, stderr, exc = invoke_cli(["train", config3, "--run", "tec", "--set",
                                    "runs.tec.model.k=2"])
    results["tec train: refused naming the change"] = one_line_error(code, stderr, exc,
                                                                     ("model.k 4 -> 2",))
    record_cases(record_property, results)
    assert first.exit_code == 0, first.stderr[-2000:]
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items()
                                                   if not ok}


@category("stale_reuse")
def test_tec_run_does_not_reuse_a_run_for_views_the_cache_gained_after_it(
        world, tmp_path, no_fsync, one_thread, record_property):
    """After `tec cache extend --views`, a finished run of the old targets.views is reused and a
    config naming the new K trains anew (saying the views read changed), not the old run."""
    import json
    import shutil

    from reliability_helpers import pipeline_yaml, record_cases, stage1_config, stage1_in_process

    from storage.schema import manifest_identity

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    work = tmp_path / "work"
    config = pipeline_yaml(tmp_path / "p.yaml", shards=world["shards"], base=world["base"],
                           cache=cache, workdir=work)
    first = _run_cli(config)
    # views 2..2 in a view layer, the manifest entry last: what `tec cache extend --views 3` does
    layer = cache / "extensions" / "views-2-3"
    stage1_in_process(stage1_config(world["shards"], layer, views=1, first_view=2), world["base"])
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["extensions"] = [{"kind": "views", "path": "extensions/views-2-3", "views": [2, 3],
                               "identity": manifest_identity(json.loads(
                                   (layer / "manifest.json").read_text()))}]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    results = {}
    same = _run_cli(config)
    results["old K: reused"] = (same.exit_code == 0 and "reused finished run" in same.stdout,
                                same.stdout[-600:] + same.stderr[-600:])
    grown = _run_cli(config, "--set", "targets.views=3")
    results["new K: trained anew, says the views read changed"] = (
        grown.exit_code == 0 and "reused" not in grown.stdout and "trained anew" in grown.stdout
        and "the cache's views read (as built -> 3: tec cache extend --views)" in grown.stdout,
        grown.stdout[-800:] + grown.stderr[-600:])
    again = _run_cli(config, "--set", "targets.views=3")
    results["new K again: reused"] = ("reused finished run" in again.stdout, again.stdout[-600:])
    record_cases(record_property, results)
    assert first.exit_code == 0, first.stderr[-2000:]
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items()
                                                   if not ok}


def test_identity_changes_name_settings_cache_sections_and_base():
    from stages.identity import identity_changes

    old = {"run": {"blr": 0.1, "model": {"k": 4}}, "cache": {"identity": "a", "sections": {
        "spec": "1", "view_policy": "2"}}, "base_model": {"checkpoint_sha256": "x"}}
    new = {"run": {"blr": 0.2, "model": {"k": 4}, "num_workers": 3},
           "cache": {"identity": "b", "sections": {"spec": "1", "view_policy": "3"}},
           "base_model": {"checkpoint_sha256": "y"}}
    assert identity_changes(old, new) == ["blr 0.1 -> 0.2", "the cache (view_policy changed)",
                                          "the base model (checkpoint_sha256)"]
    assert identity_changes(old, old) == []
    assert "older version" in identity_changes(None, new)[0]
    # the same cache read with more views or shards than a run was trained on (tec cache extend)
    grown = {**old, "cache": {**old["cache"], "views": 5, "shards": ["e1"]}}
    assert identity_changes(old, grown) == [
        "the cache's views read (as built -> 5: tec cache extend --views)",
        "the cache's shards read (0 -> 1 shard extensions: tec cache extend --shards)"]
    assert identity_changes(grown, grown) == []


# ------------------------------------------------------------------------------ stage 1 helpers
@pytest.fixture
def ray_in_process(monkeypatch):
    """run_stage1 without Ray: the shard tasks run here, one after another, with the real
    base-model actor class and the real failure classification (stages.stage1.task_failure)."""
    import stages.stage1 as s1
    import stages.stage1.driver as s1_driver  # the module run_stage1 looks _run_on_ray up in
    from stages.configs import to_dict

    attempts = []

    def run(cfg, base, jobs, ray_address, progress):
        actor = s1.BaseModelActor(to_dict(base), cfg.last_n, cfg.k_max,
                                  float16=cfg.codec == "float16")
        results, failed = [], []
        for job in jobs:
            attempts.append(job.part)
            try:
                results.append(s1.process_shard(job, [actor]))
            except Exception as exc:  # as ray.get raises it: the task's own exception
                reason, fixed = s1.task_failure(exc)
                failed.append((job.part, reason, fixed))
                if isinstance(exc, s1.NonFiniteTargetsError):
                    break
        return results, failed, None

    monkeypatch.setattr(s1_driver, "_run_on_ray", run)
    monkeypatch.setenv("TEC_CACHE_FSYNC", "0")
    return attempts


def _nan_base_model(path):
    from reliability_helpers import save_base_model
    from safetensors.torch import load_file, save_file

    base = save_base_model(path)
    state = load_file(str(path))
    state["blocks.2.mlp.fc2.bias"][0] = float("nan")
    save_file(state, str(path))
    return base


# ------------------------------------------------------------------------------ deterministic
@category("deterministic_failures")
def test_a_base_model_giving_nan_fails_once_saying_what_to_change(tmp_path, ray_in_process,
                                                                 one_thread):
    from reliability_helpers import make_data, stage1_config

    from stages.stage1 import Stage1Error, run_stage1

    make_data(tmp_path / "shards", n_shards=3, per_shard=2)
    base = _nan_base_model(tmp_path / "nan.safetensors")
    cfg = stage1_config(tmp_path / "shards", tmp_path / "cache")
    with pytest.raises(Stage1Error) as info:
        run_stage1(cfg, base, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "non-finite" in message and "base_model.checkpoint" in message, message
    assert "rerun to resume" not in message and "not retried" in message, message
    assert ray_in_process == ["shard-000000"]  # once, and no other part started after it


def test_task_failures_are_classified():
    from stages.stage1 import NonFiniteTargetsError, failure_message, task_failure
    from storage import CacheError

    assert task_failure(NonFiniteTargetsError("part p: NaN"))[1] is True
    assert task_failure(CacheError("part p: key 'x' is written twice"))[1] is True
    assert task_failure(OSError("disk went away"))[1] is False
    assert "rerun to resume" in failure_message([("p", "OSError: x", False)], 3, 3)
    assert "rerun to resume" not in failure_message([("p", "key twice", True)], 3, 3)


@pytest.mark.slow
@pytest.mark.timeout(600)
@category("deterministic_failures")
def test_on_ray_a_nan_base_model_is_tried_once_per_part(tmp_path, monkeypatch, one_thread):
    """The real Ray path: the failing task is not retried and no further part is started."""
    import ray
    from fault_helpers import FaultHooks
    from reliability_helpers import make_data, stage1_config

    from stages.stage1 import Stage1Error, run_stage1

    make_data(tmp_path / "shards", n_shards=4, per_shard=2)
    base = _nan_base_model(tmp_path / "nan.safetensors")
    (tmp_path / "attempts").mkdir()
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("TEC_CACHE_FSYNC", "0")
    cfg = stage1_config(tmp_path / "shards", tmp_path / "cache",
                        ray={"num_cpus": 2, "concurrent_shards": 1, "max_retries": 3})
    try:
        with pytest.raises(Stage1Error) as info:
            run_stage1(cfg, base, progress=False,
                       hooks=FaultHooks(attempts_dir=tmp_path / "attempts"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    attempts = sorted(p.name.split(".")[0] for p in (tmp_path / "attempts").iterdir())
    assert "not retried" in str(info.value) and "non-finite" in str(info.value), info.value
    assert attempts == ["shard-000000"], attempts


# ------------------------------------------------------------------------------ --strict
def test_strict_prints_its_summary_on_stdout(tmp_path, ray_in_process, one_thread):
    from click.testing import CliRunner
    from image_helpers import make_bad_shard
    from reliability_helpers import make_data, pipeline_yaml, save_base_model

    from pipeline.cli import main

    make_data(tmp_path / "shards", n_shards=1, per_shard=2)
    make_bad_shard(tmp_path / "shards" / "zz-bad.tar")
    config = pipeline_yaml(tmp_path / "p.yaml", shards=tmp_path / "shards",
                           base=save_base_model(tmp_path / "base.safetensors"),
                           cache=tmp_path / "cache", workdir=tmp_path / "work")
    result = CliRunner().invoke(main, ["targets", str(config), "--strict"],
                                env={"TEC_DEBUG": ""})
    assert result.exit_code == 2, result.output
    assert "bad samples" in result.stdout and "target cache" in result.stdout, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "strict" in errors[0], result.stderr[-1000:]


# ------------------------------------------------------------------------------ deep damage
class _NumpyWithoutFiniteCheck:
    """numpy, except that isfinite says yes: a writer that does not check its values."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def isfinite(a):
        return np.ones(np.shape(a), dtype=bool)


def _write_nan_part(root, monkeypatch, part="shard-000001"):
    """Rewrite a part as a broken writer would: right checksums, NaN in one record."""
    from storage import open_cache, open_writer

    monkeypatch.setattr("storage.codecs.np", _NumpyWithoutFiniteCheck())

    reader = open_cache(root)
    start, stop = reader.part_range(part)
    records = []
    for i in range(start, stop):
        views = [reader.read(i, v) for v in range(reader.views_per_sample)]
        rec = {k: np.stack([np.asarray(r[k]) for r in views]) for k in (
            "features", "feature_mean", "feature_std", "attn_logits", "attn_index", "crop",
            "flip")}
        rec["source_size"] = tuple(int(x) for x in views[0]["source_size"])
        rec["label"] = int(views[0]["label"])
        records.append((reader.slot_of(i), views[0]["key"], rec))
    reader.close()
    records[1][2]["features"][1, 3, :] = np.nan
    writer = open_writer(root)
    pw = writer.open_part(part, overwrite=True)
    for slot, key, rec in records:
        pw.write(slot, key, rec)
    pw.commit(report=[])
    writer.finalize()
    monkeypatch.undo()


def _part_digests(root) -> dict:
    import hashlib

    parts = root / "parts"
    return {p.relative_to(parts).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(parts.rglob("*")) if p.is_file()}


@category("deep_damage")
def test_verify_deep_finds_nan_records_and_repair_recomputes_only_that_part(
        world, ray_in_process, one_thread, record_property):
    from reliability_helpers import invoke_cli, record_cases

    root = _copy(world, "nan")
    with pytest.MonkeyPatch.context() as mp:
        _write_nan_part(root, mp)
    results = {}
    code, stderr, exc = invoke_cli(["cache", "verify", root])
    results["plain verify passes (checksums are right)"] = (code == 0 and exc is None, stderr)
    code, stderr, exc = invoke_cli(["cache", "verify", root, "--deep"])
    bad = [line for line in stderr.splitlines() if line.startswith("BAD ")]
    results["verify --deep names the part and the NaN"] = (
        code == 1 and len(bad) == 1 and "shard-000001" in bad[0] and "non-finite" in bad[0],
        stderr[-800:])
    intact = _part_digests(world["cache"])
    code, stderr, exc = invoke_cli(["cache", "repair", root])
    results["repair exits 0"] = (code == 0 and exc is None, stderr[-1500:] + repr(exc))
    results["repair recomputed exactly shard-000001"] = (ray_in_process == ["shard-000001"],
                                                         str(ray_in_process))
    results["repaired part is byte-identical to the intact one"] = (
        _part_digests(root) == intact, "part files differ from the intact cache")
    code, stderr, exc = invoke_cli(["cache", "verify", root, "--deep"])
    results["verify --deep passes after the repair"] = (code == 0, stderr[-800:])
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items()
                                                   if not ok}


@category("deep_damage")
def test_inspect_and_repair_of_a_part_linked_to_another(world, ray_in_process, one_thread,
                                                        record_property):
    from reliability_helpers import invoke_cli, record_cases

    from storage import format_inspect, inspect_cache

    root = _copy(world, "linked-repair")
    _link_part(root)
    results = {}
    info = inspect_cache(root)
    text = format_inspect(info)
    results["inspect does not say complete"] = (not info["complete"] and "DAMAGED" in text
                                                and "shard-000001" in text, text[-600:])
    code, stderr, exc = invoke_cli(["cache", "repair", root])
    results["repair recomputes the linked part only"] = (
        code == 0 and ray_in_process == ["shard-000001"], stderr[-1500:] + str(ray_in_process))
    results["repaired cache is byte-identical"] = (_part_digests(root) == _part_digests(
        world["cache"]), "part files differ")
    results["inspect says complete again"] = (inspect_cache(root)["complete"], "")
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items()
                                                   if not ok}
