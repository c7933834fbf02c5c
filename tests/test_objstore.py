"""Caches and source shards on object storage (issue #15): fsspec URLs for targets.cache and the
shards, stage 1 writing parts straight to the store (data objects first, the marker last),
kill and resume, `tec cache verify | inspect`, stage 2 reading from it, one-line errors for
unusable URLs. The S3 tests run against moto's standalone server on loopback (s3_helpers)."""
from __future__ import annotations

import hashlib
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
from s3_helpers import BUCKET, s3_server, start_moto, stop, upload_tree  # noqa: F401  (fixture)
from stage1_helpers import (  # noqa: F401
    DRIVER,
    all_records,
    assert_same_records,
    base,
    kill_session,
    make_cfg,
    ray_session,
    shards,
)
from storage_helpers import new_cache, part_records, spec, write_part

from storage import CacheError, open_cache, verify_cache
from storage.objstore import StorageError, Url, check_location

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ memory:// (no server)
@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_cache_on_memory_store_reads_like_a_local_one(tmp_path, backend):
    """The same parts written to memory:// and to a folder read back record for record, with the
    same part files (sha256); verify passes on the store."""
    s = spec(backend=backend)
    parts = [("p0", 4), ("p1", 3)]
    url = f"memory://tec-{backend}/cache"
    remote, local = new_cache(url, s, parts), new_cache(tmp_path / "c", s, parts)
    for w in (remote, local):
        write_part(w, "p0", 1)
        write_part(w, "p1", 2, skip=(1,))
        w.finalize()
    a, b = open_cache(url), open_cache(tmp_path / "c")
    assert isinstance(a.root, Url) and a.num_samples == b.num_samples == 6
    for i in range(a.num_samples):
        for v in range(s.views):
            ra, rb = a.read(i, v), b.read(i, v)
            for k, x in ra.items():
                if isinstance(x, np.ndarray):
                    np.testing.assert_array_equal(x, rb[k], err_msg=k)
    assert [m["files"] for m in a._markers.values()] == [m["files"] for m in b._markers.values()]
    assert verify_cache(url) == []
    batch = a.read_batch(np.arange(6), np.zeros(6, dtype=np.int64))
    assert len(batch["features"]) == 6


def test_a_webdataset_cache_on_memory_store_streams_like_a_local_one(tmp_path):
    """read: stream's sequential pass (storage.batch.stream_records) over an object store:
    the same records as from a folder, also read into the caller's buffers."""
    from storage.batch import parse_record, stream_records, view_order

    s = spec(backend="webdataset")
    parts = [("p0", 4), ("p1", 3)]
    remote, local = new_cache("memory://tec-stream/cache", s, parts), new_cache(tmp_path / "c", s,
                                                                               parts)
    for w in (remote, local):
        write_part(w, "p0", 1)
        write_part(w, "p1", 2, skip=(1,))
        w.finalize()
    a, b = open_cache("memory://tec-stream/cache"), open_cache(tmp_path / "c")
    for p in range(len(a.parts)):
        order = view_order(a, p, 1)
        some = order[::2]  # every other record: the pass seeks over the rest
        streamed = list(stream_records(a, p, 1, some, parse=False,
                                       into=lambda n: memoryview(bytearray(n + 3))[:n]))
        expected = list(stream_records(b, p, 1, some))
        assert [i for i, _ in streamed] == [i for i, _ in expected] == [
            a.part_range(a.parts[p])[0] + int(r) for r in some]
        for (i, data), (_, ref) in zip(streamed, expected):
            got = parse_record(a, data)
            for name, x in ref.items():
                np.testing.assert_array_equal(got[name], x, err_msg=name)
            np.testing.assert_array_equal(got["features"], b.read(i, 1, decode=False)["features"])


def test_a_half_uploaded_part_is_invisible_and_removed_on_reopen():
    """Objects of an attempt that died before its marker: readers do not see the part, verify
    names it, inspect lists it as unfinished, and reopening the part removes them."""
    from storage import inspect_cache

    s = spec()
    url = "memory://tec-half/cache"
    w = new_cache(url, s, [("p0", 3), ("p1", 2)])
    write_part(w, "p0", 1)
    leftover = Url(url) / "parts" / "p1" / "feature_mean" / "c" / "0" / "0" / "0"
    leftover.write_bytes(b"half of a shard")  # a dead writer's upload, no marker
    r = open_cache(url, require_complete=False)
    assert r.parts == ["p0"] and r.num_samples == 3
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(url)
    assert inspect_cache(url)["unfinished_writes"] == ["p1"]
    assert any("p1: not committed" in p for p in verify_cache(url))
    pw = w.open_part("p1")
    assert not leftover.exists()
    for slot, (key, rec) in part_records(s, "p1", 2, 5).items():
        pw.write(slot, key, rec)
    pw.commit()
    w.finalize()
    assert open_cache(url).num_samples == 5 and verify_cache(url) == []


def test_subset_and_transcode_read_and_write_object_store_caches(tmp_path):
    """tec cache subset / transcode with a URL on either side: the copy on the store equals the
    copy in a folder, record for record and file for file, and names its source URL."""
    from storage.subset import subset_cache
    from storage.transcode import transcode_cache

    s = spec(backend="webdataset")
    url = "memory://tec-copy/cache"
    w = new_cache(url, s, [("p0", 3), ("p1", 2)])
    write_part(w, "p0", 1)
    write_part(w, "p1", 2)
    w.finalize()
    out = subset_cache(url, "memory://tec-copy/subset", views=2)
    assert out["manifest"]["subset"][-1]["source"] == url
    local = subset_cache(url, tmp_path / "subset", views=2)
    a, b = open_cache("memory://tec-copy/subset"), open_cache(tmp_path / "subset")
    assert [m["files"] for m in a._markers.values()] == [m["files"] for m in b._markers.values()]
    assert local["records"] == out["records"] == 10
    transcode_cache(tmp_path / "subset", "memory://tec-copy/int8", codec="int8")
    transcode_cache(tmp_path / "subset", tmp_path / "int8", codec="int8")
    a, b = open_cache("memory://tec-copy/int8"), open_cache(tmp_path / "int8")
    assert [m["files"] for m in a._markers.values()] == [m["files"] for m in b._markers.values()]
    assert verify_cache("memory://tec-copy/int8") == []


def test_unusable_urls_are_one_line_errors_naming_the_url():
    with pytest.raises(StorageError, match=r"^nosuch://b/c: unknown URL scheme nosuch://"):
        check_location("nosuch://b/c")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match=r"^gs://b/c: the gs:// scheme needs gcsfs"):
            check_location("gs://b/c")
    check_location("/a/local/path", write=True)  # local paths are checked where they are used
    from stages.configs import BaseModelConfig
    from stages.stage1 import Stage1Error, run_stage1

    cfg = make_cfg("memory://images/folder", "memory://tec-if/cache", kind="imagefolder")
    with pytest.raises(Stage1Error, match=r"^targets.source.path: memory://images/folder: an "
                                          r"image folder must be a local"):
        run_stage1(cfg, BaseModelConfig(arch="vit_base_patch16_224", checkpoint="/no/such.pth"),
                   progress=False)


# ------------------------------------------------------------------ S3 (moto on loopback)
def test_s3_bad_locations_fail_before_any_base_model_work(s3_server, shards, tmp_path):
    """A missing bucket, an unreachable endpoint and refused credentials are one line naming
    the URL, raised before the base model is loaded (its checkpoint does not even exist)."""
    from stages.configs import BaseModelConfig
    from stages.stage1 import run_stage1
    from storage import objstore

    missing_base = BaseModelConfig(arch="vit_base_patch16_224", checkpoint=str(tmp_path / "no.pt"))
    cfg = make_cfg(shards, "s3://no-such-bucket/cache")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/cache: the bucket "
                                           r"'no-such-bucket' does not exist"):
        run_stage1(cfg, missing_base, progress=False)
    cfg = make_cfg("s3://no-such-bucket/shards/", f"s3://{BUCKET}/bad-src")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/shards/: the bucket"):
        run_stage1(cfg, missing_base, progress=False)
    # nothing listens on port 9 of loopback: connection refused, without minutes of retries
    cfg = make_cfg(shards, f"s3://{BUCKET}/unreachable",
                   storage_options={"s3": {"endpoint_url": "http://127.0.0.1:9",
                                           "config_kwargs": {"retries": {"max_attempts": 1},
                                                             "connect_timeout": 2}}})
    start = time.monotonic()
    try:
        with pytest.raises(StorageError, match=r"^s3://tec-test/unreachable: cannot reach the "
                                               r"storage endpoint"):
            run_stage1(cfg, missing_base, progress=False)
    finally:
        import fsspec.config

        fsspec.config.conf.pop("s3", None)
        objstore._configured.clear()
        objstore._fs_cache.clear()
    assert time.monotonic() - start < 60
    # a server that checks credentials: these keys are unknown to it
    proc, endpoint = start_moto(tmp_path / "auth.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        cfg = make_cfg(shards, f"s3://{BUCKET}/refused",
                       storage_options={"s3": {"endpoint_url": endpoint, "key": "wrong",
                                               "secret": "wrong"}})
        with pytest.raises(StorageError, match=r"^s3://tec-test/refused: access refused"):
            run_stage1(cfg, missing_base, progress=False)
    finally:
        stop(proc)
        fsspec.config.conf.pop("s3", None)
        objstore._configured.clear()
        objstore._fs_cache.clear()


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_cache_on_s3_reads_and_verifies_like_a_local_one(s3_server, tmp_path, backend):
    """Parts written through the S3 API (moto on loopback): the same records and part files as
    in a folder, verify passes, a part without its marker is invisible and its objects go when
    the part is reopened."""
    s = spec(backend=backend)
    parts = [("p0", 4), ("p1", 3)]
    url = f"s3://{BUCKET}/fast-{backend}"
    remote, local = new_cache(url, s, parts), new_cache(tmp_path / "c", s, parts)
    for w in (remote, local):
        write_part(w, "p0", 1, skip=(1,))
    leftover = Url(url) / "parts" / "p1" / "half-written"
    leftover.write_bytes(b"x")
    assert open_cache(url, require_complete=False).parts == ["p0"]
    for w in (remote, local):
        write_part(w, "p1", 2)
        w.finalize()
    assert not leftover.exists()
    a, b = open_cache(url), open_cache(tmp_path / "c")
    assert a.keys == b.keys and a.num_samples == 6
    assert [m["files"] for m in a._markers.values()] == [m["files"] for m in b._markers.values()]
    for i in range(a.num_samples):
        np.testing.assert_array_equal(a.read(i, 2)["features"], b.read(i, 2)["features"])
    assert verify_cache(url) == []


def test_evaluation_images_load_from_shards_on_s3(s3_shards, shards):
    """data.test on S3: the evaluation loader reads the same images and labels as from disk."""
    import torch

    from stages.evaluate import load_eval_images

    a_images, a_labels = load_eval_images(s3_shards, 32)
    b_images, b_labels = load_eval_images(str(shards), 32)
    assert len(a_images) == 15
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def _s3_files(url: str) -> dict[str, str]:
    """relative path -> sha256 of every object under url (the data, not the markers' times)."""
    root = Url(url)
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in root.find()}


def _data_files(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if k.startswith("parts/")}


@pytest.fixture(scope="module")
def s3_shards(s3_server, shards):
    upload_tree(shards, f"s3://{BUCKET}/shards")
    return f"s3://{BUCKET}/shards/"


@pytest.fixture(scope="module")
def s3_reference(s3_shards, ray_session, base):
    """Stage 1 over the shards on S3 into a cache on S3 (uninterrupted). The server (and its
    environment, which Ray's workers inherit as a node's credentials) comes first."""
    from stages.stage1 import run_stage1

    cfg = make_cfg(s3_shards, f"s3://{BUCKET}/reference")
    return cfg, run_stage1(cfg, base, progress=False)


@pytest.mark.slow
def test_stage1_from_s3_shards_into_an_s3_cache(s3_reference, base, shards, tmp_path):
    """Same records as stage 1 over the local shards into a local cache; every part file equal;
    `tec cache verify` and `tec cache inspect` on the s3:// URL succeed from a fresh process."""
    from stages.stage1 import run_stage1

    cfg, summary = s3_reference
    assert summary.parts_done == 3 and summary.images == 15
    local = make_cfg(shards, tmp_path / "cache")
    run_stage1(local, base, progress=False)
    assert_same_records(all_records(local.cache), all_records(cfg.cache))
    remote = _s3_files(cfg.cache)
    for rel, digest in _data_files(remote).items():
        on_disk = Path(local.cache) / rel
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == digest, rel
    assert "tmp/" not in " ".join(remote)  # no rename area on the store
    assert verify_cache(cfg.cache) == []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "verify", cfg.cache],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"ok: every part of {cfg.cache}" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "inspect", cfg.cache],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "15" in out.stdout, out.stderr
    # damage one object: verify names the part and file, the CLI exits 1, repair recomputes
    # exactly that part on the bucket (the other parts' objects untouched)
    target = Url(cfg.cache) / sorted(r for r in remote if r.startswith("parts/"))[0]
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        problems = verify_cache(cfg.cache)
        damaged = target.relative_to(Url(cfg.cache) / "parts").parts[0]
        assert problems and problems[0].startswith(f"part {damaged}: ")
        bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "verify", cfg.cache],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and "BAD part" in bad.stderr
        from stages.repair import repair_cache

        fixed = repair_cache(cfg.cache, progress=False)
        assert fixed.recomputed == [damaged] and fixed.problems_after == []
    finally:
        if target.read_bytes() != original:
            target.write_bytes(original)
    assert _data_files(_s3_files(cfg.cache)) == _data_files(remote)
    assert verify_cache(cfg.cache) == []


@pytest.mark.slow
def test_killed_driver_resumes_to_a_bit_identical_s3_cache(ray_session, base, s3_shards,
                                                           s3_reference, tmp_path):
    """SIGKILL the stage-1 driver once a part's marker is on S3; the rerun keeps that part's
    objects as they are and ends with every data object equal to the uninterrupted run's."""
    from stages.configs import to_dict
    from stages.stage1 import run_stage1

    cfg = make_cfg(s3_shards, f"s3://{BUCKET}/killed")
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ)
    log = tmp_path / "driver.log"
    cmd = [sys.executable, "-c", DRIVER, json.dumps(to_dict(cfg)), json.dumps(to_dict(base)),
           address, json.dumps({"batch_delay_s": 0.4})]
    status = Url(cfg.cache) / "status"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.endswith(".json") for p in status.iterdir()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_session(proc.pid)
    time.sleep(1.5)  # the joined Ray ends the dead driver's workers
    committed = sorted(p.name[:-5] for p in status.iterdir() if p.name.endswith(".json"))
    assert 1 <= len(committed) < 3, committed
    before = {rel: d for rel, d in _s3_files(cfg.cache).items()
              if any(rel.startswith(f"parts/{p}/") or rel == f"status/{p}.json" for p in committed)}

    summary = run_stage1(cfg, base, progress=False)
    assert (summary.parts_skipped, summary.parts_done) == (len(committed), 3 - len(committed))
    after = _s3_files(cfg.cache)
    assert {rel: after[rel] for rel in before} == before  # committed objects untouched
    assert _data_files(after) == _data_files(_s3_files(s3_reference[0].cache))  # bit-identical
    assert verify_cache(cfg.cache) == []


@pytest.mark.slow
def test_stage2_trains_from_the_s3_cache_as_from_a_local_copy(s3_reference, base, tmp_path):
    """A run reading the cache on S3 takes the same steps with the same losses as the same run
    reading a local copy of it."""
    import torch
    from train_helpers import Source, run_config

    from stages.train import train

    cfg = s3_reference[0]
    local = tmp_path / "copy"
    root = Url(cfg.cache)
    for rel in root.find():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes((root / rel).read_bytes())
    torch.set_num_threads(1)
    run = run_config(epochs=1, batch_size=5)
    a = train(run, cache=cfg.cache, source=Source(cfg.source.path), base=None,
              out_dir=tmp_path / "s3run", progress=False)
    b = train(run, cache=str(local), source=Source(cfg.source.path), base=None,
              out_dir=tmp_path / "localrun", progress=False)
    assert a.steps == b.steps == 3 and a.cached_samples == 15 and a.online_samples == 0
    assert a.losses == b.losses
    # forked DataLoader workers read the bucket with their own clients; half the samples are
    # fresh views whose images come from the shards on S3
    workers = run_config(epochs=1, batch_size=5, num_workers=2, online_fraction=0.5)
    c = train(workers, cache=cfg.cache, source=Source(cfg.source.path), base=base,
              out_dir=tmp_path / "s3workers", progress=False)
    d = train(workers, cache=str(local), source=Source(cfg.source.path), base=base,
              out_dir=tmp_path / "localworkers", progress=False)
    assert c.steps == 3 and c.online_samples > 0 and c.losses == d.losses


@pytest.mark.slow
def test_a_two_node_ray_cluster_writes_one_s3_cache(s3_server, s3_shards, s3_reference, base,
                                                    tmp_path):
    """`ray start --head` plus a second node (`ray start --address`), token authentication on,
    each node in its own working directory with its own HOME and nothing shared but the S3
    endpoint in its environment; a driver in a third directory joins with the token file and
    writes the cache on S3: the same data objects as the single-node run, verify passes."""
    import secrets

    from s3_helpers import s3_env
    from stage1_helpers import _free_port, _ray_env

    port = _free_port()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_cli = Path(sys.executable).with_name("ray")
    auth = dict(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **s3_env(s3_server))
    nodes = []

    def start(name: str, *args: str) -> subprocess.Popen:
        cwd = tmp_path / name
        cwd.mkdir()
        proc = subprocess.Popen(
            [str(ray_cli), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--disable-usage-stats", *args],
            env=_ray_env(tmp_path / f"{name}_home", **auth), cwd=cwd, start_new_session=True,
            stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
        nodes.append(proc)
        return proc

    try:
        head = start("head", "--head", f"--port={port}", "--include-dashboard=false")
        deadline = time.time() + 120
        while True:  # the head's GCS port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, \
                    (tmp_path / "head.log").read_text()[-2000:]
                time.sleep(0.2)
        start("worker", f"--address=127.0.0.1:{port}")
        time.sleep(5)  # the second raylet registers
        cfg = make_cfg(s3_shards, f"s3://{BUCKET}/cluster")
        from stages.configs import to_dict

        driver_dir = tmp_path / "driver"
        driver_dir.mkdir()
        env = {**_ray_env(tmp_path / "driver_home", RAY_AUTH_TOKEN_PATH=str(token),
                          **s3_env(s3_server)), "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(to_dict(cfg)),
                              json.dumps(to_dict(base)), f"127.0.0.1:{port}"],
                             env=env, cwd=driver_dir, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(l for l in out.stdout.splitlines() if l.startswith("SUMMARY"))
        assert json.loads(line.split(" ", 1)[1]) == {"parts_done": 3, "images": 15}
    finally:
        for proc in nodes:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in nodes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_session(proc.pid)
            proc.wait()
    assert _data_files(_s3_files(cfg.cache)) == _data_files(_s3_files(s3_reference[0].cache))
    assert verify_cache(cfg.cache) == []
    for name in ("head", "worker", "driver"):  # nothing was written to a node's folder
        assert not [p for p in (tmp_path / name).rglob("*") if p.is_file()], name


@pytest.mark.parametrize("command", ["targets", "run"])
def test_cli_stops_on_an_unusable_cache_url_before_the_base_model(tmp_path, command):
    """`tec targets` / `tec run` with a cache URL whose scheme has no installed package: exit 2,
    one line naming the URL, before the (missing) base-model checkpoint is even looked at."""
    config = tmp_path / "p.yaml"
    config.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        f"data: {{train: {tmp_path / 'shards'}}}\n"
        f"base_model: {{arch: vit_base_patch16_224, checkpoint: {tmp_path / 'missing.pth'}}}\n"
        "targets: {cache: 'nosuch://bucket/cache', views: 2}\n"
        "runs: []\n")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", command, str(config)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: nosuch://bucket/cache: unknown URL scheme nosuch:// (no fsspec filesystem "
        "implements it); use a local path or s3://, gs://, memory://")


@pytest.mark.slow
def test_extend_views_of_a_cache_on_s3(s3_reference, base, tmp_path):
    """tec cache extend on an s3:// cache: the layer is written to the bucket, the old objects
    stay as they were, and the grown cache verifies and reads K+1 views."""
    from stages.extend import extend_views
    from storage import CacheError as _CacheError

    url = f"s3://{BUCKET}/grown"
    for rel in Url(s3_reference[0].cache).find():  # a copy of the reference on the bucket
        (Url(url) / rel).write_bytes((Url(s3_reference[0].cache) / rel).read_bytes())
    before = _s3_files(url)
    extend_views(url, 4, progress=False)
    after = _s3_files(url)
    assert {rel: after[rel] for rel in before if rel != "manifest.json"} == \
        {rel: d for rel, d in before.items() if rel != "manifest.json"}
    assert any(rel.startswith("extensions/views-3-4/parts/") for rel in after)
    reader = open_cache(url)
    assert reader.spec.views == 4 and open_cache(url, views=3).spec.views == 3
    assert reader.read(0, 3)["view"] == 3
    assert verify_cache(url) == []
    with pytest.raises(_CacheError, match="has 4 views already"):
        extend_views(url, 4, progress=False)


@pytest.mark.slow
def test_extend_shards_of_a_cache_on_s3(s3_reference, base, tmp_path):
    """tec cache extend --shards on an s3:// cache with new shards on s3://: the new parts are
    written to the bucket, the old objects stay as they were, the old shards read the same
    records and the grown cache verifies and reads every sample."""
    from image_helpers import make_shards

    from stages.extend import extend_shards

    paths = make_shards(tmp_path / "five", n_shards=5, per_shard=5, size_range=(20, 56))
    (tmp_path / "more").mkdir()
    for path in paths[3:]:
        Path(path).rename(tmp_path / "more" / Path(path).name)
    upload_tree(tmp_path / "more", f"s3://{BUCKET}/more")
    url = f"s3://{BUCKET}/grown-shards"
    for rel in Url(s3_reference[0].cache).find():  # a copy of the reference on the bucket
        (Url(url) / rel).write_bytes((Url(s3_reference[0].cache) / rel).read_bytes())
    before, old = _s3_files(url), all_records(url)
    summary = extend_shards(url, f"s3://{BUCKET}/more/", progress=False)
    assert summary.parts == ["shard-000003", "shard-000004"] and summary.samples_after == 25
    after = _s3_files(url)
    assert {rel: after[rel] for rel in before if rel.startswith(("parts/", "status/"))} == \
        {rel: d for rel, d in before.items() if rel.startswith(("parts/", "status/"))}
    assert any(rel.startswith("parts/shard-000004/") for rel in after)
    assert_same_records(old, {k: v for k, v in all_records(url).items() if k[0] in
                              {key for key, _ in old}})
    grown = open_cache(url)
    assert grown.num_samples == 25 and grown.keys[-1] == "s004_00004"
    assert open_cache(url, shard_extensions=0).keys == open_cache(s3_reference[0].cache).keys
    assert verify_cache(url) == []
