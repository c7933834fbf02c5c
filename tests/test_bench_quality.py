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
              "epochs": quality.derive_epochs(raw, q), "files": {},
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
    assert ("finetune_top1" in best["measured"][0]["delta_vs_float16"]) == (finetune is not None)
    assert rows["tec (lowrank cache, reduced)"]["finetune_top1"] == (finetune[1] if finetune
                                                                       else None)
    assert "reduced" in best["note"] and "also" not in best
    assert [m["within"] for m in best["measured"]] == [within]


@pytest.mark.parametrize("linear, linear_fb145, setting", [
    (78.0, 78.0, "default"),     # both within: the smaller (the default, 46,285 B)
    (77.6, 78.0, "fb145"),       # only the fb 1.45 row is within
    (77.6, 77.7, "float16")])    # none is within: float16 itself
def test_storage_best_within_0p3_prefers_the_benchmarks_codec_rows(
        tmp_path, monkeypatch, storage_bench, linear, linear_fb145, setting):
    """With quality.json's codec rows (every seed, full settings) present, they decide
    best_within_0p3: the smallest ViT-B setting within 0.3 point on every measure; the reduced
    pair is reported beside them; a row whose settings are not in the table is not counted."""
    monkeypatch.setattr(storage_bench, "RESULTS_DIR", tmp_path)
    for name in storage_bench.QUALITY_FILES.values():  # the reduced pair: within
        row = {"name": "tec", "seeds": [0], "epochs": 2, "knn_top1": 62.0, "linear_top1": 74.4}
        (tmp_path / name).write_text(json.dumps({"rows": [row], "runtime_s": 1.0}))
    fb145 = {"codec": "lowrank", "codec_params": {"feature_bits": 1.45, "attn_bits": 3}}
    rows = [{"name": "tec", "seeds": [0, 1], "knn_top1": 74.6, "linear_top1": 78.1,
             "finetune_top1": 71.7},
            {"name": "tec_lowrank", "seeds": [0, 1], "knn_top1": 74.5, "linear_top1": linear,
             "finetune_top1": 71.6, "cache_targets": {"codec": "lowrank"}},
            {"name": "tec_fb145", "seeds": [0, 1], "knn_top1": 74.5,
             "linear_top1": linear_fb145, "finetune_top1": 71.6, "cache_targets": fb145},
            {"name": "tec_unknown", "seeds": [0, 1], "knn_top1": 80.0, "linear_top1": 80.0,
             "cache_targets": {"codec": "lowrank", "codec_params": {"feature_bits": 0.1}}}]
    (tmp_path / "quality.json").write_text(json.dumps({"rows": rows, "runtime_s": 1.0}))
    names = {"default": storage_bench.DEFAULT_SETTING,
             "fb145": storage_bench._setting_of(fb145), "float16": "float16"}
    assert names["fb145"].startswith("lowrank fb 1.45, attn 3-bit")
    vitb = {"float16": 387_217, names["default"]: 46_285, names["fb145"]: 46_249 + 100}
    table, best = storage_bench.quality_rows(vitb)
    assert best["setting"] == names[setting]
    assert best["vitb_bytes_per_view"] == vitb[names[setting]]
    assert [m["setting"] for m in best["measured"]] == [names["default"], names["fb145"]]
    assert best["measured"][0]["delta_vs_float16"]["linear_top1"] == pytest.approx(linear - 78.1)
    assert set(best["measured"][0]["delta_vs_float16"]) == {"knn_top1", "linear_top1",
                                                           "finetune_top1"}
    assert best["seeds"] == [0, 1] and "quality.json" in best["measured"][0]["note"]
    assert best["also"][0]["delta_vs_float16"] == {"knn_top1": 0.0, "linear_top1": 0.0}
    assert table[f"tec_lowrank ({names['default']})"]["file"] == "benchmarks/results/quality.json"
    assert "tec (float16 cache, reduced)" in table
    assert not any(k.startswith("tec_unknown") for k in table)


# ----------------------------------------------------------------------------- --add-rows
@pytest.fixture
def stubbed_rows(quality, monkeypatch, tmp_path):
    """quality.py with stage 1 + training (run_seed), evaluation and fine-tuning stubbed: each
    trained codec row records its config and scores 70.2 + seed (k-NN) / 75.1 (linear)."""
    trained = []

    def fake_run_seed(cfg, *, steps, with_reference=False):
        (run,) = cfg.runs
        trained.append({"workdir": str(cfg.workdir), "cache": str(cfg.cache_path),
                        "codec": cfg.targets.codec, "name": run.name, "seed": run.seed,
                        "epochs": run.epochs, "view_selection": run.view_selection})
        f = tmp_path / f"{run.name}{run.seed}.safetensors"
        f.write_bytes(b"model")
        steps.update({"bootstrap_s": 1.0, "stage1_s": 2.0, f"train_{run.name}_s": 3.0})
        return {"models": {"base": tmp_path / "base.safetensors", run.name: f},
                "runs": {run.name: {"steps": 5}}}

    def fake_evaluate(path, arch, data_fn, q, test_set=True):
        seed = int(Path(path).stem[-1])
        metrics = {"knn_top1": 70.2 + seed, "linear_top1": 75.1}
        for m in ("knn", "linear"):
            metrics.update({f"{m}_cls": metrics[f"{m}_top1"], f"{m}_mean": 0.0,
                            f"{m}_readout": "cls"})
        return {**metrics, "file": str(path)}

    def fake_finetune_row(path, row, arch, raw, q, workdir):
        trained.append({"finetuned": row, "workdir": str(workdir)})
        return {"finetune_top1": 71.0}

    monkeypatch.setattr(quality, "run_seed", fake_run_seed)
    monkeypatch.setattr(quality, "evaluate_cached", fake_evaluate)
    monkeypatch.setattr(quality, "finetune_row", fake_finetune_row)
    return trained


def test_add_rows_trains_each_seeds_codec_row_from_its_own_cache(tmp_path, quality,
                                                                stubbed_rows):
    """--add-rows (issue #16): the config's codec rows, for every seed of the result, each from
    a second cache of that seed's base model with the tec run's settings; goals pair them with
    tec per seed."""
    config = str(BENCH / "configs" / "quality.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    assert record["quality"]["codec_rows"]["tec_lowrank"] == {"codec": "lowrank"}
    q = {**record["quality"], "codec_rows": {"tec_lowrank": {"codec": "lowrank"}}}
    assert quality.add_rows(out, raw, q, record) == 0
    runs = [t for t in stubbed_rows if "name" in t]
    tec = next(r for r in raw["runs"] if r["name"] == "tec")
    assert [(t["seed"], t["codec"], t["name"]) for t in runs] == [(0, "lowrank", "tec_lowrank"),
                                                                  (1, "lowrank", "tec_lowrank")]
    for t in runs:
        seed_dir = tmp_path / "work" / f"seed{t['seed']}"
        assert t["workdir"] == str(seed_dir)  # the seed's bootstrap: its base model
        assert t["cache"] == str(seed_dir / "cache-tec_lowrank")  # not the tec row's cache
        assert (t["epochs"], t["view_selection"]) == (tec["epochs"], tec["view_selection"])
    assert [t["finetuned"] for t in stubbed_rows if "finetuned" in t] == ["tec_lowrank"] * 2
    result = json.loads(out.read_text())
    row = next(r for r in result["rows"] if r["name"] == "tec_lowrank")
    assert row["cache_targets"] == {"codec": "lowrank"}
    assert row["seeds"] == [0, 1]
    assert row["knn_top1_values"] == pytest.approx([70.2, 71.2])
    assert row["finetune_top1"] == pytest.approx(71.0)
    # the fixture's tec row: k-NN 70 + seed, linear 75.0 -> paired differences +0.2 and +0.1
    goal = result["goals"]["tec_lowrank_minus_tec_knn_top1"]
    assert goal["per_seed"] == pytest.approx([0.2, 0.2])
    assert goal["met"] is True
    assert result["goals"]["tec_lowrank_minus_tec_linear_top1"]["mean"] == pytest.approx(0.1)
    steps = result["per_seed"]["0"]["steps"]
    assert steps["tec_lowrank_stage1_s"] == 2.0 and steps["train_tec_lowrank_s"] == 3.0
    assert "tec_lowrank_bootstrap_s" not in steps and "bootstrap_s" not in steps
    assert result["rows_added"][0]["rows"] == ["tec_lowrank"]
    assert result["created"] == "2026-01-01T00:00:00+00:00"  # the original run's record
    # a second call has nothing left to add
    assert quality.add_rows(out, raw, q, record) == 0
    assert len([t for t in stubbed_rows if "name" in t]) == 2


def test_add_rows_goal_fails_more_than_0p3_below_tec(tmp_path, quality, stubbed_rows,
                                                     monkeypatch):
    config = str(BENCH / "configs" / "quality.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    real = quality.evaluate_cached

    def worse(path, *a, **k):
        r = real(path, *a, **k)
        return {**r, "linear_top1": 74.6}  # 0.4 below the fixture's tec row

    monkeypatch.setattr(quality, "evaluate_cached", worse)
    quality.add_rows(out, raw, record["quality"], record)
    goals = json.loads(out.read_text())["goals"]
    assert goals["tec_lowrank_minus_tec_linear_top1"]["met"] is False
    assert goals["tec_lowrank_minus_tec_knn_top1"]["met"] is True


def test_add_rows_refuses_a_retrained_base_model(tmp_path, quality, stubbed_rows):
    config = str(BENCH / "configs" / "quality.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    base = json.loads(out.read_text())["per_seed"]["1"]["eval"]["base"]["file"]
    os.utime(base, (FIRST + 60, FIRST + 60))
    with pytest.raises(SystemExit, match=f"seed 1's base model {base}"):
        quality.add_rows(out, raw, record["quality"], record)
    assert stubbed_rows == []


def test_codec_row_config_names_a_setting_it_cannot_vary(quality):
    raw, _ = quality.load_raw(str(BENCH / "configs" / "quality.yaml"), [])
    with pytest.raises(ValueError, match=r"codec_rows.tec_k2: .*\['views'\]"):
        quality.codec_row_config(raw, 0, "tec_k2", {"views": 2})


def test_add_finetune_replaces_another_budget_and_keeps_added_rows(tmp_path, quality,
                                                                   monkeypatch):
    """A file holds one fine-tuning protocol: fine-tuning a copy at a longer budget drops every
    value of the old budget (rows not fine-tuned again have none), and a row added by --add-rows
    after the first run is fine-tuned, not skipped as modified after the result."""
    config = str(BENCH / "configs" / "quality_codec.yaml")
    out, raw, record = _result(tmp_path, quality, config)
    result = json.loads(out.read_text())
    for per in result["per_seed"].values():
        for row in ("base", "tec"):
            per["eval"][row]["finetune_top1"] = 60.0
    for entry in result["rows"]:
        entry.update(finetune_top1=60.0, finetune_top1_std=0.0, finetune_top1_values=[60.0] * 2)
    result["finetune_added"] = {"settings": {"epochs": 5}}
    added = tmp_path / "tec_lowrank0.safetensors"  # written by --add-rows, after the result
    added.write_bytes(b"model")
    os.utime(added, (FIRST + 600, FIRST + 600))
    result["per_seed"]["0"]["eval"]["tec_lowrank"] = {"knn_top1": 70.0, "linear_top1": 75.0,
                                                      "file": str(added)}
    result["rows_added"] = [{"created": "2026-01-01T00:10:00+00:00", "seconds": 30.0,
                             "rows": ["tec_lowrank"]}]
    out.write_text(json.dumps(result))
    calls = []

    def fake(path, row, arch, raw, q, workdir):
        calls.append((row, q["finetune"]["epochs"]))
        return {"finetune_top1": 90.0}

    monkeypatch.setattr(quality, "finetune_row", fake)
    q = {**record["quality"], "finetune": {"epochs": 20, "rows": ["tec", "tec_lowrank"]}}
    quality.add_finetune(out, raw, q, record)
    result = json.loads(out.read_text())
    assert sorted(calls) == [("tec", 20), ("tec", 20), ("tec_lowrank", 20)]
    by = {r["name"]: r for r in result["rows"]}
    assert by["tec"]["finetune_top1"] == 90.0
    assert "finetune_top1" not in by["base"]  # the old budget's value is gone
    assert all("finetune_top1" not in result["per_seed"][s]["eval"]["base"] for s in ("0", "1"))
    assert result["finetune_added"]["replaced_settings"] == {"epochs": 5}
    assert result["finetune_added"]["skipped"] == {}
