"""Integrity: verify, damaged/truncated files, refusals (schema, incomplete, fingerprint),
resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from storage_helpers import BASE_MODEL, new_cache, spec, write_part

from storage import (
    SCHEMA_VERSION,
    CacheError,
    fingerprint_mismatch,
    format_inspect,
    inspect_cache,
    open_cache,
    verify_cache,
)
from storage.cache import part_checksum

pytestmark = pytest.mark.usefixtures("no_fsync")
BACKENDS = ("zarr", "webdataset")


def _cache(tmp_path, backend="zarr", parts=(("p0", 4), ("p1", 3)), commit=("p0", "p1")):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "cache", s, list(parts))
    for i, part in enumerate(commit):
        write_part(writer, part, seed=i)
    return tmp_path / "cache", writer


def _biggest_data_file(path, part):
    files = [p for p in (path / "parts" / part).rglob("*") if p.is_file() and p.name != "zarr.json"]
    return max(files, key=lambda p: p.stat().st_size)


def _read_everything(path):
    cache = open_cache(path)
    for i in range(cache.num_samples):
        for v in range(cache.views_per_sample):
            cache.read(i, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_passes_an_intact_cache(tmp_path, backend):
    path, writer = _cache(tmp_path, backend)
    assert verify_cache(path) == []
    writer.finalize()
    assert verify_cache(path, deep=True) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_byte_is_found_by_verify_and_refused_on_read(tmp_path, backend):
    path, _ = _cache(tmp_path, backend)
    target = _biggest_data_file(path, "p1")
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x40
    target.write_bytes(bytes(data))
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith("part p1:") and "sha256" in problems[0]
    assert target.name in problems[0]
    with pytest.raises(CacheError, match=r"part p1 .*damaged"):
        _read_everything(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_is_found_by_verify_and_refused_on_read(tmp_path, backend):
    path, _ = _cache(tmp_path, backend)
    target = _biggest_data_file(path, "p0")
    os.truncate(target, target.stat().st_size - 100)
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith("part p0:") and "truncated" in problems[0]
    with pytest.raises(CacheError, match=r"part p0 .*truncated"):
        _read_everything(path)


def test_verify_reports_missing_and_unexpected_files_and_uncommitted_parts(tmp_path):
    path, _ = _cache(tmp_path, parts=(("p0", 4), ("p1", 3), ("p2", 2)), commit=("p0", "p1"))
    (path / "parts" / "p0" / "stray.bin").write_bytes(b"x")
    (path / "parts" / "p1" / "crop" / "zarr.json").unlink()
    problems = verify_cache(path)
    assert "part p0: unexpected file stray.bin" in problems
    assert "part p1: file crop/zarr.json is missing" in problems
    assert "part p2: not committed" in problems


def test_damaged_chunk_in_the_middle_of_a_record_names_the_part(tmp_path):
    path, _ = _cache(tmp_path)
    cache = open_cache(path)
    good = cache.read(5, 1)  # p1 is intact before damage
    shard = path / "parts" / "p1" / "attn_logits" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # inside the first record's chunk
    shard.write_bytes(bytes(data))
    fresh = open_cache(path)
    with pytest.raises(CacheError) as err:
        fresh.read(cache.index_of("p1-0000"), 0)
    msg = str(err.value)
    assert "part p1" in msg and "\n" not in msg and "attn_logits" in msg
    # others still read
    np.testing.assert_array_equal(fresh.read(5, 1)["features"], good["features"])


def test_unknown_schema_version_is_refused(tmp_path):
    path, _ = _cache(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"unknown cache schema version {SCHEMA_VERSION + 1}"):
        open_cache(path)
    assert "unknown cache schema version" in verify_cache(path)[0]
    with pytest.raises(CacheError, match="not a tec-target-cache manifest"):
        (path / "manifest.json").write_text(json.dumps({"format": "other"}))
        open_cache(path)


def test_incomplete_cache_is_refused_with_the_missing_parts(tmp_path):
    path, writer = _cache(tmp_path, parts=(("p0", 4), ("p1", 3), ("p2", 2)), commit=("p1",))
    with pytest.raises(CacheError, match=r"incomplete: 2 of 3 parts not committed \(p0, p2\)"):
        open_cache(path)
    partial = open_cache(path, require_complete=False)
    assert partial.parts == ["p1"] and partial.missing_parts == ["p0", "p2"]
    assert partial.keys == [f"p1-{i:04d}" for i in range(3)]
    assert writer.committed_parts() == {"p1"} and not writer.is_committed("p0")
    with pytest.raises(CacheError, match="no target cache"):
        open_cache(tmp_path / "nowhere")


def test_fingerprint_mismatch_names_the_differing_fields(tmp_path):
    assert fingerprint_mismatch(BASE_MODEL, dict(BASE_MODEL)) == []
    as_json = json.loads(json.dumps({**BASE_MODEL, "shape": (1, 2)}))
    assert fingerprint_mismatch(as_json, {**BASE_MODEL, "shape": (1, 2)}) == []  # tuple == list
    other = {**BASE_MODEL, "checkpoint_sha256": "cd" * 32, "k_max": 8}
    other.pop("last_n")
    diffs = fingerprint_mismatch(BASE_MODEL, other)
    assert diffs == [f"checkpoint_sha256: cache={'ab' * 32} expected={'cd' * 32}",
                     "k_max: cache=4 expected=8", "last_n: cache=2 expected=<absent>"]
    path, _ = _cache(tmp_path)
    cache = open_cache(path)
    cache.check_base_model(BASE_MODEL)
    with pytest.raises(CacheError, match="different base model .*k_max: cache=4 expected=8"):
        cache.check_base_model(other)


def test_create_on_an_identical_cache_resumes_and_a_different_one_is_refused(tmp_path):
    path, _ = _cache(tmp_path, commit=("p0",))
    s = spec()
    again = new_cache(path, s, [("p0", 4), ("p1", 3)])
    assert again.committed_parts() == {"p0"}
    write_part(again, "p1", seed=5)
    assert open_cache(path).num_samples == 7
    with pytest.raises(CacheError, match=r"different target cache \(differs in: spec.codec\)"):
        new_cache(path, spec(codec="int8"), [("p0", 4), ("p1", 3)])
    with pytest.raises(CacheError, match=r"base_model.k_max"):
        new_cache(path, s, [("p0", 4), ("p1", 3)], base_model={**BASE_MODEL, "k_max": 9})
    with pytest.raises(CacheError, match=r"parts \(p1\)"):
        new_cache(path, s, [("p0", 4), ("p1", 5)])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(CacheError, match="not a target cache"):
        new_cache(tmp_path / "junk", s, [("p0", 1)])


def test_finalize_records_part_status_and_checksums_in_the_manifest(tmp_path):
    path, writer = _cache(tmp_path, parts=(("p0", 4), ("p1", 3)), commit=("p0",))
    m = writer.finalize()
    assert m["complete"] is False and list(m["part_status"]) == ["p0"]
    write_part(writer, "p1", seed=3)
    m = json.loads((path / "manifest.json").read_text())
    assert m["complete"] is False  # until finalize runs again
    m = writer.finalize()
    assert m["complete"] is True and set(m["part_status"]) == {"p0", "p1"}
    status = m["part_status"]["p0"]
    marker = json.loads((path / "status" / "p0.json").read_text())
    assert writer.part_marker("p0") == marker and marker["report"] == []
    assert status["samples"] == 4 and status["files"] == len(marker["files"]) > 0
    assert all(len(f["sha256"]) == 64 for f in marker["files"].values())
    assert status["checksum"] == part_checksum(marker["files"])
    assert m["format"] == "tec-target-cache" and m["schema_version"] == SCHEMA_VERSION == 2
    assert m["base_model"] == BASE_MODEL and m["codec"]["values"] == "float16"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inspect_summarises_counts_sizes_and_completeness(tmp_path, backend):
    s = spec(backend=backend)
    writer = new_cache(tmp_path / "c", s, [("p0", 4), ("p1", 3)])
    write_part(writer, "p0", seed=0, skip=(1,))
    info = inspect_cache(tmp_path / "c")
    assert info["parts_committed"] == 1 and info["missing_parts"] == ["p1"] and not info["complete"]
    assert info["samples"] == 3 and info["bad_samples"] == 1 and info["records"] == 9
    assert info["slots_total"] == 7 and info["bytes_per_view"] > 0
    assert info["bytes_total"] > info["bytes_data"] > 0
    text = format_inspect(info)
    assert "1/2 committed" in text and "INCOMPLETE" in text and "missing       p1" in text
    assert backend in text and "vit_tiny_test" in text
    assert all(isinstance(line, str) for line in text.splitlines()) and len(text.splitlines()) >= 10


def test_unreadable_commit_marker_is_reported_by_part(tmp_path):
    path, _ = _cache(tmp_path)
    (path / "status" / "p1.json").write_text("{not json")
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith("part p1: commit marker")
    with pytest.raises(CacheError, match="p1.json is unreadable"):
        open_cache(path)


def test_manifest_status_disagreeing_with_a_rewritten_part_is_reported(tmp_path):
    path, writer = _cache(tmp_path)
    writer.finalize()
    writer.open_part("p1", overwrite=True).abort()
    assert verify_cache(path) == ["part p1: not committed (the manifest lists it as committed but "
                                  "status/p1.json is missing)"]
    write_part(writer, "p1", seed=7)
    assert verify_cache(path) == ["part p1: manifest part status differs from status/p1.json "
                                  "(rewritten after finalize?); run finalize again"]
    writer.finalize()
    assert verify_cache(path) == []
    assert open_cache(path).num_samples == 7


def test_a_part_rewritten_after_finalize_is_refused_on_open_until_finalize_runs_again(tmp_path):
    path, writer = _cache(tmp_path)
    writer.finalize()
    writer.open_part("p1", overwrite=True).abort()
    write_part(writer, "p1", seed=7)
    with pytest.raises(CacheError, match=r"part p1 of cache .*part status checksum differs"):
        open_cache(path)
    writer.finalize()
    assert open_cache(path).num_samples == 7


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=1))


@pytest.mark.parametrize("section,edit", [
    ("view_policy", lambda m: m["view_policy"].__setitem__("seed", 12345)),
    ("base_model", lambda m: m["base_model"].__setitem__("checkpoint_sha256", "1" * 64)),
    ("spec", lambda m: m["spec"].__setitem__("k_max", m["spec"]["k_max"] + 1)),
    ("source", lambda m: m["source"].__setitem__("num_samples", 99)),
])
def test_a_manifest_edited_after_commit_is_found_by_verify_and_refused_on_open(tmp_path, section,
                                                                               edit):
    """Each commit marker records a checksum of the manifest's identity sections."""
    from storage.schema import manifest_identity

    path, writer = _cache(tmp_path)
    writer.finalize()
    assert writer.part_marker("p0")["manifest_identity"] == manifest_identity(
        json.loads((path / "manifest.json").read_text()))
    _edit_manifest(path, edit)
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith("manifest: manifest.json was edited "
                                                         "after parts p0, p1 were committed")
    assert f"changed: {section}" in problems[0]
    with pytest.raises(CacheError, match=f"manifest.json was edited .*changed: {section}.*"
                                         "rebuild the cache"):
        open_cache(path)
    reader = open_cache(path, check_identity=False)  # the caller checks it later
    with pytest.raises(CacheError, match="was edited"):
        reader.check_manifest_identity()


def test_an_edited_slot_count_names_the_part(tmp_path):
    path, writer = _cache(tmp_path)
    _edit_manifest(path, lambda m: m["parts"][1].__setitem__("slots", 4))
    problems = verify_cache(path)
    assert problems[0] == ("part p1: manifest.json lists 4 sample slots, the part was committed "
                           "with 3 (manifest edited?)")
    assert problems[1].startswith("manifest: ") and "changed: parts" in problems[1]
    with pytest.raises(CacheError, match="part p1 of cache .* lists 4 sample slots"):
        open_cache(path)


def test_markers_without_a_manifest_identity_are_accepted(tmp_path):
    """Caches whose markers predate the identity checksum still verify and open."""
    path, writer = _cache(tmp_path)
    for part in ("p0", "p1"):
        mp = path / "status" / f"{part}.json"
        marker = json.loads(mp.read_text())
        del marker["manifest_identity"], marker["manifest_sections"]
        mp.write_text(json.dumps(marker))
    _edit_manifest(path, lambda m: m["view_policy"].__setitem__("seed", 12345))
    assert verify_cache(path) == []
    assert open_cache(path).num_samples == 7
