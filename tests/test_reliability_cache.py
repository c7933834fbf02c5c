"""Reliability: damaged target caches are detected by `tec cache verify` and refused by `tec train`.

Each damage is applied to a fresh copy of a small, intact cache (zarr or webdataset): a flipped
byte in record data or in a shard index, a truncated data file, a deleted part, a deleted commit
marker, edited manifests, and a cache built by another base model. For every damage two cases
are checked:

* verify: `tec cache verify PATH` exits != 0 and names the part (or the manifest) at fault;
* train:  `tec train CONFIG --run tec` exits != 0 with one `error:` line naming the problem.

The training run uses round-robin view selection for K epochs, so every (sample, view) record is
read once: damage anywhere in the record data cannot go unread.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import (
    VIEWS,
    category,
    fsync_off,
    invoke_cli,
    make_data,
    one_line_error,
    pipeline_yaml,
    record_details,
    save_base_model,
    stage1_config,
    stage1_in_process,
)

pytestmark = pytest.mark.usefixtures("no_fsync", "one_thread")

PART = "shard-000001"  # the part every file-level damage hits (the second of two)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards, two base models and three intact caches (zarr and webdataset from base A, zarr
    from base B), built with stage 1's shard task in-process (no Ray)."""
    tmp = tmp_path_factory.mktemp("damage")
    make_data(tmp / "shards", n_shards=2, per_shard=4)
    base = save_base_model(tmp / "base_a.safetensors", seed=0)
    other = save_base_model(tmp / "base_b.safetensors", seed=1)
    caches = {}
    for name, backend, model in (("zarr", "zarr", base), ("webdataset", "webdataset", base),
                                 ("other_base", "zarr", other)):
        cfg = stage1_config(tmp / "shards", tmp / f"cache-{name}", backend=backend)
        with fsync_off():
            stage1_in_process(cfg, model)
        caches[name] = tmp / f"cache-{name}"
    return {"tmp": tmp, "base": base, "caches": caches, "shards": str(tmp / "shards")}


# ------------------------------------------------------------------------------ damages
def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(list(name.encode()))


def _flip(path: Path, lo: int, hi: int, rng) -> dict:
    """Flip one bit of a byte drawn uniformly in [lo, hi) of ``path``."""
    data = bytearray(path.read_bytes())
    at = int(rng.integers(lo, hi))
    bit = int(rng.integers(0, 8))
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))
    return {"file": path.name, "offset": at, "bit": bit, "size": len(data)}


def _zarr_shard(root: Path, field: str) -> Path:
    return next(p for p in (root / "parts" / PART / field / "c").rglob("*") if p.is_file())


def _index_bytes(root: Path) -> int:
    samples = json.loads((root / "parts" / PART / "zarr.json").read_text())["attributes"]["slots"]
    return samples * VIEWS * 16


def flip_in_record_data(field: str) -> Callable:
    def damage(root: Path, rng) -> dict:
        path = _zarr_shard(root, field)
        size = path.stat().st_size
        return _flip(path, 0, size - _index_bytes(root) - 4, rng)
    return damage


def flip_in_shard_index(field: str) -> Callable:
    def damage(root: Path, rng) -> dict:
        path = _zarr_shard(root, field)
        size = path.stat().st_size
        # an index entry (offset, nbytes); the index's own trailing crc32c is left alone
        return _flip(path, size - _index_bytes(root) - 4, size - 4, rng)
    return damage


def truncate(relpath: str) -> Callable:
    def damage(root: Path, rng) -> dict:
        path = next(p for p in (root / "parts" / PART).glob(relpath) if p.is_file()) \
            if "*" in relpath else root / "parts" / PART / relpath
        size = path.stat().st_size
        keep = int(rng.integers(1, size))
        with open(path, "r+b") as f:
            f.truncate(keep)
        return {"file": path.name, "kept": keep, "size": size}
    return damage


def flip_in_file(relpath: str) -> Callable:
    def damage(root: Path, rng) -> dict:
        path = root / "parts" / PART / relpath
        return _flip(path, 0, path.stat().st_size, rng)
    return damage


def delete_part(root: Path, rng) -> dict:
    shutil.rmtree(root / "parts" / PART)
    return {"deleted": f"parts/{PART}"}


def delete_marker(root: Path, rng) -> dict:
    (root / "status" / f"{PART}.json").unlink()
    return {"deleted": f"status/{PART}.json"}


def edit_manifest(edit: Callable[[dict], None]) -> Callable:
    def damage(root: Path, rng) -> dict:
        path = root / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=1))
        return {}
    return damage


def cut_manifest(root: Path, rng) -> dict:
    path = root / "manifest.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return {"kept_chars": len(text) // 2}


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _edit_part_status(manifest: dict) -> None:
    manifest["part_status"][PART]["checksum"] = "0" * 64


@dataclass(frozen=True)
class Damage:
    name: str
    cache: str  # which intact cache it starts from: zarr | webdataset | other_base
    apply: Callable
    verify_expect: tuple[str, ...]  # substrings of the BAD line (None: verify does not apply)
    train_expect: tuple[str, ...]
    verify_bug: str | None = None  # known bug: the case is expected to fail (xfail strict)
    train_bug: str | None = None


DAMAGES = [
    Damage("zarr: flipped byte in features record data", "zarr", flip_in_record_data("features"),
           (PART, "features"), (PART, "features", "damaged")),
    Damage("zarr: flipped byte in attn_logits record data", "zarr",
           flip_in_record_data("attn_logits"), (PART, "attn_logits"), (PART, "attn_logits")),
    Damage("zarr: flipped byte in the features shard index", "zarr",
           flip_in_shard_index("features"), (PART, "features"), (PART, "features")),
    Damage("zarr: truncated features shard file", "zarr", truncate("features/c/*/*/*/*"),
           (PART, "truncated"), (PART, "truncated")),
    Damage("zarr: truncated part sample list (zarr.json)", "zarr", truncate("zarr.json"),
           (PART, "zarr.json"), (PART, "zarr.json")),
    Damage("zarr: deleted part directory", "zarr", delete_part, (PART, "missing"), (PART,)),
    Damage("zarr: deleted commit marker", "zarr", delete_marker, (PART, "not committed"),
           (PART, "incomplete")),
    Damage("webdataset: flipped byte in a view tar", "webdataset", flip_in_file("view-1.tar"),
           (PART, "view-1.tar"), (PART, "view-1.tar")),
    Damage("webdataset: truncated view tar", "webdataset", truncate("view-0.tar"),
           (PART, "view-0.tar"), (PART, "view-0.tar")),
    Damage("webdataset: flipped byte in records.npy", "webdataset", flip_in_file("records.npy"),
           (PART, "records.npy"), (PART,)),
    Damage("webdataset: deleted part directory", "webdataset", delete_part, (PART, "missing"),
           (PART,)),
    Damage("manifest: view policy seed edited", "zarr",
           edit_manifest(_set("view_policy", "seed", 8)), ("manifest",), ("rebuild the cache",)),
    Damage("manifest: base-model checkpoint sha256 edited", "zarr",
           edit_manifest(_set("base_model", "checkpoint_sha256", "1" * 64)), ("manifest",),
           ("different base model", "checkpoint_sha256")),
    Damage("manifest: part slot count edited", "zarr", edit_manifest(
        lambda m: m["parts"][1].__setitem__("slots", m["parts"][1]["slots"] + 1)),
        ("manifest",), (PART,)),
    Damage("manifest: part status checksum edited", "zarr", edit_manifest(_edit_part_status),
           (PART, "part status"), (PART,)),
    Damage("manifest: schema version edited", "zarr", edit_manifest(_set("schema_version", 99)),
           ("manifest", "schema version"), ("schema version",)),
    Damage("manifest: cut in half (invalid JSON)", "zarr", cut_manifest, ("manifest",),
           ("manifest",)),
    Damage("cache from another base model", "other_base", lambda root, rng: {}, None,
           ("different base model", "checkpoint_sha256")),
]


def _damaged_copy(world, damage: Damage, tag: str) -> tuple[Path, dict]:
    root = world["tmp"] / "cases" / tag
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(world["caches"][damage.cache], root)
    info = damage.apply(root, _rng(damage.name))
    return root, info


def _tag(damage: Damage, check: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in f"{check}-{damage.name}")


def check_verify(world, damage: Damage) -> tuple[bool, str, dict]:
    """`tec cache verify` on the damaged copy: (ok, detail, damage info)."""
    root, info = _damaged_copy(world, damage, _tag(damage, "verify"))
    code, stderr, exc = invoke_cli(["cache", "verify", root])
    if exc is not None:
        return False, f"uncaught {type(exc).__name__}: {exc}", info
    if code == 0:
        return False, "verify exited 0 (damage not detected)", info
    bad = [line for line in stderr.splitlines() if line.startswith("BAD ")]
    if not any(all(e in line for e in damage.verify_expect) for line in bad):
        return False, f"no BAD line names {damage.verify_expect}: {stderr[-800:]!r}", info
    return True, " | ".join(bad), info


def check_train(world, damage: Damage) -> tuple[bool, str, dict]:
    """`tec train` from the damaged copy: (ok, detail, damage info)."""
    tag = _tag(damage, "train")
    root, info = _damaged_copy(world, damage, tag)
    config = pipeline_yaml(world["tmp"] / "configs" / f"{tag}.yaml", shards=world["shards"],
                           base=world["base"], cache=root, workdir=world["tmp"] / "work" / tag)
    code, stderr, exc = invoke_cli(["train", config, "--run", "tec"])
    ok, detail = one_line_error(code, stderr, exc, damage.train_expect)
    return ok, detail, info


def _params(check: str) -> list:
    out = []
    for damage in DAMAGES:
        if check == "verify" and damage.verify_expect is None:
            continue
        bug = damage.verify_bug if check == "verify" else damage.train_bug
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        out.append(pytest.param(damage, id=damage.name, marks=marks))
    return out


# ------------------------------------------------------------------------------ tests
def test_the_intact_caches_verify_and_train(world):
    """The starting point is sound, so each case below fails for its own damage only. (The cache
    of another base model is intact too: `tec cache verify` takes no base model to compare
    with, so for that case only `tec train` can and does refuse.)"""
    code, stderr, exc = invoke_cli(["cache", "verify", world["caches"]["other_base"]])
    assert code == 0 and exc is None, stderr
    for name in ("zarr", "webdataset"):
        code, stderr, exc = invoke_cli(["cache", "verify", world["caches"][name]])
        assert code == 0 and exc is None, stderr
        config = pipeline_yaml(world["tmp"] / "configs" / f"intact-{name}.yaml",
                               shards=world["shards"], base=world["base"],
                               cache=world["caches"][name],
                               workdir=world["tmp"] / "work" / f"intact-{name}")
        code, stderr, exc = invoke_cli(["train", config, "--run", "tec"])
        assert code == 0 and exc is None, stderr[-2000:]


def test_enough_damage_kinds():
    kinds = {"flipped byte", "truncated", "deleted part", "manifest", "another base model"}
    names = " ".join(d.name for d in DAMAGES)
    assert all(k in names for k in kinds), kinds


@category("damaged_caches")
@pytest.mark.parametrize("damage", _params("verify"))
def test_cache_verify_detects_and_names_the_part(world, damage, record_property):
    ok, detail, info = check_verify(world, damage)
    record_details(record_property, check="verify", damage=damage.name, **info)
    assert ok, detail


@category("damaged_caches")
@pytest.mark.parametrize("damage", _params("train"))
def test_train_refuses_with_one_line_naming_the_problem(world, damage, record_property):
    ok, detail, info = check_train(world, damage)
    record_details(record_property, check="train", damage=damage.name, **info)
    assert ok, detail
