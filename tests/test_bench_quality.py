"""benchmarks/quality.py ``--add-finetune``: fine-tuning rows added to a finished result file
(the fine-tuning itself is stubbed here; tests/test_finetune.py tests it)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST = 1767225600.0  # 2026-01-01T00:00:00Z: when the fixture's result was "written"
BENCH = ROOT / "benchmarks"


def _load(name: str, file: str):
    """A benchmarks/ script as a module (they import benchmarks/common.py as `common`)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture
def quality(monkeypatch):
    module = _load("bench_quality", "quality.py")
    calls = []

    def fake_finetune_row(path, row, arch, raw, quality, workdir):
        calls.append({"path": str(path), "row": row, "workdir": str(workdir),
                      "epochs": quality["finetune"]["epochs"]})
        return {"finetune_top1": {"tec": 80.0, "base": 78.0}[row] + len(calls) / 10,
                "finetune_dir": str(workdir / "finetune" / row)}

    monkeypatch.setattr(module, "finetune_row", fake_finetune_row)
    module.calls = calls
    return module


def _result(tmp_path: Path, quality, config: str) -> tuple[Path, dict, dict]:
    """A finished two-row, two-seed result of ``config`` with model files written before it."""
    raw, q = quality.load_raw(config, [f"workdir={tmp_path / 'work'}"])
    quality.make_paths_absolute(raw, q)
    files = {}
    for seed in (0, 1):
        for row in ("base", "tec"):
            f = tmp_path / f"{row}{seed}.safetensors"
            f.write_bytes(b"model")
            old = FIRST - 3600  # written before the result
            os.utime(f, (old, old))
            files[(seed, row)] = str(f)
    per_seed = {str(s): {"eval": {row: {"knn_top1": 70.0 + s, "linear_top1": 75.0,
                                        "file": files[(s, row)]} for row in ("base", "tec")}}
                for s in (0, 1)}
    rows = [{"name": row, "epochs": 3, "seeds": [0, 1], "knn_top1": 70.5, "knn_top1_std": 0.7,
             "linear_top1": 75.0, "linear_top1_std": 0.0} for row in ("base", "tec")]
    header = quality.result_header("quality_test")
    header.update(created="2026-01-01T00:00:00+00:00", command="benchmarks/quality.py (first)")
    result = {**header, "runtime_s": 1.0, "rows": rows, "goals": {}, "per_seed": per_seed,
              "config": {"file": config, "overrides": [],
                         "pipeline": json.loads(json.dumps(raw)), "quality": q}}
    out = tmp_path / "result.json"
    out.write_text(json.dumps(result))
    return out, raw, {"file": config, "overrides": [], "pipeline": raw, "quality": q}


def test_add_finetune_fills_rows_and_goals(tmp_path, quality):
    config = str(BENCH / "configs" / "quality_codec.yaml")  # has no quality.finetune section
    out, raw, record = _result(tmp_path, quality, config)
    q = record["quality"]
    assert "finetune" not in q
    assert quality.add_finetune(out, raw, q, record) == 0
    result = json.loads(out.read_text())
    assert len(quality.calls) == 4  # 2 rows x 2 seeds, each in its seed's workdir
    assert {c["workdir"] for c in quality.calls} == {str(tmp_path / "work" / "seed0"),
                                                    str(tmp_path / "work" / "seed1")}
    assert {c["epochs"] for c in quality.calls} == {5}  # quality.yaml's miniature budget
    by = {r["name"]: r for r in result["rows"]}
    tec = [result["per_seed"][s]["eval"]["tec"]["finetune_top1"] for s in ("0", "1")]
    assert by["tec"]["finetune_top1"] == pytest.approx(sum(tec) / 2)
    assert by["tec"]["finetune_top1_values"] == pytest.approx(tec)
    base = [result["per_seed"][s]["eval"]["base"]["finetune_top1"] for s in ("0", "1")]
    goal = result["goals"]["tec_minus_base_finetune_top1"]
    assert goal["mean"] == pytest.approx(sum(tec) / 2 - sum(base) / 2)
    assert goal["met"] is True
    added = result["finetune_added"]
    assert added["settings_from"] == "benchmarks/configs/quality.yaml"
    assert sorted(added["fine_tuned"]) == ["base/seed0", "base/seed1", "tec/seed0", "tec/seed1"]
    assert added["skipped"] == {}
    # the original run's record is kept, the addition recorded beside it
    assert (result["created"], result["command"]) == ("2026-01-01T00:00:00+00:00",
                                                      "benchmarks/quality.py (first)")
    assert added["command"] != result["command"]


def test_add_finetune_skips_a_model_changed_since_the_result(tmp_path, quality):
    config = str(BENCH / "configs" / "quality_codec.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    changed = json.loads(out.read_text())["per_seed"]["1"]["eval"]["base"]["file"]
    later = FIRST + 60  # the result's run took 1 s
    os.utime(changed, (later, later))  # retrained after the result was written
    Path(json.loads(out.read_text())["per_seed"]["0"]["eval"]["base"]["file"]).unlink()
    quality.add_finetune(out, raw, record["quality"], record)
    result = json.loads(out.read_text())
    skipped = result["finetune_added"]["skipped"]
    assert set(skipped) == {"base/seed0", "base/seed1"}
    assert "no longer exists" in skipped["base/seed0"]
    assert "modified after the result was written" in skipped["base/seed1"]
    assert {c["row"] for c in quality.calls} == {"tec"}
    by = {r["name"]: r for r in result["rows"]}
    assert "finetune_top1" not in by["base"]
    assert len(by["tec"]["finetune_top1_values"]) == 2


def test_add_finetune_refuses_another_config_or_no_result(tmp_path, quality):
    config = str(BENCH / "configs" / "quality_codec.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    other = json.loads(json.dumps(raw))
    other["targets"]["codec"] = "lowrank"
    with pytest.raises(SystemExit, match="written by another config"):
        quality.add_finetune(out, other, record["quality"], {**record, "pipeline": other})
    with pytest.raises(SystemExit, match="no result file"):
        quality.add_finetune(tmp_path / "missing.json", raw, record["quality"], record)
    assert quality.calls == []


@pytest.fixture
def storage_bench():
    return _load("bench_storage", "storage_bench.py")


@pytest.mark.parametrize("finetune, within", [((70.0, 69.8), True), ((70.0, 69.6), False),
                                              (None, True)])
def test_storage_best_within_0p3_counts_finetuning_once_measured(tmp_path, monkeypatch,
                                                                  storage_bench, finetune, within):
    """best_within_0p3 (issue #16): lowrank qualifies only when every measured metric (k-NN,
    linear and, once both files have it, fine-tuning) is within 0.3 point of float16."""
    monkeypatch.setattr(storage_bench, "RESULTS_DIR", tmp_path)
    for i, name in enumerate(storage_bench.QUALITY_FILES.values()):  # float16, lowrank
        row = {"name": "tec", "seeds": [0], "epochs": 2, "knn_top1": 62.0 - 0.1 * i,
               "linear_top1": 74.4}
        if finetune is not None:
            row["finetune_top1"] = finetune[i]
        (tmp_path / name).write_text(json.dumps({"rows": [row], "runtime_s": 1.0}))
    vitb = {"float16": 339_968, storage_bench.DEFAULT_SETTING: 46_297}
    rows, best = storage_bench.quality_rows(vitb)
    assert best["setting"] == (storage_bench.DEFAULT_SETTING if within else "float16")
    assert best["vitb_bytes_per_view"] == vitb[best["setting"]]
    assert ("finetune_top1" in best["delta_vs_float16"]) == (finetune is not None)
    assert rows["tec (lowrank cache)"]["finetune_top1"] == (finetune[1] if finetune else None)
