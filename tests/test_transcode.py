"""`tec cache transcode` (issue #16): re-encode without the base model, resumable, verifiable,
lossy -> lossy warned and recorded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from storage import CacheError, open_cache, verify_cache
from storage.transcode import transcode_cache

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cache_v1"


@pytest.fixture
def v1(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "v1")
    monkeypatch.chdir(tmp_path / "v1")
    return tmp_path / "v1"


def test_transcode_to_lowrank_verifies_and_reads_like_the_source(v1):
    out = transcode_cache("zarr_float16", "low", codec="lowrank",
                          codec_params={"rank": 8, "factor_bits": 8, "attn_bits": 8})
    assert out["parts_written"] == 2 and out["records"] == 16 and out["warning"] is None
    assert verify_cache("low") == []
    with open_cache("zarr_float16") as a, open_cache("low") as b:
        assert b.keys == a.keys and b.manifest["schema_version"] == 2
        for key in ("base_model", "view_policy", "source", "parts"):
            assert b.manifest[key] == a.manifest[key]
        assert b.spec.codec == "lowrank" and b.spec.codec_params["rank"] == 8
        step = b.manifest["transcode"][0]
        assert step["from_codec"] == "float16" and step["to_codec"] == "lowrank"
        assert 0 < step["error_vs_source"]["feature_rel_rms"] < 0.2
        for i in (0, 5):
            ra, rb = a.read(i, 1), b.read(i, 1)
            for name in ("attn_index", "crop", "flip", "label", "source_size"):
                assert np.array_equal(ra[name], rb[name]), name
            rel = np.linalg.norm(rb["features"] - ra["features"]) / np.linalg.norm(ra["features"])
            assert rel < 0.2
            assert np.abs(rb["attn_logits"] - ra["attn_logits"]).max() < 0.2


def test_transcode_resumes_after_a_part_and_refuses_another_source(v1):
    transcode_cache("zarr_float16", "wds", codec="int8", backend="webdataset")
    # a crash after the first part: the second part's marker is gone
    marker = next(Path("wds/status").glob("*.json"))
    data_dir = Path("wds/parts") / marker.stem
    marker.unlink()
    shutil.rmtree(data_dir)
    out = transcode_cache("zarr_float16", "wds", codec="int8", backend="webdataset")
    assert out["parts_written"] == 1 and out["parts_skipped"] == 1
    assert verify_cache("wds") == []
    with pytest.raises(CacheError, match="already holds a different target cache"):
        transcode_cache("zarr_float16", "wds", codec="lowrank")


def test_lossy_to_lossy_is_allowed_with_a_warning_in_the_manifest(v1):
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "transcode", "webdataset_int8", "low",
                                  "--codec", "lowrank", "--param", "attn_bits=6"])
    assert result.exit_code == 0, result.output
    assert "warning: lossy int8 targets re-encoded as lowrank" in result.output
    manifest = json.loads(Path("low/manifest.json").read_text())
    assert "errors add up" in manifest["transcode"][-1]["warning"]
    assert manifest["spec"]["codec_params"]["attn_bits"] == 6
    inspect = runner.invoke(main, ["cache", "inspect", "low"])
    assert "WARNING: lossy int8 targets" in inspect.output and "codec params" in inspect.output
    assert runner.invoke(main, ["cache", "verify", "low"]).exit_code == 0


@pytest.mark.parametrize("argv,needle", [
    (["--codec", "vq"], "--codec 'vq' is not one of float16, int8, lowrank"),
    (["--codec", "lowrank", "--param", "attn_bits=1"],
     "codec_params.attn_bits=1 is out of range for codec lowrank; allowed: an integer in 2..8"),
    (["--codec", "lowrank", "--param", "nope"], "--param 'nope': expected KEY=VALUE"),
])
def test_bad_transcode_arguments_are_one_line_errors(v1, argv, needle):
    result = CliRunner().invoke(main, ["cache", "transcode", "zarr_float16", "x", *argv])
    assert result.exit_code == 2 and needle in result.output
    assert len(result.output.strip().splitlines()) == 1
