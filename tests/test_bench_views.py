"""benchmarks/views.py (the view-diversity study of issue #14): its row expansion, configs and
the rule that picks the ImageNet defaults (pure functions, fast), and ``--smoke`` end to end
(slow)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CONFIG = BENCH / "configs" / "views.yaml"


def _load(name: str, file: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def views():
    return _load("bench_views", "views.py")


def _study(**changes) -> dict:
    study = yaml.safe_load(CONFIG.read_text())["views"]
    study.update(changes)
    return study


def test_the_study_config_expands_to_the_issue_rows(views):
    rows = views.expand_rows(_study())
    got = [(r.name, r.views, r.view_selection, r.online_fraction) for r in rows]
    assert got == [
        ("k1", 1, "uniform", 0.0),
        ("k2_uniform", 2, "uniform", 0.0), ("k2_round_robin", 2, "round_robin", 0.0),
        ("k4_uniform", 4, "uniform", 0.0), ("k4_round_robin", 4, "round_robin", 0.0),
        ("k8_uniform", 8, "uniform", 0.0), ("k8_round_robin", 8, "round_robin", 0.0),
        ("k1_online0.25", 1, "uniform", 0.25),
        ("online", None, None, 1.0),
    ]
    # costs and replays at E_t = 8: K + f x E_t forwards per image, (1 - f) E_t / K replays
    by = {r.name: r for r in rows}
    assert by["k4_uniform"].base_forwards_per_image(8) == 4
    assert by["k1_online0.25"].base_forwards_per_image(8) == 3
    assert by["online"].base_forwards_per_image(8) == 8
    assert by["k2_round_robin"].epochs_per_cached_view(8) == 4
    assert by["k1_online0.25"].epochs_per_cached_view(8) == 6
    assert by["online"].epochs_per_cached_view(8) is None
    # one stage-1 cache of K = 8; 1, 2, 4 cut from it; the online row reads the K = 8 cache
    assert views.caches_needed(rows, _study()) == (8, [1, 2, 4])
    assert views.caches_needed(views.select_rows(rows, "k2_uniform,online"), _study()) == (8, [2])
    assert by["online"].cache_views(8) == 8 and by["k1"].cache_views(8) == 1


def test_partial_online_rows_on_larger_caches_and_bad_sections(views):
    rows = views.expand_rows(_study(online_views=[1, 4], online_fractions=[0.25, 0.5]))
    names = [r.name for r in rows]
    assert names[-4:] == ["k1_online0.25", "k4_round_robin_online0.25", "k1_online0.5",
                          "k4_round_robin_online0.5"]
    assert "online" not in names  # 1.0 not listed: no reference row
    assert [r.name for r in views.expand_rows(_study(view_selection=["round_robin"]))][:3] == \
        ["k1", "k2_round_robin", "k4_round_robin"]
    for bad, message in [
        ({"views": [1, 2, 2]}, "twice"), ({"views": [0, 2]}, "integers >= 1"),
        ({"view_selection": ["random"]}, "view_selection"),
        ({"online_fractions": [0.0, 1.0]}, "online_fractions"),
        ({"online_views": [16]}, "exceeds the largest cache"),
        ({"typo": 1}, "views.typo: unknown key"),
    ]:
        with pytest.raises(views.StudyError, match=message):
            views.expand_rows(_study(**bad))
    with pytest.raises(views.StudyError, match="no row named 'k3'.*k1, k2_uniform"):
        views.select_rows(views.expand_rows(_study()), "k1,k3")
    assert [r.name for r in views.select_rows(views.expand_rows(_study()), "online,k1")] == \
        ["k1", "online"]  # table order


def test_group_configs_are_valid_pipelines_with_their_own_cache(views, tmp_path):
    from pipeline.config import parse_config

    raw, q, study = views.load_study(str(CONFIG), [f"workdir={tmp_path}"])
    assert raw["base_model"]["checkpoint"].endswith(
        "benchmarks/strong_base/model.safetensors")
    assert raw["bootstrap"]["enabled"] is False
    template = raw["runs"][0]
    assert template["epochs"] == 8
    rows = {r.name: r for r in views.expand_rows(study)}
    group = views.group_raw(raw, template, [rows["k2_uniform"]], k=2, seed=1,
                            base_checkpoint="/x/base.safetensors")
    cfg = parse_config(group)
    assert cfg.targets.views == 2 and str(cfg.cache_path) == str(tmp_path / "cache-k2")
    assert cfg.workdir == str(tmp_path / "seed1")
    assert cfg.base_model.checkpoint == "/x/base.safetensors" and not cfg.bootstrap.enabled
    (run,) = cfg.runs
    assert (run.name, run.seed, run.view_selection, run.online_fraction, run.epochs) == \
        ("k2_uniform", 1, "uniform", 0.0, 8)
    assert {k: getattr(run.model, k) for k in template["model"]} == template["model"]
    online = parse_config(views.group_raw(raw, template, [rows["online"]], k=8, seed=0,
                                          base_checkpoint="/x/b"))
    assert online.runs[0].online_fraction == 1.0 and online.targets.views == 8
    assert raw["targets"]["views"] == 8 and raw["runs"][0]["name"] == "tec"  # not modified


def test_finetune_settings_follow_quality_yaml_and_take_overrides(views):
    quality_ft = dict(yaml.safe_load((BENCH / "configs" / "quality.yaml").read_text())
                      ["quality"]["finetune"])
    quality_ft.pop("rows")
    assert views.finetune_settings(_study()) == quality_ft
    study = _study(finetune={"settings_from": "benchmarks/configs/quality.yaml", "epochs": 7,
                             "rows": ["k1", "base", "nope"]})
    assert views.finetune_settings(study) == {**quality_ft, "epochs": 7}
    rows = views.expand_rows(study)
    assert views.finetune_rows(study, rows) == ["k1", "base"]
    assert views.finetune_rows(_study(), rows) == [r.name for r in rows]
    assert views.finetune_settings(_study(finetune={"enabled": False})) is None
    with pytest.raises(views.StudyError, match="views.finetune"):
        views.finetune_settings(_study(finetune={"epochs": 1, "no_such_key": 2}))


def _row(name, views_, selection, fraction, knn, linear, finetune=None, epochs=8):
    cost = (views_ or 0) + fraction * epochs
    replays = None if not views_ else (1 - fraction) * epochs / views_
    return {"name": name, "views": views_, "view_selection": selection,
            "online_fraction": fraction, "epochs": epochs, "knn_top1": knn,
            "linear_top1": linear, "finetune_top1": finetune,
            "base_forwards_per_image": cost, "epochs_per_cached_view": replays}


def test_choose_takes_the_cheapest_cached_setting_within_tolerance(views):
    rows = [
        _row("k1", 1, "uniform", 0.0, 70.0, 78.0),               # -2.0 k-NN: out
        _row("k2_uniform", 2, "uniform", 0.0, 71.75, 79.5),     # -0.25 / -0.5 linear: out
        _row("k2_round_robin", 2, "round_robin", 0.0, 71.8, 79.8),  # -0.2 / -0.2: in, cost 2
        _row("k4_uniform", 4, "uniform", 0.0, 72.5, 80.5),       # better than online: in, cost 4
        _row("k1_online0.25", 1, "uniform", 0.25, 71.9, 79.9),   # in, cost 3
        _row("online", None, None, 1.0, 72.0, 80.0),
    ]
    chosen = views.choose(rows, tolerance=0.3)
    assert (chosen["views"], chosen["view_selection"], chosen["online_fraction"],
            chosen["row"]) == (2, "round_robin", 0.0, "k2_round_robin")
    assert chosen["deltas"] == pytest.approx({"knn_top1": -0.2, "linear_top1": -0.2})
    assert chosen["metrics"] == ["knn_top1", "linear_top1"]
    assert chosen["epochs_per_cached_view"] == 4.0 and chosen["base_forwards_per_image"] == 2
    assert "online" not in [c["row"] for c in chosen["candidates"]]
    within = {c["row"]: c["within"] for c in chosen["candidates"]}
    assert within == {"k1": False, "k2_uniform": False, "k2_round_robin": True,
                      "k4_uniform": True, "k1_online0.25": True}
    assert "0.3" in chosen["rule"] and "K + online_fraction x E_t" in chosen["rule"]
    # exactly 0.3 below still qualifies; a tighter tolerance moves the choice up in cost
    assert views.choose(rows, tolerance=0.2)["row"] == "k2_round_robin"
    assert views.choose(rows, tolerance=0.1)["row"] == "k1_online0.25"
    assert views.choose(rows, tolerance=0.05)["row"] == "k4_uniform"
    edge = [_row("k1", 1, "uniform", 0.0, 71.7, 79.7), rows[-1]]
    assert views.choose(edge, tolerance=0.3)["row"] == "k1"


def test_choose_counts_fine_tuning_when_the_reference_has_it_and_breaks_ties(views):
    rows = [
        _row("k2_uniform", 2, "uniform", 0.0, 72.0, 80.0, finetune=85.0),   # -1.0 fine-tune
        _row("k2_round_robin", 2, "round_robin", 0.0, 71.8, 80.0, finetune=None),  # missing
        _row("k4_uniform", 4, "uniform", 0.0, 71.9, 79.9, finetune=85.8),
        _row("k4_round_robin", 4, "round_robin", 0.0, 72.1, 80.1, finetune=86.1),
        _row("online", None, None, 1.0, 72.0, 80.0, finetune=86.0),
    ]
    chosen = views.choose(rows)
    assert chosen["metrics"] == ["knn_top1", "linear_top1", "finetune_top1"]
    # same cost and K: round_robin before uniform (exact replay counts, read: stream) ...
    assert chosen["row"] == "k4_round_robin"
    # ... even where uniform has the larger smallest margin
    better = {"knn_top1": 72.3, "linear_top1": 80.3, "finetune_top1": 86.2}  # +0.2 vs +0.1
    flipped = [{**r, **better} if r["name"] == "k4_uniform" else r for r in rows]
    assert views.choose(flipped)["row"] == "k4_round_robin"
    # a round-robin row that does not qualify leaves the uniform one
    out = [{**r, "linear_top1": 79.0} if r["name"] == "k4_round_robin" else r for r in flipped]
    assert views.choose(out)["row"] == "k4_uniform"
    # same cost, K, fraction and selection: the larger smallest margin
    twins = [_row("k4_a", 4, "uniform", 0.0, 71.9, 80.2, finetune=86.0),
             _row("k4_b", 4, "uniform", 0.0, 72.1, 80.1, finetune=86.1), rows[-1]]
    assert views.choose(twins)["row"] == "k4_b"
    by = {c["row"]: c for c in chosen["candidates"]}
    assert by["k2_round_robin"]["missing"] == ["finetune_top1"]
    assert not by["k2_round_robin"]["within"] and not by["k2_uniform"]["within"]
    # without the reference's fine-tuning only k-NN and linear count
    no_ft = [{**r, "finetune_top1": None} if r["name"] == "online" else r for r in rows]
    loose = views.choose(no_ft)
    assert loose["metrics"] == ["knn_top1", "linear_top1"]
    assert {c["row"]: c["within"] for c in loose["candidates"]}["k2_uniform"]
    assert loose["row"] == "k2_round_robin"   # both K = 2 rows qualify: round_robin first


def test_choose_without_reference_or_qualifying_row(views):
    rows = [_row("k1", 1, "uniform", 0.0, 60.0, 70.0)]
    chosen = views.choose(rows)
    assert chosen["row"] is None and chosen["views"] is None
    assert "no fully online reference" in chosen["why"]
    chosen = views.choose(rows + [_row("online", None, None, 1.0, 72.0, 80.0)])
    assert chosen["row"] is None and "no cached setting is within 0.3" in chosen["why"]
    assert chosen["candidates"][0]["deltas"] == pytest.approx({"knn_top1": -12.0,
                                                               "linear_top1": -10.0})


def test_merge_keeps_earlier_rows_of_the_same_config(views, tmp_path):
    order = ["k1", "k2_uniform", "online"]
    previous = {"created": "t0", "rows": [{"name": "online", "knn_top1": 1.0},
                                          {"name": "k1", "knn_top1": 2.0},
                                          {"name": "gone", "knn_top1": 3.0}]}
    merged = views.merge_rows(previous, [{"name": "k1", "knn_top1": 5.0}], order, "t1")
    assert [(r["name"], r["knn_top1"], r["measured"]) for r in merged] == \
        [("k1", 5.0, "t1"), ("online", 1.0, "t0")]
    out = tmp_path / "views.json"
    record = {"file": "x", "overrides": [], "views": {"views": [1]}}
    out.write_text(json.dumps({**previous, "config": record}))
    assert views.previous_result(out, record)["created"] == "t0"
    assert views.previous_result(out, {**record, "overrides": ["a=1"]}) is None


def test_report_renders_the_views_table(views, monkeypatch):
    report = _load("bench_report", "report.py")
    rows = [_row("k2_round_robin", 2, "round_robin", 0.0, 71.8, 79.8),
            _row("online", None, None, 1.0, 72.0, 80.0)]
    for r in rows:
        r.update(seeds=[0], knn_top1_std=0.0, linear_top1_std=0.0, finetune_top1_std=None)
    result = {"benchmark": "views", "rows": rows, "chosen": views.choose(rows),
              "base": {"checkpoint": "b.safetensors", "epochs": 40, "knn_top1": 70.0,
                       "linear_top1": 78.0, "finetune_top1": None},
              "steps": {"source_views": 8, "attention_target": {
                  "tau": 1.0, "k": 4, "entropy": 3.5, "uniform_entropy": 3.892}},
              "git": {"commit": "abc"}, "machine": {"gpu": None}, "device": "cpu",
              "command": "benchmarks/views.py", "created": "now", "runtime_s": 60.0}
    monkeypatch.setattr(report, "_load", lambda name: result if name == "views" else None)
    text = report.views_block()
    assert "| k2_round_robin | 2 | round_robin | 0 | 8 | 4.0 | 2 | 1 | 71.80 ± 0.00 (-0.20) | " \
           "79.80 ± 0.00 (-0.20) | n/a |" in text
    assert "**Chosen: K = 2, view_selection round_robin, online_fraction 0**" in text
    assert "K = 8 cache" in text and "3.500 nats" in text
    monkeypatch.setattr(report, "_load", lambda name: None)
    assert "python benchmarks/views.py" in report.views_block()


def test_a_missing_base_model_is_one_line_before_any_work(views, tmp_path, capsys):
    code = views.main(["--set", f"workdir={tmp_path}/w", "--set",
                       f"base_model.checkpoint={tmp_path}/none.safetensors",
                       "--set", f"data.prepare_dir={tmp_path}/data",
                       "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert not (tmp_path / "data").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_smoke_runs_end_to_end_and_resumes(views, tmp_path):
    """--smoke on a tmp workdir: bootstrap, stage 1 (K = 2), the K = 1 subset, five rows
    trained, evaluated and fine-tuned, views_smoke.json written; a second invocation of one row
    reuses everything and keeps the other rows."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs the Fashion-MNIST IDX files (Debian dataset-fashion-mnist)")
    data = tmp_path / "data"
    args = ["--smoke", "--set", f"workdir={tmp_path}/w", "--set", f"data.prepare_dir={data}",
            "--set", f"data.train={data}/train-000000.tar",
            "--set", f"data.test={data}/test-000000.tar",
            "--set", f"quality.eval_train_shards={data}/train-{{000000..000001}}.tar",
            "--out", str(tmp_path / "views_smoke.json")]
    assert views.main(args) == 0
    result = json.loads((tmp_path / "views_smoke.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["k1", "k2_uniform", "k2_round_robin", "k1_online0.25", "online"]
    for r in result["rows"]:
        assert 10.0 < r["knn_top1"] <= 100.0 and 10.0 < r["linear_top1"] <= 100.0
        assert 0.0 <= r["finetune_top1"] <= 100.0 and r["seeds"] == [0]
        assert r["epochs"] == 1
    assert result["chosen"]["reference"] == "online" and result["chosen"]["candidates"]
    by = {r["name"]: r for r in result["rows"]}
    # one epoch of round-robin replays view 0, which the K = 1 cache holds bit for bit: the same
    # run (same seed, same records), so the same numbers
    for metric in ("knn_top1", "linear_top1", "finetune_top1"):
        assert by["k1"][metric] == by["k2_round_robin"][metric], metric
    assert result["benchmark"] == "views_smoke" and result["git"]["commit"]
    from storage.cache import open_cache

    k1, k2 = open_cache(tmp_path / "w" / "cache-k1"), open_cache(tmp_path / "w" / "cache-k2")
    assert (k1.spec.views, k2.spec.views, len(k1)) == (1, 2, len(k2))
    import numpy as np

    for i in (0, len(k1) - 1):  # the K = 1 cache is the K = 2 cache's first view, bit for bit
        a, b = k1.read(i, 0, decode=False), k2.read(i, 0, decode=False)
        assert all(np.array_equal(np.asarray(a[f]), np.asarray(b[f])) for f in a
                   if f in ("features", "attn_logits"))
    first = {r["name"]: r for r in result["rows"]}
    assert views.main(args + ["--rows", "k1"]) == 0  # everything reused, other rows kept
    again = json.loads((tmp_path / "views_smoke.json").read_text())
    assert [r["name"] for r in again["rows"]] == names and again["rows_run"] == ["k1"]
    assert again["rows"][0]["knn_top1"] == first["k1"]["knn_top1"]
    assert again["rows"][0]["finetune_top1"] == first["k1"]["finetune_top1"]
    assert again["per_seed"]["0"]["steps"]["train_k1_s"] < 60
    assert again["earlier_invocations"][0]["created"] == result["created"]
