"""``pipeline.yaml``: the schema assembled from the stages' typed configs.

A pipeline file has these sections (see the root ``pipeline.yaml`` for a commented example)::

    workdir:    where caches, runs, exports and reports go
    data:       the image shards (train, and test for evaluation), optionally prepared
    base_model: the frozen base model (timm arch + checkpoint, or a pretrained tag / hf-hub:
                repo with pretrained: true)
    bootstrap:  optional: train a pixel-target MAE base model first when there is no checkpoint
    targets:    stage 1 (the target cache)
    runs:       stage 2, one entry per new model trained from the same cache
    eval:       k-NN / linear probe / attention pictures

Every key is checked: unknown keys and bad values are one-line errors naming the dotted key.
``--set a.b=c`` overrides any value (``runs.NAME.epochs=2`` addresses a run by name).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from stages.configs import BaseModelConfig, ConfigError, EvalConfig, from_dict, to_dict

if TYPE_CHECKING:  # imported when parsing (stage 1 and training pull in Ray and torch)
    from stages.stage1 import Stage1Config
    from stages.train import TrainConfig

__all__ = ["PipelineConfig", "DataConfig", "BootstrapConfig", "EvalConfig", "load_config",
           "apply_overrides", "bootstrap_run", "ConfigError"]


@dataclass
class DataConfig:
    """Image shards. ``prepare: fashion-mnist`` builds them from the Debian IDX files if missing."""

    train: str = ""
    test: str | None = None
    kind: Literal["webdataset", "imagefolder"] = "webdataset"
    prepare: Literal["none", "fashion-mnist"] = "none"
    prepare_dir: str | None = None
    idx_dir: str = "/usr/share/datasets/fashion-mnist"
    shard_size: int = 1000
    train_limit: int | None = None
    num_samples: int | None = None  # known training-set size (lets `tec plan` skip counting)

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train: give the training shards (a pattern or folder)")
        if self.shard_size < 1:
            raise ConfigError(f"data.shard_size: must be >= 1, got {self.shard_size}")


@dataclass
class BootstrapConfig:
    """Train a base model with the pixel target (MAE) when ``base_model.checkpoint`` is missing.

    run: the bootstrap's run (:func:`bootstrap_run`: ``bootstrap.run`` named ``bootstrap``, with
    the pixel target and the base model's geometry); None while the bootstrap is disabled.
    """

    enabled: bool = False
    run: TrainConfig | None = None


@dataclass
class _BootstrapSection:
    """The ``bootstrap`` mapping as the file gives it (``run`` is checked only when enabled)."""

    enabled: bool = False
    run: dict | None = None


def bootstrap_run(run: dict | None, base: BaseModelConfig) -> TrainConfig:
    """The bootstrap's TrainConfig from the ``bootstrap.run`` mapping: named ``bootstrap`` unless
    named, the pixel target, and the base model's geometry (patch_size, embed_dim, depth,
    num_heads from ``base_model.timm_kwargs``) where the mapping does not set it; the bootstrap
    model *is* the base model."""
    from stages.train import TrainConfig

    boot = dict(run or {})
    boot.setdefault("name", "bootstrap")
    model = boot.get("model") or {}
    if isinstance(model, dict):
        if model.get("target", "pixel") != "pixel":
            raise ConfigError("bootstrap.run.model.target: the bootstrap base model uses 'pixel'")
        model = {**model, "target": "pixel"}
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if key in base.timm_kwargs:
                model.setdefault(key, base.timm_kwargs[key])
    return from_dict(TrainConfig, {**boot, "model": model}, "bootstrap.run")


@dataclass
class PipelineConfig:
    workdir: str
    data: DataConfig
    base_model: BaseModelConfig
    targets: Stage1Config
    runs: list[TrainConfig]
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source_file: str | None = None

    @property
    def cache_path(self) -> Path:
        """The cache folder (a Path), or its object-store location (storage.objstore.Url)."""
        from storage.objstore import as_root

        return as_root(self.targets.cache)

    def run_dir(self, name: str) -> Path:
        return Path(self.workdir) / "runs" / name

    def run_named(self, name: str):
        for run in self.runs:
            if run.name == name:
                return run
        names = ", ".join(r.name for r in self.runs) or "none"
        raise ConfigError(f"runs: no run named {name!r}; runs in this config: {names}")

    def to_dict(self) -> dict:
        return to_dict(self)


_TOP_KEYS = {"workdir", "data", "base_model", "bootstrap", "targets", "runs", "eval"}


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to the raw config mapping.

    A list is indexed by position (``runs.0.epochs``) or by an entry's ``name``
    (``runs.tec.epochs``).
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. targets.views=4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment")
        node = raw
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            if not isinstance(node, (dict, list)):
                parent = ".".join(parts[:depth])
                raise ConfigError(f"--set {key}: {parent} is {node!r}, not a mapping or list")
            if isinstance(node, list):
                index = _list_index(node, part, where)
            else:
                index = part
                if depth < len(parts) - 1 and node.get(part) is None:
                    node[part] = {}
            if depth == len(parts) - 1:
                node[index] = _parse_value(text)
            else:
                node = node[index]
    return raw


def _list_index(node: list, part: str, where: str) -> int:
    if part.isdigit():
        if int(part) >= len(node):
            raise ConfigError(f"--set {where}: index out of range (list has {len(node)} entries)")
        return int(part)
    names = [entry.get("name") for entry in node if isinstance(entry, dict)]
    if part in names:
        return next(i for i, e in enumerate(node) if isinstance(e, dict) and e.get("name") == part)
    known = ", ".join(str(n) for n in names if n is not None) or "none"
    raise ConfigError(f"--set {where}: no entry named {part!r} (names: {known}; or use an index "
                      f"0..{len(node) - 1})")


def parse_config(raw: dict, *, source_file: str | None = None) -> PipelineConfig:
    """Validate a raw mapping into a :class:`PipelineConfig` (one-line ConfigError on problems)."""
    from stages.resolve import BaseGeometry, Targets, check_run_against
    from stages.stage1 import Stage1Config
    from stages.train import TrainConfig

    if not isinstance(raw, dict):
        raise ConfigError(f"{source_file or 'config'}: the top level must be a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]}; allowed top-level keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    for required in ("data", "base_model", "targets"):
        if raw.get(required) is None:
            raise ConfigError(f"missing required section {required}")
    workdir = raw.get("workdir", "runs/default")
    if not isinstance(workdir, str):
        raise ConfigError(f"workdir: expected a path string, got {workdir!r}")
    data = from_dict(DataConfig, raw["data"], "data")
    base = from_dict(BaseModelConfig, raw["base_model"], "base_model")
    section = from_dict(_BootstrapSection, raw.get("bootstrap"), "bootstrap")
    if not isinstance(raw["targets"], dict):
        raise ConfigError(f"targets: expected a mapping of keys, got {raw['targets']!r:.60}")
    targets_raw = dict(raw["targets"])
    targets_raw.setdefault("source", {"kind": data.kind, "path": data.train,
                                      "shard_size": data.shard_size})
    targets_raw.setdefault("cache", str(Path(workdir) / "cache"))
    targets = from_dict(Stage1Config, targets_raw, "targets")
    runs_raw = raw.get("runs") or []
    if not isinstance(runs_raw, list):
        raise ConfigError("runs: expected a list of training runs")
    runs = [from_dict(TrainConfig, r, f"runs[{i}]") for i, r in enumerate(runs_raw)]
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"runs: duplicate run name {sorted(dup)[0]!r}")
    # what is known of the base model before it is loaded: the patch size its timm_kwargs declare
    declared = BaseGeometry(patch_size=base.timm_kwargs.get("patch_size"))
    planned = Targets(k_max=targets.k_max)
    for i, run in enumerate(runs):
        check_run_against(declared, planned, run.model, key=f"runs[{i}].model", sep=": ")
    bootstrap = BootstrapConfig(enabled=section.enabled, run=bootstrap_run(section.run, base)
                                if section.enabled else None)
    evaluation = from_dict(EvalConfig, raw.get("eval"), "eval")
    from stages.finetune import FinetuneConfig

    evaluation.finetune = from_dict(FinetuneConfig, evaluation.finetune, "eval.finetune")
    return PipelineConfig(
        workdir=workdir, data=data, base_model=base, targets=targets, runs=runs,
        bootstrap=bootstrap, eval=evaluation, source_file=source_file,
    )


def check_duplicate_keys(text: str, where: str = "config") -> None:
    """Refuse a YAML document in which a mapping gives the same key twice.

    PyYAML keeps the last value and silently drops the first (a second ``targets:`` block
    replaces the first). The error names the dotted key and both lines.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, value_node in node.value:
                if (isinstance(key_node, yaml.ScalarNode)
                        and key_node.tag != "tag:yaml.org,2002:merge"):
                    key = key_node.value
                    dotted = f"{path}.{key}" if path else str(key)
                    if key in seen:
                        raise ConfigError(
                            f"{where}: key {dotted} is given twice (lines {seen[key]} and "
                            f"{key_node.start_mark.line + 1}); the first would be silently "
                            "dropped - keep one")
                    seen[key] = key_node.start_mark.line + 1
                else:
                    dotted = path
                walk(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}.{i}" if path else str(i))

    if root is not None:
        walk(root, "")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give a YAML pipeline file") from None
    try:
        check_duplicate_keys(text, str(path))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(  # noqa: B904 (the YAML error stays the context, as before)
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})")
    raw = apply_overrides(raw or {}, overrides)
    return parse_config(raw, source_file=str(path))
