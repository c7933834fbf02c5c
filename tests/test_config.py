"""pipeline.yaml schema: typed from_dict, --set overrides, the shipped configs and `tec plan`.

Also checks the plan's numbers against independent counts: FLOPs against
torch.utils.flop_counter on real timm / new-model forward passes, bytes per view against the
bytes of a cache written by storage/.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml
from config_helpers import (  # noqa: F401
    ALL_CONFIGS,
    BASE_KWARGS,
    REPO,
    ROOT_PIPELINE,
    SHIPPED,
    config_error,
    minimal_pipeline,
)

from pipeline.config import (
    DataConfig,
    EvalConfig,
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_config,
)
from stages.configs import from_dict, to_dict


# ----------------------------------------------------------------------------- from_dict
@dataclass
class Inner:
    depth: int = 3
    ratio: float = 0.5
    mode: Literal["fast", "slow"] = "fast"
    pair: tuple[float, float] = (0.2, 1.0)
    sizes: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.depth % 3:
            raise ValueError(f"depth: {self.depth} is not a multiple of 3")


@dataclass
class Outer:
    name: str
    count: int = 1
    flag: bool = False
    maybe: int | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_from_dict_builds_typed_values():
    obj = from_dict(Outer, {"name": "a", "count": 2, "flag": True, "maybe": None, "tags": ["x"],
                            "extra": {"k": 1},
                            "inner": {"ratio": 1, "pair": [0.1, 0.9], "sizes": [1, 2, 3],
                                      "mode": "slow"}}, "top")
    assert obj.name == "a" and obj.count == 2 and obj.flag is True and obj.maybe is None
    assert obj.tags == ["x"] and obj.extra == {"k": 1}
    assert isinstance(obj.inner, Inner)
    assert obj.inner.ratio == 1.0 and isinstance(obj.inner.ratio, float)  # int accepted as float
    assert obj.inner.pair == (0.1, 0.9) and isinstance(obj.inner.pair, tuple)
    assert obj.inner.sizes == (1, 2, 3)
    assert obj.inner.mode == "slow"
    assert to_dict(obj)["inner"]["pair"] == [0.1, 0.9]
    assert from_dict(Outer, to_dict(obj)) == obj  # round trip


def test_from_dict_defaults_and_none_section():
    obj = from_dict(Outer, {"name": "n"})
    assert obj == Outer(name="n")
    assert from_dict(Inner, None, "sec") == Inner()


def test_unknown_key_names_dotted_key_and_allowed_keys():
    msg = config_error(from_dict, Outer, {"name": "a", "inner": {"deph": 3}}, "top")
    assert msg.startswith("unknown key top.inner.deph;")
    assert "allowed keys: depth, mode, pair, ratio, sizes" in msg
    msg = config_error(from_dict, Outer, {"name": "a", "cuont": 1}, "top")
    assert "top.cuont" in msg and "count" in msg and "tags" in msg
    msg = config_error(from_dict, Outer, {"name": "a", "cuont": 1})
    assert msg.startswith("unknown key cuont;")


@pytest.mark.parametrize("key, value, expected", [
    ("count", "two", "top.count: expected an integer, got 'two'"),
    ("count", 1.5, "top.count: expected an integer"),
    ("count", True, "top.count: expected an integer"),  # a bool is not an int here
    ("flag", "yes", "top.flag: expected true or false, got 'yes'"),
    ("flag", 1, "top.flag: expected true or false"),
    ("name", 3, "top.name: expected a string, got 3"),
    ("maybe", "x", "top.maybe: 'x' is not int or null"),
    ("tags", "x", "top.tags: expected a list"),
    ("tags", [1], "top.tags[0]: expected a string"),
    ("extra", [1], "top.extra: expected a mapping"),
    ("inner", 5, "top.inner: expected a mapping"),
])
def test_wrong_types_name_the_key(key, value, expected):
    data = {"name": "a", key: value}
    assert expected in config_error(from_dict, Outer, data, "top")


def test_literal_lists_allowed_values():
    msg = config_error(from_dict, Outer, {"name": "a", "inner": {"mode": "medium"}}, "top")
    assert msg == "top.inner.mode: 'medium' is not allowed; use one of 'fast', 'slow'"


@pytest.mark.parametrize("pair, expected", [
    ([0.1], "top.inner.pair: expected 2 values"),
    ([0.1, 0.2, 0.3], "top.inner.pair: expected 2 values"),
    ([0.1, "big"], "top.inner.pair[1]: expected a number, got 'big'"),
    (0.5, "top.inner.pair: expected a list of float"),
])
def test_tuples(pair, expected):
    assert expected in config_error(from_dict, Outer, {"name": "a", "inner": {"pair": pair}}, "top")


def test_variadic_tuple_elements_checked():
    msg = config_error(from_dict, Inner, {"sizes": [1, "x"]}, "sec")
    assert "sec.sizes[1]: expected an integer" in msg


def test_missing_required_key():
    assert config_error(from_dict, Outer, {"count": 1}, "top") == "missing required key top.name"


def test_non_mapping_section():
    assert "top: expected a mapping" in config_error(from_dict, Outer, ["a"], "top")
    assert "top: expected a mapping" in config_error(from_dict, Outer, "name: a", "top")


def test_validate_errors_are_qualified_with_the_section():
    msg = config_error(from_dict, Outer, {"name": "a", "inner": {"depth": 4}}, "top")
    assert msg.startswith("top.inner.depth: 4 is not a multiple of 3"), msg


# ----------------------------------------------------------------------------- overrides
def test_set_nested_value_parsed_as_yaml():
    raw = {"targets": {"views": 2, "view_policy": {"scale": [0.2, 1.0]}}}
    out = apply_overrides(raw, ["targets.views=4", "targets.codec=int8",
                                "targets.view_policy.scale=[0.5, 1.0]", "targets.strict=true",
                                "targets.ray.address=null", "workdir=/tmp/x y",
                                "targets.cache=a=b"])
    assert out["targets"]["views"] == 4
    assert out["targets"]["codec"] == "int8"
    assert out["targets"]["view_policy"]["scale"] == [0.5, 1.0]
    assert out["targets"]["strict"] is True
    assert out["targets"]["ray"] == {"address": None}  # missing mappings are created
    assert out["workdir"] == "/tmp/x y"
    assert out["targets"]["cache"] == "a=b"  # split at the first '='
    assert raw == {"targets": {"views": 2, "view_policy": {"scale": [0.2, 1.0]}}}  # not mutated


def test_set_floats_and_unparseable_yaml_kept_as_text():
    out = apply_overrides({}, ["a.b=1.5e-4", "a.c=[unclosed", "a.d=", "a.e=0.10"])
    assert out["a"]["b"] == pytest.approx(1.5e-4)
    assert out["a"]["c"] == "[unclosed"
    assert out["a"]["d"] is None
    assert out["a"]["e"] == pytest.approx(0.1)


def test_set_list_entry_by_position_and_by_name():
    raw = minimal_pipeline()
    out = apply_overrides(raw, ["runs.0.epochs=5", "runs.feature_only.batch_size=8",
                                "runs.tec.model.k=2", "runs.1.model.depth=6"])
    assert out["runs"][0]["epochs"] == 5
    assert out["runs"][1]["batch_size"] == 8
    assert out["runs"][0]["model"]["k"] == 2
    assert out["runs"][1]["model"]["depth"] == 6
    cfg = parse_config(out)
    assert cfg.run_named("tec").epochs == 5 and cfg.run_named("feature_only").batch_size == 8
    # replacing a whole list entry by position
    out = apply_overrides(raw, ["runs.1={name: other, epochs: 1, batch_size: 2}"])
    assert out["runs"][1] == {"name": "other", "epochs": 1, "batch_size": 2}


@pytest.mark.parametrize("override, expected", [
    ("targets.views", "--set 'targets.views': expected KEY=VALUE"),
    ("targets..views=3", "empty key segment"),
    ("=3", "empty key segment"),
    ("runs.nosuch.epochs=2",
     "--set runs.nosuch: no entry named 'nosuch' (names: tec, feature_only"),
    ("runs.7.epochs=2", "--set runs.7: index out of range (list has 2 entries)"),
    ("runs.7=2", "--set runs.7: index out of range"),
    ("workdir.sub=3", "--set workdir.sub: workdir is "),
    ("runs.0.name.x=3", "runs.0.name is 'tec', not a mapping"),
])
def test_set_errors(override, expected):
    msg = config_error(apply_overrides, minimal_pipeline(), [override])
    assert expected in msg


def test_override_unknown_key_is_caught_by_validation():
    raw = apply_overrides(minimal_pipeline(), ["targets.viewz=3"])
    assert "unknown key targets.viewz" in config_error(parse_config, raw)


# ----------------------------------------------------------------------------- parse_config
def test_parse_minimal_pipeline(tmp_path):
    cfg = parse_config(minimal_pipeline(tmp_path), source_file="x.yaml")
    assert isinstance(cfg, PipelineConfig) and cfg.source_file == "x.yaml"
    assert isinstance(cfg.data, DataConfig) and cfg.data.num_samples == 16
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.enabled is False
    assert cfg.base_model.timm_kwargs == BASE_KWARGS
    # targets.source and targets.cache default from data and workdir
    assert cfg.targets.source.path == cfg.data.train and cfg.targets.source.kind == "webdataset"
    assert cfg.cache_path == tmp_path / "work" / "cache"
    assert cfg.targets.view_policy.output_size == 32
    assert cfg.targets.view_policy.scale == (0.2, 1.0)
    assert [r.name for r in cfg.runs] == ["tec", "feature_only"]
    assert cfg.runs[0].betas == (0.9, 0.95)
    assert cfg.run_dir("tec") == tmp_path / "work" / "runs" / "tec"
    assert cfg.bootstrap.enabled is False
    # to_dict is plain YAML and parses back to the same config
    plain = cfg.to_dict()
    plain.pop("source_file")
    again = parse_config(yaml.safe_load(yaml.safe_dump(plain)))
    assert again.to_dict() == {**cfg.to_dict(), "source_file": None}


def test_parse_defaults_workdir_and_empty_runs():
    raw = minimal_pipeline()
    del raw["workdir"], raw["runs"], raw["eval"]
    cfg = parse_config(raw)
    assert cfg.workdir == "runs/default" and cfg.runs == []
    assert cfg.eval.enabled is True


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("targets"), "missing required section targets"),
    (lambda r: r.__setitem__("targetz", {}), "unknown key targetz; allowed top-level keys"),
    (lambda r: r.__setitem__("targets", [1, 2]), "targets: expected a mapping"),
    (lambda r: r.__setitem__("targets", "zarr"), "targets: expected a mapping"),
    (lambda r: r.__setitem__("data", "x"), "data: expected a mapping"),
    (lambda r: r.__setitem__("runs", {"tec": {}}), "runs: expected a list"),
    (lambda r: r["runs"].__setitem__(0, "tec"), "runs[0]: expected a mapping"),
    (lambda r: r.__setitem__("workdir", 5), "workdir: expected a path string"),
    (lambda r: r["targets"].__setitem__("views", -1), "targets.views: must be >= 1, got -1"),
    (lambda r: r["targets"].__setitem__("views", "four"), "targets.views: expected an integer"),
    (lambda r: r["targets"].__setitem__("codec", "int4"), "targets.codec: 'int4' is not allowed"),
    (lambda r: r["targets"]["ray"].__setitem__("num_cpus", 0),
     "targets.ray.num_cpus: must be >= 1"),
    (lambda r: r["targets"].__setitem__("source", {"kind": "webdataset"}),
     "targets.source.path: give the input shards"),
    (lambda r: r["targets"]["view_policy"].__setitem__("scale", [0.5, 2.0]),
     "targets.view_policy.scale max must be <= 1"),
    (lambda r: r["targets"]["view_policy"].__setitem__("ratio", [1.0]),
     "targets.view_policy.ratio: expected 2 values"),
    (lambda r: r["runs"][0].pop("name"), "missing required key runs[0].name"),
    (lambda r: r["runs"][1].__setitem__("name", "tec"), "runs: duplicate run name 'tec'"),
    (lambda r: r["runs"][0].__setitem__("online_fraction", 1.5),
     "runs[0].online_fraction: must be between 0 and 1, got 1.5"),
    (lambda r: r["runs"][0]["model"].__setitem__("depth", 4), "runs[0].model.depth"),
    (lambda r: r["runs"][0]["model"].__setitem__("tau", 0), "runs[0].model.tau: must be > 0"),
    (lambda r: r["runs"][0]["model"].__setitem__("k", 9),
     "runs[0].model.k: 9 exceeds targets.k_max 8"),
    (lambda r: r["runs"][0]["model"].__setitem__("depthh", 3), "unknown key runs[0].model.depthh"),
    (lambda r: r["runs"][0]["model"].__setitem__("img_size", 64), "runs[0].model.img_size"),
    (lambda r: r["runs"][0].__setitem__("betas", [0.9, 1.5]), "runs[0].betas"),
    (lambda r: r["runs"][0].__setitem__("amp", "fp16"), "runs[0].amp: 'fp16' is not allowed"),
    (lambda r: r["base_model"]["timm_kwargs"].__setitem__("patch_size", 5),
     "base_model.timm_kwargs: patch_size 5 does not divide img_size 32"),
    (lambda r: r["data"].__setitem__("shard_size", 0), "data.shard_size: must be >= 1"),
    (lambda r: r["data"].__setitem__("kind", "tfrecord"), "data.kind: 'tfrecord' is not allowed"),
    (lambda r: r["eval"].__setitem__("knn_k", 0), "eval.knn_k: must be >= 1"),
    (lambda r: r.__setitem__("bootstrap", {"enabled": "yes"}), "bootstrap.enabled: expected true"),
    (lambda r: r.__setitem__("bootstrap", {"enabled": True, "run": {"epochs": 1, "batch_size": 4,
                                                                    "model": {"target": "tec"}}}),
     "bootstrap.run.model.target"),
    (lambda r: r.__setitem__("bootstrap", {"enabled": True, "run": {"epochs": 0, "batch_size": 4}}),
     "bootstrap.run.epochs: must be >= 1"),
])
def test_parse_errors_name_the_key(mutate, expected):
    raw = copy.deepcopy(minimal_pipeline())
    mutate(raw)
    msg = config_error(parse_config, raw)
    assert expected in msg, msg


def test_depth_error_says_multiple_of_three():
    raw = minimal_pipeline()
    raw["runs"][0]["model"]["depth"] = 4
    msg = config_error(parse_config, raw)
    assert "depth" in msg and "multiple of adapter_group=3" in msg
    raw["runs"][0]["model"]["use_encoder_adapter"] = False  # fine without the encoder adapter
    parse_config(raw)


def test_k_above_k_max_is_fine_without_attention():
    raw = minimal_pipeline()
    raw["runs"][0]["model"].update(k=12, use_attention=False)
    parse_config(raw)


def test_bootstrap_takes_base_geometry():
    raw = minimal_pipeline()
    raw["base_model"]["checkpoint"] = None
    raw["base_model"]["timm_kwargs"]["depth"] = 4  # not a multiple of 3: the adapter cannot fit
    raw["bootstrap"] = {"enabled": True, "run": {"epochs": 1, "batch_size": 4}}
    msg = config_error(parse_config, raw)
    assert msg.startswith("bootstrap.run.model") and "depth" in msg
    raw["bootstrap"]["run"]["model"] = {"use_encoder_adapter": False}
    cfg = parse_config(raw)
    assert cfg.bootstrap.run.model.target == "pixel"
    assert cfg.bootstrap.run.name == "bootstrap"


def test_run_named_lists_the_runs():
    cfg = parse_config(minimal_pipeline())
    msg = config_error(cfg.run_named, "nosuch")
    assert "'nosuch'" in msg and "tec, feature_only" in msg


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  views: [1, 2\n")
    msg = config_error(load_config, bad)
    assert "bad.yaml" in msg and "line" in msg and "not valid YAML" in msg
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    assert "top level must be a mapping" in config_error(load_config, scalar)


def test_load_config_applies_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(minimal_pipeline(tmp_path)))
    cfg = load_config(path, ["targets.views=5", "runs.tec.epochs=3"])
    assert cfg.targets.views == 5 and cfg.run_named("tec").epochs == 3
    assert cfg.source_file == str(path)


# ----------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.runs, "every shipped config trains at least one run"
    assert cfg.targets.cache and cfg.targets.views >= 1
    from stages.resolve import build_model_config

    for run in cfg.runs:
        m = build_model_config(run.model)
        if m.target == "tec" and m.use_attention:
            assert m.k <= cfg.targets.k_max
    # the view size matches the base model's input size (stage 1 refuses otherwise)
    img = cfg.base_model.timm_kwargs.get("img_size", 224)
    assert cfg.targets.view_policy.output_size == img


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_paper_settings_in_imagenet_configs(path):
    cfg = load_config(path)
    run = cfg.runs[0]
    paper = {"mae_vitb": (15, 1.8), "ibot_vitb": (9, 1.0), "mae_vitl": (15, 1.4)}
    key = next(k for k in paper if k in path.stem)
    assert (run.model.k, run.model.tau) == paper[key]
    assert ((run.blr, run.batch_size, run.weight_decay, run.betas)
            == (1.5e-4, 4096, 0.05, (0.9, 0.95)))
    assert cfg.targets.last_n == 2 and cfg.targets.view_policy.scale == (0.2, 1.0)
    assert cfg.data.num_samples == 1281167
