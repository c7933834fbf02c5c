"""stages/resolve.py: the base model described once per command, and the one check of a run
against the base model and the target cache (config parsing, stage 1, training)."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from config_helpers import minimal_pipeline
from train_helpers import (
    BASE_KWARGS,
    STUDENT,
    Source,
    build_cache,
    make_data,
    run_config,
    save_base_model,
)

import tec.teacher
from stages.configs import ConfigError, from_dict, to_dict
from stages.resolve import (
    BaseGeometry,
    ResolvedBase,
    Targets,
    build_model_config,
    check_run_against,
    resolve_base,
)
from stages.train import CacheMismatchError, ModelConfig


@pytest.fixture
def counted(monkeypatch):
    """Calls of tec.teacher.load_base_model and file_sha256 per path (the base checkpoint's)."""
    calls = {"load": [], "sha": []}
    load, sha = tec.teacher.load_base_model, tec.teacher.file_sha256

    def counting_load(arch, checkpoint=None, **kwargs):
        calls["load"].append(str(checkpoint))
        return load(arch, checkpoint, **kwargs)

    def counting_sha(path, *args, **kwargs):
        calls["sha"].append(str(path))
        return sha(path, *args, **kwargs)

    monkeypatch.setattr(tec.teacher, "load_base_model", counting_load)
    monkeypatch.setattr(tec.teacher, "file_sha256", counting_sha)
    return calls


# ------------------------------------------------------------------------------ the base model
def test_resolve_base_loads_and_hashes_once_and_describes_the_model(tmp_path, counted):
    base = save_base_model(tmp_path / "base.safetensors")
    resolved = resolve_base(base)
    path = str(tmp_path / "base.safetensors")
    assert counted["load"] == [path] and counted["sha"] == [path]
    assert resolved.geometry == BaseGeometry(**BASE_KWARGS)
    assert resolved.geometry.num_patches == 16
    assert resolved.geometry.as_dict() == tec.teacher.describe_vit(resolved.model)
    sha = tec.teacher.file_sha256(path)
    assert resolved.checkpoint_sha256 == sha and resolved.config.sha256 == sha  # pinned
    assert resolved.config.checkpoint == base.checkpoint and not resolved.is_export
    fingerprint = resolved.fingerprint(last_n=2, k_max=6)
    assert fingerprint == {"arch": base.arch, "checkpoint_sha256": sha, **BASE_KWARGS,
                           "last_n": 2, "k_max": 6}
    assert base.fingerprint(resolved.model, last_n=2, k_max=6) == fingerprint
    assert resolved.identity() == {"arch": base.arch, "timm_kwargs": BASE_KWARGS,
                                   "checkpoint_sha256": sha}


def test_a_pinned_sha256_is_checked_against_the_one_hash(tmp_path, counted):
    base = save_base_model(tmp_path / "base.safetensors")
    pinned = dataclasses.replace(base, sha256="0" * 64)
    with pytest.raises(tec.teacher.CheckpointError, match="base_model.sha256"):
        resolve_base(pinned)
    assert len(counted["sha"]) == 1 and counted["load"] == []


def test_training_with_a_resolved_base_neither_loads_nor_hashes_it(tmp_path, counted):
    shards = make_data(tmp_path, n_shards=1, per_shard=8)
    base = save_base_model(tmp_path / "base.safetensors")
    cache = build_cache(tmp_path / "cache", shards, base)
    resolved = resolve_base(base)
    before = {k: v.clone() for k, v in resolved.model.state_dict().items()}
    counted["load"].clear(), counted["sha"].clear()
    from stages.train import train

    summary = train(run_config(epochs=1, online_fraction=0.5), cache=cache,
                    source=Source(str(tmp_path / "shards")), base=resolved,
                    out_dir=tmp_path / "run", progress=False)
    assert summary.online_samples > 0 and summary.cached_samples > 0
    assert counted["load"] == [] and base.checkpoint not in counted["sha"]
    # the run trained with its own copy: the described model is unchanged, on the CPU
    after = resolved.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(resolved.model.parameters()).device.type == "cpu"


def test_tec_run_describes_the_base_model_once_for_every_step(tmp_path, monkeypatch):
    import pipeline.orchestrate as orchestrate
    import stages.resolve
    import stages.stage1
    from pipeline.config import parse_config

    base = save_base_model(tmp_path / "base.safetensors")
    raw = minimal_pipeline(tmp_path)
    raw["base_model"].update(checkpoint=base.checkpoint, timm_kwargs=dict(BASE_KWARGS))
    raw["data"]["test"] = str(tmp_path / "test.tar")
    raw["eval"] = {"enabled": True}
    cfg = parse_config(raw)
    resolved, seen = [], []
    real = stages.resolve.resolve_base
    monkeypatch.setattr(stages.resolve, "resolve_base",
                        lambda b: resolved.append(real(b)) or resolved[-1])
    monkeypatch.setattr(stages.stage1, "check_storage", lambda targets: None)
    monkeypatch.setattr(stages.stage1, "run_stage1", lambda targets, b, **kw: seen.append(
        ("targets", b)) or SimpleNamespace(parts_done=0, parts_skipped=2))
    monkeypatch.setattr(orchestrate, "_set_aside_if_stale",
                        lambda d, run, cache, base, **use: seen.append(
                            (f"stale {run.name}", base)) or "")
    monkeypatch.setattr(orchestrate, "train_run", lambda c, run, b: seen.append(
        (f"train {run.name}", b)) or SimpleNamespace(resumed_from_step=3, steps=3))
    monkeypatch.setattr(orchestrate, "_evaluate", lambda c, b, summary: seen.append(("eval", b)))
    orchestrate.run_pipeline(cfg, only={"targets", "train", "eval"})
    assert len(resolved) == 1 and isinstance(resolved[0], ResolvedBase)
    assert [step for step, _ in seen] == ["targets", "stale tec", "train tec",
                                         "stale feature_only", "train feature_only", "eval"]
    assert all(b is resolved[0] for _, b in seen)


# ------------------------------------------------------------------------------ the one check
CACHE = Targets(view_size=32, k_max=6, num_patches=16, channels=48, heads=3, cache="/c")
PLANNED = Targets(view_size=32, k_max=8, last_n=2)
GEOMETRY = BaseGeometry(**BASE_KWARGS)


def _model(**given) -> ModelConfig:
    return from_dict(ModelConfig, {"embed_dim": 48, "depth": 3, "num_heads": 3, **given}, "model")


@pytest.mark.parametrize("targets,key,sep,expected", [
    (CACHE, "model", " ", "model.k 9 exceeds the cache's k_max 6 (attention rows stored by "
     "stage 1); use k <= 6 or rebuild the cache with a larger k_max"),
    (Targets(k_max=8), "runs[0].model", ": ", "runs[0].model.k: 9 exceeds targets.k_max 8 "
     "(attention rows stored by stage 1); use k <= 8 or raise targets.k_max"),
])
def test_k_above_k_max_names_where_k_max_comes_from(targets, key, sep, expected):
    with pytest.raises(CacheMismatchError) as info:
        check_run_against(GEOMETRY, targets, _model(k=9), key=key, sep=sep,
                          error=CacheMismatchError)
    assert str(info.value) == expected
    # without attention or with the pixel target the run does not read attention rows
    check_run_against(GEOMETRY, targets, _model(k=9, use_attention=False), key=key, sep=sep)
    check_run_against(GEOMETRY, targets, _model(k=9, target="pixel"), key=key, sep=sep)


@pytest.mark.parametrize("base,targets,expected", [
    (dataclasses.replace(GEOMETRY, img_size=48), PLANNED,
     "targets.view_policy.output_size 32 differs from the base model's img_size 48; set "
     "targets.view_policy.output_size: 48"),
    (dataclasses.replace(GEOMETRY, img_size=48), Targets(view_size=32, key=""),
     "view_policy.output_size 32 differs from the base model's img_size 48; set "
     "view_policy.output_size: 48"),
    (dataclasses.replace(GEOMETRY, img_size=48), CACHE,
     "cache /c: view size 32 differs from the base model's img_size 48; the cache is "
     "inconsistent, rebuild it"),
    (GEOMETRY, dataclasses.replace(PLANNED, k_max=17),
     "targets.k_max 17 exceeds the base model's 16 patches; lower targets.k_max"),
    (GEOMETRY, dataclasses.replace(PLANNED, last_n=4),
     "targets.last_n 4 exceeds the base model's depth 2; lower targets.last_n"),
])
def test_the_targets_must_fit_the_base_model(base, targets, expected):
    with pytest.raises(CacheMismatchError) as info:
        check_run_against(base, targets, error=CacheMismatchError)
    assert str(info.value) == expected


def test_the_model_must_fit_the_cache_and_the_base_model():
    new = check_run_against(GEOMETRY, CACHE, _model(k=4))
    assert (new.img_size, new.patch_size, new.base_embed_dim, new.base_num_heads) == (32, 8, 48, 3)
    with pytest.raises(ConfigError, match=r"^model.patch_size 4 differs from the base model's "
                                          r"patch size 8 \(the targets have one row per"):
        check_run_against(GEOMETRY, None, _model(patch_size=4))
    other = dataclasses.replace(GEOMETRY, embed_dim=64, num_heads=4)
    with pytest.raises(ConfigError, match=r"the base model \(width 64, 4 heads\) does not match "
                                          r"the cache \(width 48, 3 heads\)"):
        check_run_against(other, CACHE, _model(k=4))
    with pytest.raises(ConfigError, match="cache /c has 16 patches per view, the model 4"):
        check_run_against(dataclasses.replace(GEOMETRY, img_size=16, patch_size=8),
                          dataclasses.replace(CACHE, view_size=16), _model(k=4))


def test_unknown_geometry_checks_only_the_runs_own_settings():
    new = check_run_against(None, None, _model(k=200))  # no cache, no base model known yet
    assert new.k == 200 and new.patch_size == 16
    with pytest.raises(ConfigError, match=r"^runs\[1\].model.depth=4: must be a multiple of "
                                          r"adapter_group=3"):
        check_run_against(None, None, ModelConfig(depth=4), key="runs[1].model")
    # an estimate builds the model from the geometry alone, without cross-checks
    assert build_model_config(_model(patch_size=4), GEOMETRY).patch_size == 4


# ------------------------------------------------------------------------------ ModelConfig
def test_model_config_remembers_the_keys_it_was_given():
    model = _model(k=4, tau=1)
    assert model.given_keys == ("embed_dim", "depth", "num_heads", "k", "tau")
    assert to_dict(model) == {"embed_dim": 48, "depth": 3, "num_heads": 3, "k": 4, "tau": 1.0}
    assert (model.decoder_embed_dim, model.patch_size, model.target) == (512, None, "tec")
    assert to_dict(run_config(model={"k": 4}))["model"] == {**STUDENT, "k": 4}
    grown = model.with_defaults(patch_size=8, k=9)
    assert (grown.patch_size, grown.k) == (8, 4) and "patch_size" in grown.given_keys
    with pytest.raises(ConfigError, match=r"^runs\[0\].model.img_size: comes from the target "
                                          r"cache / base model"):
        from_dict(ModelConfig, {"img_size": 64}, "runs[0].model")
    with pytest.raises(ConfigError, match=r"^runs\[0\].model.tau: must be > 0"):
        from_dict(ModelConfig, {"tau": 0}, "runs[0].model")


def test_a_train_config_built_in_code_takes_the_model_mapping():
    from stages.train import TrainConfig

    run = TrainConfig(name="r", epochs=1, batch_size=4, model={"k": 4})
    assert isinstance(run.model, ModelConfig) and run.model.k == 4
    assert to_dict(run)["model"] == {"k": 4}
    with pytest.raises(ConfigError, match="unknown key model.widht"):
        TrainConfig(name="r", epochs=1, batch_size=4, model={"widht": 4})


def test_the_run_identity_records_the_given_model_keys():
    """As when the model settings were a plain mapping: checkpoints written before compare equal,
    and giving a default explicitly is a change."""
    from stages.identity import identity_changes, run_identity

    given = {**STUDENT, "k": 4, "tau": 1.0}
    new = run_identity(run_config(model={"k": 4, "tau": 1.0}), cache=None, needs_targets=False)
    assert new["run"]["model"] == given
    old = {**new, "run": {**new["run"], "model": dict(given)}}
    assert identity_changes(old, new) == []
    explicit = run_identity(run_config(model={"k": 4, "tau": 1.0, "mask_ratio": 0.75}),
                            cache=None, needs_targets=False)
    assert identity_changes(old, explicit) == ["model.mask_ratio null -> 0.75"]
