"""Reliability of stage 1: crashes at random points and shards full of bad samples.

Crashes. A killed run is resumed (or, for a killed Ray worker, retried by Ray) and must end with
a cache bit-identical to an uninterrupted run: same part file bytes, same commit markers and
manifest (timestamps and writer pid aside), same decoded record for every (sample, view), same
bad-sample report, no temp files left. Work lost is counted: the parts computed twice must be
among those in flight when the process died (committed parts are never recomputed).

* fast (default run): the shard task without Ray in a forked child that SIGKILLs itself at a
  random base-model call; the parent resumes;
* slow: Ray. The driver is SIGKILLed at random points (three times while joined to a running
  Ray, once with its own local Ray), and Ray workers are SIGKILLed mid-run (a shard task's
  worker, the base-model actor's worker); 6 random points in all.

Bad input. One shard from ``image_helpers.make_bad_shard`` (corrupt, truncated, non-image,
zero-size, bombs, duplicates, odd modes, pickles, a cut last member) and one of further kinds:
every good sample is cached with its label and size, every bad one is listed with its reason,
non-samples (no image member, non-regular members) are ignored, and the run does not stop.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from image_helpers import encode, make_bad_shard, smooth_image, write_tar
from reliability_helpers import (
    cache_snapshot,
    category,
    child_processes,
    fsync_off,
    make_data,
    record_cases,
    record_details,
    save_base_model,
    sigkill_self,
    snapshot_diff,
    stage1_config,
    stage1_in_process,
    wait_until,
)
from stage1_helpers import DRIVER

pytestmark = pytest.mark.usefixtures("no_fsync")

REPO = Path(__file__).resolve().parents[1]
N_SHARDS = 6
PER_SHARD = 4
BATCH_DELAY_S = 0.25  # per base-model batch, so that a run lasts long enough to be interrupted


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1_rel")
    make_data(tmp / "shards", n_shards=N_SHARDS, per_shard=PER_SHARD)
    base = save_base_model(tmp / "base.safetensors")
    return {"tmp": tmp, "shards": tmp / "shards", "base": base}


def _parts_in(root: Path, sub: str) -> set[str]:
    d = root / sub
    if sub == "status":
        return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()
    return {p.name for p in d.iterdir() if p.is_dir() and any(p.iterdir())} if d.is_dir() else set()


def _mtimes(root: Path, parts: set[str]) -> dict[Path, int]:
    """mtime of every file of the given committed parts (and of their commit markers)."""
    return {p: p.stat().st_mtime_ns for part in parts
            for p in [root / "status" / f"{part}.json", *(root / "parts" / part).rglob("*")]}


class AttemptWatcher:
    """Polls <cache>/tmp/<part>/<attempt>/ in a thread: every attempt at writing each part."""

    def __init__(self, cache: Path, interval: float = 0.02):
        self.cache, self.interval = Path(cache), interval
        self.attempts: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(self.interval)

    def poll(self) -> None:
        tmp = self.cache / "tmp"
        try:
            for part in tmp.iterdir():
                for attempt in part.iterdir():
                    self.attempts.setdefault(part.name, set()).add(attempt.name)
        except OSError:
            pass

    def __enter__(self) -> AttemptWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def repeated(self) -> list[str]:
        return sorted(p for p, a in self.attempts.items() if len(a) > 1)


# ------------------------------------------------------------------------------ fast: no Ray
@pytest.fixture(scope="module")
def in_process_reference(world):
    cfg = stage1_config(world["shards"], world["tmp"] / "ref-in-process")
    with fsync_off():
        stage1_in_process(cfg, world["base"])
    return cache_snapshot(cfg.cache)


def _forked_stage1(cfg, base, kill_at_call: int) -> None:
    """Child: stage 1 without Ray, SIGKILL at base-model call number ``kill_at_call``."""
    def hook(n: int) -> None:
        if n == kill_at_call:
            sigkill_self()
    try:
        import torch

        torch.set_num_threads(1)
        stage1_in_process(cfg, base, actor_hook=hook)
    except BaseException:  # noqa: BLE001 - the child must never return into pytest
        os._exit(3)
    os._exit(0)


@category("stage1_crashes")
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_shard_task_killed_at_a_random_call_resumes_to_an_identical_cache(
        world, in_process_reference, tmp_path, seed, record_property, one_thread):
    calls_per_part = -(-PER_SHARD * 2 // 4)  # K=2 views, batch 4
    kill_at = int(np.random.default_rng([3, seed]).integers(1, N_SHARDS * calls_per_part + 1))
    cfg = stage1_config(world["shards"], tmp_path / "cache")
    proc = multiprocessing.get_context("fork").Process(target=_forked_stage1,
                                                       args=(cfg, world["base"], kill_at))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    root = Path(cfg.cache)
    committed, in_flight = _parts_in(root, "status"), _parts_in(root, "tmp")
    before = _mtimes(root, committed)
    done = stage1_in_process(cfg, world["base"])
    recomputed = sorted(set(done["computed"]) & in_flight)
    record_details(record_property, seed=seed, kill_at_base_model_call=kill_at,
                   committed_at_kill=len(committed), in_flight_at_kill=sorted(in_flight),
                   parts_recomputed=len(recomputed), parts_computed_by_resume=len(done["computed"]))
    assert set(done["skipped"]) == committed  # committed parts are kept as they are
    assert _mtimes(root, committed) == before
    assert len(in_flight) <= 1 and set(done["computed"]) == {
        f"shard-{i:06d}" for i in range(N_SHARDS)} - committed
    diffs = snapshot_diff(in_process_reference, cache_snapshot(root))
    assert not diffs, diffs


def test_the_cache_comparison_sees_a_different_cache(world, in_process_reference, tmp_path,
                                                     one_thread):
    """The comparison the crash tests rely on tells caches of other view seeds apart."""
    cfg = stage1_config(world["shards"], tmp_path / "cache", view_policy={"seed": 8,
                                                                          "output_size": 32})
    from storage import CacheError

    stage1_in_process(cfg, world["base"], parts=("shard-000002",))
    with pytest.raises(CacheError, match="incomplete"):
        cache_snapshot(cfg.cache)
    stage1_in_process(cfg, world["base"])
    diffs = snapshot_diff(in_process_reference, cache_snapshot(cfg.cache))
    assert any(d.startswith("files:") for d in diffs)
    assert any(d.startswith("records:") for d in diffs)
    assert "manifest: view_policy differs" in diffs


# ------------------------------------------------------------------------------ bad input
def make_more_bad_shard(path: Path) -> tuple[dict[str, str | None], list[str]]:
    """Kinds make_bad_shard does not have. Returns ({key: None (good) | reason substring},
    [ignored member names])."""
    rng = np.random.default_rng(11)
    rgb = smooth_image(rng, 30, 40)
    png_bad_crc = bytearray(encode(rgb, "PNG"))
    png_bad_crc[29] ^= 0xFF  # the IHDR chunk's crc
    huge_jpeg = bytearray(encode(rgb, "JPEG"))
    sof = huge_jpeg.find(b"\xff\xc0")
    huge_jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    huge_bmp = bytearray(encode(rgb, "BMP"))
    huge_bmp[18:26] = struct.pack("<ii", 60000, 60000)
    webp = encode(rgb, "WEBP", lossless=True)
    samples = {
        "fine": (encode(rgb, "JPEG"), "jpg", None),
        "tiff_named_jpg": (encode(rgb, "TIFF"), "jpg", None),
        "png_without_iend": (encode(rgb, "PNG")[:-12], "png", None),
        "pickle_as_jpg": (pickle.dumps({"not": "an image"}), "jpg", "not an image"),
        "jpeg_soi_only": (b"\xff\xd8\xff\xe0" + b"\0" * 10, "jpg", "not an image"),
        "png_bad_ihdr_crc": (bytes(png_bad_crc), "png", "not an image"),
        "jpeg_65000x65000_header": (bytes(huge_jpeg), "jpg", "too many pixels"),
        "bmp_60000x60000_header": (bytes(huge_bmp), "png", "too many pixels"),
        "gzip_as_png": (gzip.compress(b"x" * 100), "png", "not an image"),
        "webp_truncated": (webp[: len(webp) // 2], "webp", "corrupt image"),
        "svg_as_png": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "png", "not an image"),
        "pdf_as_jpg": (b"%PDF-1.4\n%%EOF\n", "jpg", "not an image"),
        "ico_as_png": (encode(rgb, "ICO"), "png", "not an image"),
    }
    members = []
    for key, (data, ext, _) in samples.items():
        members += [(f"{key}.{ext}", data), (f"{key}.cls", b"4")]
    write_tar(path, members)
    # non-regular members named like images: never samples
    ignored = ["symlink_image", "directory_image", "hardlink_image"]
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("symlink_image.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        folder = tarfile.TarInfo("directory_image.jpg")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        hard = tarfile.TarInfo("hardlink_image.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "fine.jpg"
        tar.addfile(hard)
    return {k: reason for k, (_, _, reason) in samples.items()}, ignored


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """A good shard, make_bad_shard's shard and the shard of further kinds."""
    d = tmp_path_factory.mktemp("bad_data")
    make_data(d, n_shards=1, per_shard=3)
    expected = make_bad_shard(d / "zz-bad.tar")
    more, ignored = make_more_bad_shard(d / "zz-more-bad.tar")
    return {"dir": d, "expected": expected, "more": more, "more_ignored": ignored}


def check_bad_input(cache: Path, bad_data, bad_entries: list[dict]) -> dict[str, tuple[bool, str]]:
    """One case per candidate key of the bad shards (and per ignored non-sample)."""
    from storage import open_cache

    expected, more = bad_data["expected"], bad_data["more"]
    reader = open_cache(cache)
    cached = set(reader.keys)
    listed: dict[str, list[str]] = {}
    for entry in bad_entries:
        listed.setdefault(entry["key"], []).append(str(entry.get("reason")))
    results = {}

    def good(key, label=None, size=None):
        if key not in cached:
            return False, f"good sample {key} not cached (listed: {listed.get(key)})"
        i = reader.index_of(key)
        if label is not None and int(reader.labels[i]) != label:
            return False, f"{key}: label {int(reader.labels[i])}, expected {label}"
        if size is not None and reader.source_size(i) != tuple(size):
            return False, f"{key}: size {reader.source_size(i)}, expected {size}"
        return True, "cached"

    def bad(key, reason, first_is_good=False):
        reasons = listed.get(key, [])
        if key in cached and not first_is_good:
            return False, f"bad sample {key} was cached"
        if not any(reason in r for r in reasons):
            return False, f"{key} not listed with {reason!r} (listed: {reasons})"
        return True, next(r for r in reasons if reason in r)

    for key, reason in expected.items():
        if reason is None:
            results[f"bad shard: {key}"] = good(key, expected.labels.get(key),
                                                expected.sizes.get(key))
        else:
            results[f"bad shard: {key}"] = bad(key, reason)
    for key, reason in expected.duplicates.items():
        results[f"bad shard: duplicate {key}"] = bad(key, reason, first_is_good=True)
    for key in expected.ignored:
        results[f"bad shard: ignored {key}"] = (
            key not in cached and key not in listed, "neither cached nor listed")
    for key, reason in more.items():
        results[f"more kinds: {key}"] = good(key, 4) if reason is None else bad(key, reason)
    for key in bad_data["more_ignored"]:
        results[f"more kinds: ignored {key}"] = (
            key not in cached and key not in listed, "neither cached nor listed")
    unexpected = sorted(set(listed) - set(expected) - set(more))
    results["nothing else listed"] = (not unexpected, f"unexpected entries: {unexpected}")
    return results


@category("bad_input")
def test_bad_samples_are_skipped_and_listed_without_ray(bad_data, tmp_path, record_property,
                                                       one_thread):
    """The shard task over the bad shards (in-process): complete cache, every reason listed."""
    from storage import open_writer

    cfg = stage1_config(bad_data["dir"], tmp_path / "cache", backend="webdataset")
    world_base = save_base_model(tmp_path / "base.safetensors")
    stage1_in_process(cfg, world_base)
    writer = open_writer(cfg.cache)
    entries = [e for part in writer.parts
               for e in (writer.part_marker(part) or {}).get("report", [])]
    results = check_bad_input(Path(cfg.cache), bad_data, entries)
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items() if not ok}


@category("bad_input")
def test_training_on_the_cache_of_bad_shards_skips_what_is_missing(bad_data, tmp_path,
                                                                  one_thread):
    """Stage 2 over the same shards: the source index agrees with the cache and the bad samples
    are skipped and counted, not fatal."""
    from reliability_helpers import Source, run_config

    from stages.train import train
    from storage import open_cache

    cfg = stage1_config(bad_data["dir"], tmp_path / "cache")
    stage1_in_process(cfg, save_base_model(tmp_path / "base.safetensors"))
    cached = open_cache(cfg.cache).num_samples
    summary = train(run_config(epochs=1, batch_size=4), cache=cfg.cache,
                    source=Source(str(bad_data["dir"])), base=None, out_dir=tmp_path / "run",
                    progress=False)
    assert summary.samples == cached // 4 * 4 and summary.skipped_missing > 0


# ------------------------------------------------------------------------------ slow: Ray
@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (3 logical CPUs: one base-model actor and two shard tasks)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        # the Ray processes (and so the shard tasks) inherit this environment
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("TEC_CACHE_FSYNC", "0")
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
        try:
            yield ray
        finally:
            ray.shutdown()


def ray_config(world, cache: Path, **overrides):
    return stage1_config(world["shards"], cache, ray={"threads_per_actor": 1,
                                                      "concurrent_shards": 2}, **overrides)


@pytest.fixture(scope="module")
def ray_reference(ray_session, world):
    """An uninterrupted stage-1 run on Ray."""
    from stages.stage1 import run_stage1

    cfg = ray_config(world, world["tmp"] / "ref-ray")
    summary = run_stage1(cfg, world["base"], progress=False)
    assert summary.parts_done == N_SHARDS
    return cache_snapshot(cfg.cache)


# (seed, what is killed): the random point of each kill comes from its seed
RAY_KILLS = [(0, "driver (joined)"), (1, "driver (joined)"), (2, "driver (joined)"),
             (3, "driver (own local Ray)"), (4, "shard task worker"), (5, "base-model actor")]


def kill_point(seed: int) -> dict:
    """Wait for ``parts_committed`` commits (or, for 0, for the first part to start), then
    ``extra_s`` seconds more, then kill."""
    rng = np.random.default_rng([5, seed])
    return {"parts_committed": int(rng.integers(0, N_SHARDS - 2)),
            "extra_s": round(float(rng.uniform(0.0, 2 * BATCH_DELAY_S)), 3)}


def _reached(root: Path, point: dict) -> bool:
    committed = len(_parts_in(root, "status"))
    started = bool(_parts_in(root, "tmp")) or committed > 0
    return started and committed >= point["parts_committed"]


def _ray_workers(pid: int, prefix: str) -> list[int]:
    return sorted(p for p, cmd in child_processes(pid).items() if cmd.startswith(prefix))


def run_driver_kill(world, ray_session, cache: Path, seed: int, local: bool) -> dict:
    """SIGKILL a stage-1 driver process at a random point, then resume in this process."""
    from stages.configs import to_dict
    from stages.stage1 import run_stage1

    cfg = ray_config(world, cache)
    point = kill_point(seed)
    address = "" if local else ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    if local:
        # its own local Ray with the same shape as the shared one
        raw = to_dict(cfg)
        raw["ray"]["num_cpus"] = 3
    else:
        raw = to_dict(cfg)
    log = Path(cache).with_name("driver.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(raw),
                                 json.dumps(to_dict(world["base"])), address,
                                 json.dumps({"batch_delay_s": BATCH_DELAY_S})], env=env, cwd=REPO,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    root = Path(cache)
    spawned: dict[int, str] = {}
    try:
        reached = wait_until(lambda: proc.poll() is not None or _reached(root, point), 240)
        assert reached and proc.poll() is None, \
            f"the driver ended before the kill point: {log.read_text()[-2000:]}"
        time.sleep(point["extra_s"])
        spawned = child_processes(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        if local:
            # the driver and the Ray it started die together (a lost node, a killed session):
            # its process group (gcs, raylet, agents) and its Ray workers (own groups), by pid
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in spawned:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    # the dead driver's shard tasks must be gone before the cache is inspected and resumed
    if local:
        assert wait_until(lambda: not any(_alive(p) for p in spawned), 30, 0.1), \
            "processes of the killed driver's Ray are still alive"
    else:
        assert wait_until(lambda: not _ray_workers(os.getpid(), "ray::process_shard"), 60, 0.2), \
            "the killed driver's shard tasks are still running"
    cleanup_s = time.monotonic() - killed_at
    committed, in_flight = _parts_in(root, "status"), _parts_in(root, "tmp")
    before = _mtimes(root, committed)
    assert len(committed) < N_SHARDS, "the run was complete before the kill"
    summary = run_stage1(cfg, world["base"], progress=False)
    untouched = _mtimes(root, committed) == before
    recomputed = sorted(in_flight - committed)
    return {"seed": seed, "killed": "driver (own local Ray)" if local else "driver (joined)",
            "kill_point": point, "committed_at_kill": len(committed),
            "in_flight_at_kill": sorted(in_flight), "parts_recomputed": len(recomputed),
            "parts_done_by_resume": summary.parts_done, "parts_skipped_by_resume":
            summary.parts_skipped, "committed_parts_untouched": untouched,
            "cleanup_s": round(cleanup_s, 2),
            "ok_counts": summary.parts_done == N_SHARDS - len(committed)
            and summary.parts_skipped == len(committed)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_worker_kill(world, cache: Path, seed: int, target: str, monkeypatch) -> dict:
    """SIGKILL one Ray worker process (a shard task's or the base-model actor's) at a random
    point of a run driven from a thread of this process; Ray retries, the run completes."""
    from fault_helpers import FaultHooks

    from stages.stage1 import run_stage1

    hooks = FaultHooks(batch_delay_s=BATCH_DELAY_S)
    cfg = ray_config(world, cache)
    point = kill_point(seed)
    prefix = "ray::process_shard" if target == "shard task worker" else "ray::BaseModelActor"
    outcome: dict = {}

    def drive():
        try:
            outcome["summary"] = run_stage1(cfg, world["base"], progress=False, hooks=hooks)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = exc

    root = Path(cache)
    driver = threading.Thread(target=drive)
    with AttemptWatcher(root) as watcher:
        driver.start()
        assert wait_until(lambda: not driver.is_alive() or _reached(root, point), 240)
        time.sleep(point["extra_s"])
        victims: list[int] = []

        def found() -> bool:
            victims[:] = _ray_workers(os.getpid(), prefix)
            return bool(victims) or not driver.is_alive()
        wait_until(found, 30)
        assert victims and driver.is_alive(), f"no {prefix} process to kill while the run was on"
        victim = victims[int(np.random.default_rng([9, seed]).integers(len(victims)))]
        in_flight = _parts_in(root, "tmp")
        committed = _parts_in(root, "status")
        os.kill(victim, signal.SIGKILL)
        driver.join(300)
    assert not driver.is_alive(), "the run did not finish after the worker was killed"
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    recomputed = watcher.repeated()
    return {"seed": seed, "killed": target, "kill_point": point,
            "committed_at_kill": len(committed), "in_flight_at_kill": sorted(in_flight),
            "parts_recomputed": len(recomputed), "recomputed": recomputed,
            "parts_done": summary.parts_done,
            "ok_counts": set(recomputed) <= in_flight and summary.parts_done == N_SHARDS}


@pytest.mark.slow
@pytest.mark.timeout(600)
@category("stage1_crashes")
@pytest.mark.parametrize("seed,target", RAY_KILLS, ids=[f"{s}-{t}" for s, t in RAY_KILLS])
def test_ray_run_killed_at_a_random_point_ends_bit_identical(ray_session, world, ray_reference,
                                                            tmp_path, seed, target,
                                                            monkeypatch, record_property):
    cache = tmp_path / "cache"
    if target.startswith("driver"):
        details = run_driver_kill(world, ray_session, cache, seed, local="local" in target)
    else:
        details = run_worker_kill(world, cache, seed, target, monkeypatch)
    diffs = snapshot_diff(ray_reference, cache_snapshot(cache))
    details["identical"] = not diffs
    record_details(record_property, **details)
    assert details["ok_counts"], details
    assert details.get("committed_parts_untouched", True), details
    assert len(details["in_flight_at_kill"]) <= 2, details  # at most the concurrent shard tasks
    assert not diffs, diffs


@pytest.mark.slow
@category("bad_input")
def test_bad_samples_are_skipped_and_listed_on_ray(ray_session, bad_data, world, tmp_path,
                                                   record_property):
    """run_stage1 on Ray over the bad shards: the bad-sample report lists every reason."""
    from stages.stage1 import REPORT_NAME, run_stage1

    cfg = stage1_config(bad_data["dir"], tmp_path / "cache", backend="zarr")
    summary = run_stage1(cfg, world["base"], progress=False)
    report = [json.loads(line) for line in (Path(cfg.cache) / REPORT_NAME).read_text().splitlines()]
    results = check_bad_input(Path(cfg.cache), bad_data, report)
    results["summary counts the skips"] = (summary.skipped == len(report),
                                           f"{summary.skipped} vs {len(report)}")
    record_cases(record_property, results)
    assert all(ok for ok, _ in results.values()), {k: d for k, (ok, d) in results.items() if not ok}
