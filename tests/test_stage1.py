"""Stage 1 (Ray precompute): the cache holds exactly the base model's targets of the policy's views,
runs are deterministic, resumable after a killed driver, survive killed workers, and skip bad
samples. One local Ray instance (2 CPUs) is shared by the tests of this module.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_helpers import FaultHooks
from image_helpers import make_bad_shard, make_shards
from stage1_helpers import (  # noqa: F401 (fixtures are used as test arguments)
    ARCH,
    BASE_KWARGS,
    K_MAX,
    REPO,
    VIEWS,
    _free_port,
    _ray_env,
    all_records,
    assert_same_records,
    base,
    driver_cmd,
    folder,
    kill_session,
    make_cfg,
    ray_session,
    reference,
    shards,
    source_images,
)

from stages.configs import BaseModelConfig, ConfigError, from_dict, to_dict
from stages.stage1 import (
    REPORT_NAME,
    BaseModelActor,
    ShardJob,
    Stage1Config,
    Stage1Error,
    Stage1StrictError,
    part_names,
    process_shard,
    run_stage1,
)
from stages.views import ViewPolicy, render_views, view_params, views_from_arrays
from storage import create_cache, open_cache, verify_cache
from tec.targets import extract_targets, normalize_images


# ------------------------------------------------------------------------------ configuration
def test_config_rejects_bad_values_with_the_key_named():
    with pytest.raises(ConfigError, match="targets.views"):
        from_dict(Stage1Config, {"source": {"path": "x"}, "cache": "c", "views": 0}, "targets")
    with pytest.raises(ConfigError, match="unknown key targets.ray.cpus"):
        from_dict(Stage1Config, {"source": {"path": "x"}, "cache": "c", "ray": {"cpus": 2}},
                  "targets")
    with pytest.raises(ConfigError, match="source.path"):
        from_dict(Stage1Config, {"cache": "c"}, "targets")
    with pytest.raises(ConfigError, match="interpolation"):
        from_dict(Stage1Config, {"source": {"path": "x"}, "cache": "c",
                                 "view_policy": {"interpolation": "lanczos9"}}, "targets")
    cfg = from_dict(Stage1Config, {"source": {"path": "x"}, "cache": "c",
                                   "view_policy": {"scale": [0.5, 1.0], "output_size": 32}})
    assert isinstance(cfg.view_policy, ViewPolicy) and cfg.view_policy.scale == (0.5, 1.0)


def test_missing_checkpoint_and_wrong_output_size_fail_before_any_work(base, shards, tmp_path):
    random_base = BaseModelConfig(arch=ARCH, checkpoint=None, timm_kwargs=dict(BASE_KWARGS))
    with pytest.raises(Stage1Error, match="base_model.checkpoint"):
        run_stage1(make_cfg(shards, tmp_path / "a"), random_base, progress=False)
    cfg = make_cfg(shards, tmp_path / "b", view_policy={"output_size": 48})
    with pytest.raises(Stage1Error, match="output_size 48 differs .* img_size 32"):
        run_stage1(cfg, base, progress=False)
    with pytest.raises(Stage1Error, match="k_max 17 exceeds"):
        run_stage1(make_cfg(shards, tmp_path / "c", k_max=17), base, progress=False)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_unreachable_ray_address_fails_fast_with_one_line():
    from stages.stage1 import _check_reachable

    with pytest.raises(Stage1Error, match="cannot reach the Ray head at 127.0.0.1:1 .*ray-address"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # not host:port: left to Ray


def test_plan_gives_actors_a_gpu_each_or_most_cpu_threads():
    from stages.stage1 import plan_actors

    cfg = make_cfg(Path("x"), Path("c"))
    gpu = plan_actors(cfg, {"CPU": 16, "GPU": 4})
    assert (gpu.num_actors, gpu.actor_options, gpu.concurrent) == \
        (4, {"num_gpus": 1, "num_cpus": 1}, 12)
    small = plan_actors(cfg, {"CPU": 2})  # this machine: one actor thread, one decoding task
    assert (small.num_actors, small.threads, small.actor_options, small.concurrent) == \
        (1, 1, {"num_cpus": 1}, 1)
    big = plan_actors(cfg, {"CPU": 64})
    assert big.num_actors == 4 and big.threads == 12 and big.concurrent == 16
    one = plan_actors(cfg, {"CPU": 1})  # never starve the shard tasks of their CPU
    assert one.actor_options == {"num_cpus": 0} and one.concurrent == 1
    fixed = plan_actors(make_cfg(Path("x"), Path("c"), ray={"num_actors": 2, "threads_per_actor": 3,
                                                            "concurrent_shards": 5}), {"CPU": 8})
    assert (fixed.num_actors, fixed.threads, fixed.concurrent) == (2, 3, 5)


def test_stored_view_pixels_are_what_stage_2_decodes():
    from stages.stage1 import stored_view_pixels
    from stages.synthetic import smooth_image
    from storage.pixels import decode_pixels

    rng = np.random.default_rng(0)
    views = torch.from_numpy(np.stack([smooth_image(rng, 16, 16) for _ in range(2)])).permute(
        0, 3, 1, 2).contiguous()  # [K,3,S,S] as rendered
    encoded, fed = stored_view_pixels(views, "jpeg", 90)
    assert len(encoded) == 2 and fed.shape == views.shape and fed.dtype == torch.uint8
    for data, pixels in zip(encoded, fed):  # the base model sees the decoded JPEG, not the view
        np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), decode_pixels(data))
    assert not torch.equal(fed, views)
    encoded, fed = stored_view_pixels(views, "png", 90)  # lossless: the views themselves
    assert fed is views
    np.testing.assert_array_equal(decode_pixels(encoded[1]), views[1].permute(1, 2, 0).numpy())


def test_part_names_follow_shard_file_names_and_stay_unique():
    assert part_names(["/d/train-000001.tar", "/d/train-000002.tar"]) == \
        ["train-000001", "train-000002"]
    assert part_names(["/a/x.tar", "/b/x.tar"]) == ["000000-x", "000001-x"]


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("backend,kind", [("zarr", "webdataset"), ("webdataset", "imagefolder")])
def test_cache_equals_in_process_targets_of_replayed_views(ray_session, base, shards, folder,
                                                          tmp_path, reference, backend, kind):
    if backend == "zarr":
        cfg, summary = reference
    else:
        cfg = make_cfg(folder, tmp_path / "cache", kind=kind, backend=backend)
        summary = run_stage1(cfg, base, progress=False)
    assert verify_cache(cfg.cache) == []
    images = source_images(folder if kind == "imagefolder" else shards, kind)
    per_part = [5, 5, 5] if kind == "webdataset" else [6, 6, 3]
    assert summary.images == len(images) == 15 and summary.skipped == 0
    assert summary.parts_done == 3 and summary.parts_skipped == 0
    assert summary.views == 15 * VIEWS
    assert summary.forward_passes == sum(-(-n * VIEWS // 4) for n in per_part)  # batch_size 4

    cache = open_cache(cfg.cache)
    assert cache.manifest["view_policy"]["views"] == VIEWS
    assert cache.manifest["base_model"]["k_max"] == K_MAX
    assert cache.manifest["base_model"]["checkpoint_sha256"]
    assert cache.manifest["source"]["num_samples"] == 15
    names = [f"shard-{i:06d}" if kind == "webdataset" else f"imagefolder-{i:05d}"
             for i in range(3)]
    assert [(p["name"], p["slots"]) for p in cache.manifest["parts"]] == list(zip(names, per_part))
    assert sorted(cache.keys) == sorted(images)
    model = base.load()
    policy = cfg.view_policy
    pixels, stored = [], []
    for i, key in enumerate(cache.keys):
        image, label = images[key]
        assert int(cache.labels[i]) == label
        assert cache.source_size(i) == image.shape[:2]
        recs = [cache.read(i, v) for v in range(VIEWS)]
        views = views_from_arrays(np.stack([r["crop"] for r in recs]),
                                  np.stack([r["flip"] for r in recs]))
        # the recorded views are the policy's views, drawn in other (Ray worker) processes
        assert views == [view_params(policy, key, v, *image.shape[:2]) for v in range(VIEWS)]
        pixels.append(render_views(image, views, policy.output_size, policy.interpolation))
        stored.extend(recs)
    expected = extract_targets(model, normalize_images(torch.cat(pixels)), last_n=2, k_max=K_MAX)
    got = {name: np.stack([r[name] for r in stored]) for name in
           ("features", "feature_mean", "feature_std", "attn_logits", "attn_index")}
    # features and attn_logits are stored as float16: compare within its rounding
    np.testing.assert_allclose(got["features"], expected.features.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["attn_logits"], expected.attn_logits.numpy(), rtol=2e-3,
                               atol=2e-3)
    np.testing.assert_allclose(got["feature_mean"], expected.feature_mean.numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got["feature_std"], expected.feature_std.numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(got["attn_index"], expected.attn_index.numpy())


def test_two_runs_write_identical_caches(ray_session, base, shards, tmp_path, reference):
    """Same config, same bytes: every part file of a second run equals the first run's (the views
    are drawn in Ray worker processes, each with its own hash seed)."""
    ref_cfg, _ = reference
    cfg = make_cfg(shards, tmp_path / "again")
    run_stage1(cfg, base, progress=False)
    assert_same_records(all_records(ref_cfg.cache), all_records(cfg.cache))
    first, second = Path(ref_cfg.cache) / "parts", Path(cfg.cache) / "parts"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_process_shard_runs_without_ray(base, shards, tmp_path, reference):
    """The shard pipeline is plain Python: with an in-process actor it writes the same part."""
    from storage import CacheSpec

    ref = open_cache(reference[0].cache).manifest
    writer = create_cache(tmp_path / "cache", CacheSpec.from_dict(ref["spec"]),
                          base_model=ref["base_model"], view_policy=ref["view_policy"],
                          source=ref["source"], targets=ref["targets"],
                          parts=[(p["name"], p["slots"]) for p in ref["parts"]])
    job = ShardJob(shard=str(shards / "shard-000001.tar"), part="shard-000001", index=1, slots=5,
                   source_kind="webdataset", source_path=str(shards), shard_size=6,
                   cache=str(tmp_path / "cache"), views=VIEWS,
                   policy={k: v for k, v in ref["view_policy"].items() if k != "views"},
                   batch_size=4, max_in_flight=2)
    actor = BaseModelActor(to_dict(base), 2, K_MAX, float16=True)
    result = process_shard(job, [actor], writer)
    assert (result.images, result.views, result.forward_passes, result.bad) == (5, 15, 4, [])
    assert writer.is_committed("shard-000001")
    got = open_cache(tmp_path / "cache", require_complete=False)
    want = open_cache(reference[0].cache)
    assert got.keys == [k for k in want.keys if k.startswith("s001_")]
    for i, key in enumerate(got.keys):
        for v in range(VIEWS):
            a, b = got.read(i, v), want.read(want.index_of(key), v)
            np.testing.assert_array_equal(a["crop"], b["crop"])
            np.testing.assert_array_equal(a["attn_index"], b["attn_index"])
            np.testing.assert_allclose(a["features"], b["features"], rtol=2e-3, atol=2e-3)


def test_a_part_committed_by_another_writer_meanwhile_counts_as_already_committed(
        base, shards, tmp_path, reference):
    """A worker of a killed earlier run (its Ray workers outlive the driver a few seconds) may
    commit a part while the resumed run's task computes it: the task then reports the part as
    already committed (tasks are deterministic) instead of failing, and that copy is kept."""
    import shutil

    from storage import CacheSpec, layout

    ref_root = Path(reference[0].cache)
    ref = open_cache(ref_root).manifest
    root = tmp_path / "cache"
    writer = create_cache(root, CacheSpec.from_dict(ref["spec"]),
                          base_model=ref["base_model"], view_policy=ref["view_policy"],
                          source=ref["source"], targets=ref["targets"],
                          parts=[(p["name"], p["slots"]) for p in ref["parts"]])
    job = ShardJob(shard=str(shards / "shard-000001.tar"), part="shard-000001", index=1, slots=5,
                   source_kind="webdataset", source_path=str(shards), shard_size=6,
                   cache=str(root), views=VIEWS,
                   policy={k: v for k, v in ref["view_policy"].items() if k != "views"},
                   batch_size=4, max_in_flight=2)
    actor = BaseModelActor(to_dict(base), 2, K_MAX, float16=True)
    calls = []

    def racing_actor(batch):
        if not calls:  # during this task's first batch, the other writer commits the part
            shutil.copytree(layout.part_dir(ref_root, job.part), layout.part_dir(root, job.part))
            layout.marker_path(root, job.part).parent.mkdir(exist_ok=True)
            shutil.copy(layout.marker_path(ref_root, job.part), layout.marker_path(root, job.part))
        calls.append(len(batch))
        return actor(batch)

    result = process_shard(job, [racing_actor], writer)
    assert len(calls) == 4  # the task ran to its commit
    assert result.already_committed and (result.images, result.forward_passes) == (0, 0)
    assert writer.part_marker(job.part) == json.loads(
        layout.marker_path(ref_root, job.part).read_text())  # the other copy is kept as it was
    assert not any(layout.part_tmp_root(root, job.part).glob("*"))  # this copy was dropped
    assert verify_cache(root) == [f"part {p}: not committed"
                                  for p in ("shard-000000", "shard-000002")]

def test_rerun_skips_committed_parts(ray_session, base, reference):
    cfg, _ = reference
    summary = run_stage1(cfg, base, progress=False)
    assert summary.parts_skipped == 3 and summary.parts_done == 0
    assert summary.images == 0 and summary.forward_passes == 0
    assert "3 already committed" in summary.format()


# ------------------------------------------------------------------------------ failures
def test_killed_worker_task_is_retried_and_the_cache_completes(ray_session, base, shards,
                                                               tmp_path, reference, monkeypatch):
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    (crash_dir / "shard-000001.crash").touch()
    cfg = make_cfg(shards, tmp_path / "cache")
    summary = run_stage1(cfg, base, progress=False, hooks=FaultHooks(crash_dir=crash_dir))
    assert (crash_dir / "shard-000001.crashed").exists()  # the first attempt did die
    assert summary.parts_done == 3
    assert_same_records(all_records(reference[0].cache), all_records(cfg.cache))


def test_bad_samples_are_skipped_listed_and_strict_fails_after_finishing(ray_session, base,
                                                                        tmp_path):
    data = tmp_path / "data"
    make_shards(data, n_shards=1, per_shard=3, size_range=(20, 40))
    expected = make_bad_shard(data / "zz-bad.tar")
    cfg = make_cfg(data, tmp_path / "cache", backend="webdataset", strict=True)
    with pytest.raises(Stage1StrictError, match=r"\d+ bad samples .*bad_samples.jsonl"):
        run_stage1(cfg, base, progress=False)

    cache = open_cache(cfg.cache)  # complete despite the error
    good = [f"s000_{i:05d}" for i in range(3)] + expected.good
    assert cache.keys == good
    for key, label in expected.labels.items():
        assert int(cache.labels[cache.index_of(key)]) == label
    for key, size in expected.sizes.items():
        assert cache.source_size(cache.index_of(key)) == size
    report = [json.loads(line) for line in (Path(cfg.cache) / REPORT_NAME).read_text().splitlines()]
    reasons = {}
    for entry in report:
        assert entry["part"] == "zz-bad"
        reasons.setdefault(entry["key"], []).append(entry["reason"])
    for key, reason in expected.bad.items():
        assert any(reason in r for r in reasons.pop(key)), (key, reasons)
    for key, reason in expected.duplicates.items():
        assert any(reason in r for r in reasons.pop(key)), (key, reasons)
    assert not reasons  # nothing else listed

    # not strict: the same (complete) cache is reported, no error
    summary = run_stage1(cfg, base, strict=False, progress=False)
    assert summary.skipped == len(report) and summary.parts_skipped == 2
    assert f"{len(report)} skipped" in summary.format()


@pytest.mark.parametrize("ray_mode", ["joined", pytest.param("local", marks=pytest.mark.slow)])
def test_killed_driver_then_rerun_resumes_without_recomputing(ray_session, base, shards,
                                                               tmp_path, reference, ray_mode):
    """SIGKILL the driver (a subprocess that joined this module's Ray, or that started its own
    local Ray) once a part is committed; the rerun keeps the committed parts as they are."""
    cfg = make_cfg(shards, tmp_path / "cache")
    address = ray_session.get_runtime_context().gcs_address if ray_mode == "joined" else ""
    env = dict(os.environ)
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(driver_cmd(cfg, base, address, hooks={"batch_delay_s": 0.4}),
                                env=env, cwd=REPO,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    status = Path(cfg.cache) / "status"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if status.is_dir() and any(status.glob("*.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        # The dead driver's own local Ray (ray_mode local) leaves workers behind for a while,
        # each in its own process group: end everything in the driver's session.
        kill_session(proc.pid)
    time.sleep(1.5)  # a joined Ray kills the dead driver's workers
    committed = sorted(p.stem for p in status.glob("*.json"))
    assert 1 <= len(committed) < 3, committed
    before = {p: p.stat().st_mtime_ns for part in committed
              for p in [status / f"{part}.json", *(Path(cfg.cache) / "parts" / part).rglob("*")]}

    summary = run_stage1(cfg, base, progress=False)
    assert summary.parts_skipped == len(committed)
    assert summary.parts_done == 3 - len(committed)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # committed parts untouched
    assert_same_records(all_records(reference[0].cache), all_records(cfg.cache))
    tmp = Path(cfg.cache) / "tmp"
    assert not any(p.is_file() for p in tmp.rglob("*"))  # the dead attempt's files are gone


@pytest.mark.slow
def test_joins_a_token_authenticated_ray_head(base, shards, tmp_path, reference):
    """`ray start --head` with token authentication on (as the README shows), then a driver
    that gets only the head's token file (RAY_AUTH_TOKEN_PATH) joins it by address; a driver
    without the token is refused with a one-line error that says how to give it."""
    import secrets

    port = _free_port()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    head_env = _ray_env(tmp_path / "head_home", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=str(token))
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=head_env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:  # wait for the head's GCS port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "ray start failed"
                time.sleep(0.2)
        cfg = make_cfg(shards, tmp_path / "cache")
        # no token: refused, and the message says how to pass it
        refused = subprocess.run(driver_cmd(cfg, base, f"127.0.0.1:{port}"),
                                 env=_ray_env(tmp_path / "stranger_home"), cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0
        assert "RAY_AUTH_TOKEN_PATH" in refused.stderr, refused.stderr[-3000:]
        assert not (Path(cfg.cache) / "status").is_dir() or not any(
            (Path(cfg.cache) / "status").glob("*.json"))
        # with the head's token file: joins and writes the cache
        out = subprocess.run(driver_cmd(cfg, base, f"127.0.0.1:{port}"),
                             env=_ray_env(tmp_path / "driver_home",
                                          RAY_AUTH_TOKEN_PATH=str(token)),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(l for l in out.stdout.splitlines() if l.startswith("SUMMARY"))
        assert json.loads(line.split(" ", 1)[1]) == {"parts_done": 3, "images": 15}
        assert_same_records(all_records(reference[0].cache), all_records(cfg.cache))
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)  # whatever did not stop
        head.wait()


LOCAL_RAY_PROBE = r'''
import json, subprocess
from types import SimpleNamespace
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from stages.stage1 import _connect_ray
cfg = SimpleNamespace(ray=SimpleNamespace(address=None, num_cpus=1, num_gpus=None))
started, address = _connect_ray(cfg, None)
ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
ours = [l.split()[3] for l in ss.splitlines() if "gcs_server" in l or "raylet" in l]
print("PROBE", json.dumps({"started": started, "address": address, "listen": ours,
                           "token": get_authentication_mode() == AuthenticationMode.TOKEN}))
ray.shutdown()
'''


@pytest.mark.slow
def test_local_ray_instance_keeps_token_authentication_on(tmp_path):
    """The local Ray that stage 1 starts has token authentication on. This Ray (2.60) listens
    on all interfaces whatever node IP it is given (README, security notes), so the token is
    what guards it: if a Ray release ever binds loopback only, this test says so."""
    import shutil

    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE],
                         env=_ray_env(tmp_path / "home"), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(next(l for l in out.stdout.splitlines()
                            if l.startswith("PROBE")).split(" ", 1)[1])
    assert probe["started"] and probe["token"], probe
    assert probe["listen"], probe
    loopback_only = all(a.startswith(("127.", "[::1]")) for a in probe["listen"])
    # documented in the README: not loopback-only with this Ray; update the notes if it changes
    assert not loopback_only, f"Ray now binds loopback only ({probe}): update the README notes"
