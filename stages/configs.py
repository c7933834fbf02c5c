"""Typed configuration helpers shared by the stages.

Every stage owns a dataclass for its section of ``pipeline.yaml``. ``from_dict`` builds one from
plain YAML data and rejects unknown keys and values of the wrong type or outside a ``Literal``'s
allowed set with a one-line :class:`ConfigError` that names the dotted key, so a typo never turns
into a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid (message names the key)."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp) or (tp if tp in (list, tuple, dict) else None)  # bare list/dict too
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r:.60}")
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    where = f"{prefix}." if prefix else ""
    refused = sorted(set(data) & set(getattr(cls, "refused_keys", {})))
    if refused:  # keys that belong elsewhere: {key: why} on the class
        raise ConfigError(f"{where}{refused[0]}: {cls.refused_keys[refused[0]]}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in data:  # in the order given (a config that remembers its keys keeps it)
        if name in names:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init and f.name not in kwargs
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"missing required key {where}{missing[0] if missing else '?'}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(_qualify(str(exc), prefix)) from None
    return obj


_KEY_AT_START = re.compile(r"^[A-Za-z_][\w.\[\]]*[:=]")


def _qualify(message: str, prefix: str) -> str:
    """Make a validate() message name the full dotted key: ``views: ...`` -> ``targets.views: ...``.

    Messages may start with the bare field (``views: ...``), with the section's own name
    (``source.path ...`` under prefix ``targets.source``), with the full key already, or with
    ``unknown key X`` / ``missing required key X``.
    """
    if not prefix:
        return message
    for lead in ("unknown key ", "missing required key "):
        if message.startswith(lead):
            rest = message[len(lead):]
            if rest.startswith(prefix + "."):
                return message
            return f"{lead}{prefix}.{rest}"
    if message.startswith((prefix + ".", prefix + ":", prefix + " ")):
        return message
    last = prefix.rsplit(".", 1)[-1]
    if message.startswith(last + "."):
        return prefix + message[len(last):]
    if _KEY_AT_START.match(message):
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-able) form of a config dataclass (of one that remembers the keys it was
    given, ``given_keys``, only those)."""
    if dataclasses.is_dataclass(obj) and hasattr(obj, "given_keys"):
        return {k: to_dict(getattr(obj, k)) for k in obj.given_keys}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class EvalConfig:
    """Evaluation settings (the pipeline file's ``eval`` section and the ``tec eval`` commands):
    the one place their defaults live; :mod:`stages.evaluate` takes it whole."""

    enabled: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 50
    linear_lr: float = 1e-2
    batch_size: int = 256
    train_limit: int | None = None
    test_limit: int | None = None
    viz_images: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    finetune: object = None  # stages.finetune.FinetuneConfig (built by parse_config)

    def validate(self) -> None:
        if self.knn_k < 1:
            raise ConfigError(f"eval.knn_k: must be >= 1, got {self.knn_k}")
        if self.knn_temperature <= 0:
            raise ConfigError(f"eval.knn_temperature: must be > 0, got {self.knn_temperature}")
        if self.linear_epochs < 1:
            raise ConfigError(f"eval.linear_epochs: must be >= 1, got {self.linear_epochs}")


@dataclass
class BaseModelConfig:
    """The frozen base model whose targets the new model learns (stage 1 and online fallback).

    ``arch`` is a timm name; ``timm_kwargs`` override its shape (img_size, patch_size, embed_dim,
    depth, num_heads). ``checkpoint`` may be an MAE, DINO/iBOT, timm or TEC-export file.
    ``pretrained: true`` instead loads the weights ``arch`` names through timm / huggingface_hub:
    a timm pretrained tag (``vit_base_patch16_224.mae``) or ``hf-hub:OWNER/NAME``
    (:func:`tec.teacher.resolve_pretrained`); the fingerprint then records the tag and the
    resolved file's sha256. ``sha256`` pins the weights file: any other is refused (stage 1
    sets it for its actors, which resolve the weights on their own nodes).
    """

    arch: str = "vit_base_patch16_224"
    checkpoint: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    allow_pickle: bool = False
    pretrained: bool = False
    sha256: str | None = None

    def validate(self) -> None:
        img = self.timm_kwargs.get("img_size")
        patch = self.timm_kwargs.get("patch_size")
        if isinstance(img, int) and isinstance(patch, int) and img % patch:
            raise ConfigError(
                f"base_model.timm_kwargs: patch_size {patch} does not divide img_size {img}"
            )
        if self.pretrained:
            if self.checkpoint is not None:
                raise ConfigError("base_model.pretrained: true loads the weights base_model.arch "
                                  "names; remove base_model.checkpoint or set pretrained: false")
            from tec.teacher import CheckpointError, check_pretrained_name

            try:  # timm's registry only: no network
                check_pretrained_name(self.arch)
            except CheckpointError as e:
                raise ConfigError(f"base_model.arch: {e}") from None
        elif self.arch.startswith("hf-hub:"):
            raise ConfigError(f"base_model.arch: {self.arch} names Hub weights; set "
                              "base_model.pretrained: true")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise ConfigError(f"base_model.sha256: {self.sha256!r} is not a sha256 (64 lower-case "
                              "hex digits)")

    def pretrained_weights(self):
        """The resolved :class:`tec.teacher.PretrainedWeights` (``pretrained: true``), else None."""
        if not self.pretrained:
            return None
        from tec.teacher import resolve_pretrained

        return resolve_pretrained(self.arch)

    def checkpoint_file(self) -> str | None:
        """The local file the weights come from: ``checkpoint`` or the resolved pretrained file."""
        weights = self.pretrained_weights()
        return str(weights.file) if weights is not None else self.checkpoint

    def as_checkpoint(self) -> BaseModelConfig:
        """The same base model as a plain checkpoint config (the resolved file, its timm arch and
        geometry), for code that loads files by (arch, timm_kwargs); ``self`` when not pretrained.
        """
        weights = self.pretrained_weights()
        if weights is None:
            return self
        return dataclasses.replace(self, arch=weights.arch, checkpoint=str(weights.file),
                                   timm_kwargs={**weights.model_kwargs, **self.timm_kwargs},
                                   pretrained=False)

    def load(self, *, file_sha256: str | None = None):
        """The frozen timm ViT, in eval mode. file_sha256: the weights file's sha256 when the
        caller already computed it (checked against ``sha256`` without hashing the file again).
        ``stages.resolve.resolve_base`` loads and describes it once per command."""
        from tec.teacher import load_base_model

        weights = self.pretrained_weights()
        if weights is not None:
            self._check_sha256(weights.file, file_sha256)
            return load_base_model(weights.arch, weights.file, allow_pickle=self.allow_pickle,
                                   plain_kwargs=weights.model_kwargs, **self.timm_kwargs)
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(
                f"base_model.checkpoint: file not found: {self.checkpoint}"
            )
        if self.checkpoint is not None:
            self._check_sha256(self.checkpoint, file_sha256)
        return load_base_model(
            self.arch, self.checkpoint, allow_pickle=self.allow_pickle, **self.timm_kwargs
        )

    def _check_sha256(self, path, actual: str | None = None) -> None:
        """Refuse weights other than the pinned ``sha256`` (e.g. another node's cached copy);
        ``actual``: the file's sha256 if already known."""
        from tec.teacher import CheckpointError, file_sha256

        if self.sha256 is None:
            return
        if (actual := actual or file_sha256(path)) != self.sha256:
            raise CheckpointError(
                f"base model {self.arch}: {path} has sha256 {actual[:12]}..., not the pinned "
                f"{self.sha256[:12]}... (base_model.sha256); this machine holds other weights "
                "under that name: give it the same file / Hugging Face cache")

    def fingerprint(self, model, *, last_n: int, k_max: int) -> dict:
        """The base-model fingerprint recorded in (and checked against) a target cache, of
        ``model`` loaded from this config (:meth:`stages.resolve.ResolvedBase.fingerprint`)."""
        from stages.resolve import describe_base

        return describe_base(self, model).fingerprint(last_n=last_n, k_max=k_max)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (same on every machine and process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
