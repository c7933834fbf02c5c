"""One place that resolves a run: the base model's description and the check of a run against it.

* :func:`resolve_base` loads the base model once per command and describes it
  (:class:`ResolvedBase`: geometry, checkpoint sha256, the loaded model). Stage 1, every stage-2
  run and evaluation take that description instead of loading and hashing the checkpoint again;
  :meth:`ResolvedBase.fingerprint` is the record a target cache keeps of it.
* :class:`BaseGeometry` is what is known of the base model's shape: all of it once loaded, what
  ``base_model.timm_kwargs`` declare while parsing a config, what a cache recorded.
* :class:`Targets` is what the target cache holds (a built cache) or will hold (the stage-1
  settings).
* :func:`check_run_against` is the one check of a run's model settings against the base model
  and the targets (config parsing, stage 1, training); it builds the run's
  :class:`tec.model.NewModelConfig` with :func:`build_model_config` (the only place that does).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.configs import BaseModelConfig, ConfigError

if TYPE_CHECKING:
    from stages.train.config import ModelConfig

__all__ = ["BaseGeometry", "ResolvedBase", "Targets", "as_resolved", "build_model_config",
           "check_run_against", "describe_base", "resolve_base"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseGeometry:
    """The base model's shape, as far as it is known (None: not known here)."""

    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    @property
    def num_patches(self) -> int | None:
        if self.img_size is None or self.patch_size is None:
            return None
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def of_model(cls, model) -> BaseGeometry:
        """The geometry of a loaded timm ViT."""
        from tec.teacher import describe_vit

        info = describe_vit(model)
        return cls(img_size=info["img_size"], patch_size=info["patch_size"],
                   embed_dim=info["embed_dim"], depth=info["depth"], num_heads=info["num_heads"])

    @classmethod
    def recorded(cls, manifest_base: dict, spec, view_size: int) -> BaseGeometry:
        """The geometry a cache recorded of the base model it was built with (its manifest's
        ``base_model`` and spec; img_size defaults to the view size, patch_size to 16)."""
        depth = manifest_base.get("depth")
        return cls(img_size=int(manifest_base.get("img_size", view_size)),
                   patch_size=int(manifest_base.get("patch_size", 16)),
                   embed_dim=int(spec.channels), num_heads=int(spec.heads),
                   depth=int(depth) if depth is not None else None)

    def as_dict(self) -> dict:
        """``tec.teacher.describe_vit``'s form (with num_patches)."""
        return {**dataclasses.asdict(self), "num_patches": self.num_patches}


@dataclass(frozen=True)
class ResolvedBase:
    """The base model of a command, loaded and described once.

    config: the configuration, with ``sha256`` pinned to the file read (processes that load it
    again, such as stage 1's actors, load exactly these weights or refuse). model: the frozen
    timm ViT on the CPU, in eval mode (callers that move it to a device take a copy).
    """

    config: BaseModelConfig
    geometry: BaseGeometry
    checkpoint_sha256: str | None = None
    checkpoint_file: str | None = None  # the local file read (None: randomly initialised)
    pretrained: str | None = None  # the pretrained name the weights were resolved from
    is_export: bool = False  # the file is one of our timm-loadable exports (it has its geometry)
    model: Any = field(default=None, compare=False, repr=False)

    def fingerprint(self, *, last_n: int, k_max: int) -> dict:
        """The base-model fingerprint recorded in (and checked against) a target cache."""
        g = self.geometry
        return {
            "arch": self.config.arch,
            **({"pretrained": self.pretrained} if self.pretrained is not None else {}),
            "checkpoint_sha256": self.checkpoint_sha256,
            "img_size": g.img_size,
            "patch_size": g.patch_size,
            "embed_dim": g.embed_dim,
            "num_heads": g.num_heads,
            "depth": g.depth,
            "last_n": last_n,
            "k_max": k_max,
        }

    def identity(self) -> dict | None:
        """What a run's checkpoint records of the base model when no cache records it (None for
        a randomly initialised one)."""
        if self.checkpoint_file is None:
            return None
        return {"arch": self.config.arch, "timm_kwargs": dict(self.config.timm_kwargs),
                "checkpoint_sha256": self.checkpoint_sha256}

    def loads_as_file(self) -> bool:
        """Whether loading the checkpoint file by (arch, plain timm_kwargs), as evaluation loads
        model files, gives this same model: always, except for one of our exports whose
        configured timm_kwargs override the geometry it carries."""
        return not (self.is_export and self.config.timm_kwargs)


def describe_base(base: BaseModelConfig, model, *, checkpoint_sha256: str | None = None
                  ) -> ResolvedBase:
    """A :class:`ResolvedBase` of an already loaded ``model`` of ``base`` (hashes its checkpoint
    file unless ``checkpoint_sha256`` is given)."""
    from tec.teacher import file_sha256

    weights = base.pretrained_weights()
    file = str(weights.file) if weights is not None else base.checkpoint
    if file and checkpoint_sha256 is None:
        checkpoint_sha256 = file_sha256(file)
    config = dataclasses.replace(base, sha256=checkpoint_sha256) if checkpoint_sha256 else base
    return ResolvedBase(config=config, geometry=BaseGeometry.of_model(model),
                        checkpoint_sha256=checkpoint_sha256 if file else None,
                        checkpoint_file=file or None,
                        pretrained=weights.name if weights is not None else None,
                        is_export=_is_export(file) if file else False, model=model)


def resolve_base(base: BaseModelConfig) -> ResolvedBase:
    """Load and describe the base model (once per command): the checkpoint file is hashed once,
    checked against a pinned ``base_model.sha256`` and loaded."""
    from tec.teacher import file_sha256

    file = base.checkpoint_file()  # a pretrained name resolves to its local file here
    sha = file_sha256(file) if file and _is_file(file) else None
    model = base.load(file_sha256=sha)
    return describe_base(base, model, checkpoint_sha256=sha)


def as_resolved(base: BaseModelConfig | ResolvedBase | None) -> ResolvedBase | None:
    """``base`` resolved (a ResolvedBase is passed through; None stays None)."""
    if base is None or isinstance(base, ResolvedBase):
        return base
    return resolve_base(base)


def _is_file(path) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def _is_export(path) -> bool:
    """Whether ``path`` is one of our exports (safetensors metadata ``format``; header only)."""
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    from tec.teacher import TEC_EXPORT_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == TEC_EXPORT_FORMAT
    except Exception:  # unreadable here: loading it succeeded, so treat it as a plain file
        return False


@dataclass(frozen=True)
class Targets:
    """What the target cache holds or will hold.

    A built cache (``cache`` set): its view size, k_max, patches per view and the base model's
    width C and heads H it stores. Planned targets (``cache`` None: the stage-1 settings under
    the dotted ``key``, e.g. ``targets``, or a run's own view policy with key ""): what is
    configured of view size, k_max and last_n; those must fit the base model.
    """

    view_size: int | None = None
    k_max: int | None = None
    last_n: int | None = None
    num_patches: int | None = None
    channels: int | None = None
    heads: int | None = None
    cache: str | None = None
    key: str = "targets"

    @classmethod
    def of_cache(cls, reader, cache: str) -> Targets:
        """A built cache (an open storage.CacheReader) at ``cache``."""
        spec = reader.spec
        return cls(view_size=int(reader.manifest["view_policy"]["output_size"]),
                   k_max=int(spec.k_max), num_patches=int(spec.num_patches),
                   channels=int(spec.channels), heads=int(spec.heads), cache=str(cache))

    @classmethod
    def of_stage1(cls, cfg, key: str = "targets") -> Targets:
        """The stage-1 settings (a Stage1Config) the cache is to be built with."""
        return cls(view_size=int(cfg.view_policy.output_size), k_max=int(cfg.k_max),
                   last_n=int(cfg.last_n), key=key)

    def _dotted(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name


# A geometry no setting of the run can conflict with, for checking the run's own settings before
# the base model and cache are known (config parsing): patch x 64 px images, one base head.
_UNKNOWN_GRID = 64


def check_run_against(base: BaseGeometry | None, targets: Targets | None,
                      model: ModelConfig | None = None, *, key: str = "model", sep: str = " ",
                      error: type[Exception] = ConfigError):
    """Check the base model, the targets and a run's model settings against each other; returns
    the run's NewModelConfig (None without ``model``).

    What is known is checked, what is not (None) is not: config parsing knows the declared patch
    size and targets.k_max; stage 1 knows the loaded base model and its settings; training knows
    the cache (or the view policy) and the base model (loaded, or as the cache recorded it).
    Geometric refusals raise ``error`` (one line); invalid settings of the run itself raise
    ConfigError naming ``key`` (the dotted key of the run's model settings). ``sep`` separates a
    key from its value in messages (": " in config errors).
    """
    base = base or BaseGeometry()
    if targets is not None:
        _check_targets(base, targets, error)
    if model is None:
        return None
    new = build_model_config(model, base, targets, key=key)
    if new.target != "tec":
        return new
    if model.patch_size is not None and base.patch_size is not None \
            and model.patch_size != base.patch_size:
        raise error(
            f"{key}.patch_size{sep}{model.patch_size} differs from the base model's patch size "
            f"{base.patch_size} (the targets have one row per base-model patch); remove "
            f"{key}.patch_size or make it {base.patch_size}")
    if targets is None:
        return new
    if targets.cache is not None and targets.num_patches is not None \
            and new.num_patches != targets.num_patches:
        raise error(f"cache {targets.cache} has {targets.num_patches} patches per view, the "
                    f"model {new.num_patches}; the cache does not fit this model")
    if targets.k_max is not None and new.use_attention and new.k > targets.k_max:
        if targets.cache is not None:
            where, fix = "the cache's k_max", "rebuild the cache with a larger k_max"
        else:
            where, fix = targets._dotted("k_max"), f"raise {targets._dotted('k_max')}"
        raise error(f"{key}.k{sep}{new.k} exceeds {where} {targets.k_max} (attention rows stored "
                    f"by stage 1); use k <= {targets.k_max} or {fix}")
    if base.embed_dim is not None and targets.channels is not None and (
            base.embed_dim, base.num_heads) != (targets.channels, targets.heads):
        raise error(f"the base model (width {base.embed_dim}, {base.num_heads} heads) does not "
                    f"match the cache (width {targets.channels}, {targets.heads} heads)")
    return new


def _check_targets(base: BaseGeometry, targets: Targets, error) -> None:
    """The view size, k_max and last_n of the targets against the base model."""
    size = targets.view_size
    if size is not None and base.img_size is not None and size != base.img_size:
        if targets.cache is not None:
            raise error(f"cache {targets.cache}: view size {size} differs from the base model's "
                        f"img_size {base.img_size}; the cache is inconsistent, rebuild it")
        key = targets._dotted("view_policy.output_size")
        raise error(f"{key} {size} differs from the base model's img_size {base.img_size}; set "
                    f"{key}: {base.img_size}")
    if targets.cache is not None:
        return  # a built cache's k_max and last_n were checked when it was built
    if targets.k_max is not None and base.num_patches is not None \
            and targets.k_max > base.num_patches:
        raise error(f"{targets._dotted('k_max')} {targets.k_max} exceeds the base model's "
                    f"{base.num_patches} patches; lower {targets._dotted('k_max')}")
    if targets.last_n is not None and base.depth is not None and targets.last_n > base.depth:
        raise error(f"{targets._dotted('last_n')} {targets.last_n} exceeds the base model's "
                    f"depth {base.depth}; lower {targets._dotted('last_n')}")


def build_model_config(model: ModelConfig, base: BaseGeometry | None = None,
                       targets: Targets | None = None, *, key: str = "model"):
    """The NewModelConfig of a run: its own settings plus the geometry that comes from the base
    model and the cache (img_size, patch_size unless given, base width and heads); raises
    ConfigError naming ``key`` on invalid settings. No cross-check (:func:`check_run_against`
    does those): for estimates such as `tec plan`'s."""
    from storage.util import first_line
    from tec.model import NewModelConfig

    base = base or BaseGeometry()
    values = model.values()
    patch = model.patch_size or base.patch_size or NewModelConfig.patch_size
    img_size = base.img_size or (targets.view_size if targets is not None else None)
    channels = targets.channels if targets is not None and targets.channels else base.embed_dim
    heads = targets.heads if targets is not None and targets.heads else base.num_heads
    values.update(patch_size=patch,
                  img_size=img_size if img_size is not None else patch * _UNKNOWN_GRID,
                  base_embed_dim=channels if channels is not None else 8,
                  base_num_heads=heads if heads is not None else 1)
    try:
        return NewModelConfig(**values).validate()
    except (TypeError, ValueError) as exc:
        message = first_line(exc)
        if message.startswith("new-model config "):  # 'new-model config depth=4: ...'
            raise ConfigError(f"{key}." + message.removeprefix("new-model config ")) from None
        raise ConfigError(f"{key}: {message}") from None
