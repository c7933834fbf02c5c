"""Stage-2 settings of one run (:class:`TrainConfig`), what a run did (:class:`TrainSummary`) and
the errors that stop a run before or during training."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from stages.configs import ConfigError, from_dict
from stages.optim import scaled_lr
from tec.model import NewModelConfig as _New

logger = logging.getLogger("stages.train")


class TrainSetupError(ValueError):
    """The run cannot start as configured (one line naming what and how to fix it)."""


class CacheMismatchError(TrainSetupError):
    """The target cache does not belong to the configured run (base model, source, shapes)."""


class StaleRunError(TrainSetupError):
    """The run folder holds a run trained from other inputs (settings, cache, base model)."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes


class NonFiniteLossError(ValueError):
    """Training produced a NaN/inf loss; the run stopped, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Configuration


_FROM_BASE = "comes from the target cache / base model; remove it from the run's model settings"


@dataclass(frozen=True, init=False)
class ModelConfig:
    """The new model's settings a run gives (``runs[].model``): tec.model.NewModelConfig's fields
    with its defaults, except the geometry that comes from the cache / base model (img_size,
    base_embed_dim, base_num_heads; patch_size defaults to the base model's).
    :func:`stages.resolve.check_run_against` builds the NewModelConfig from it.

    It remembers the keys the file gave (``given_keys``): a run's recorded settings
    (``stages.configs.to_dict``, the run identity) are those keys, as written.
    """

    refused_keys: ClassVar[dict[str, str]] = {
        "img_size": _FROM_BASE, "base_embed_dim": _FROM_BASE, "base_num_heads": _FROM_BASE}

    patch_size: int | None = None  # None: the base model's
    in_chans: int = _New.in_chans
    embed_dim: int = _New.embed_dim
    depth: int = _New.depth
    num_heads: int = _New.num_heads
    mlp_ratio: float = _New.mlp_ratio
    decoder_embed_dim: int = _New.decoder_embed_dim
    decoder_depth: int = _New.decoder_depth
    decoder_num_heads: int = _New.decoder_num_heads
    mask_ratio: float = _New.mask_ratio
    target: str = _New.target  # 'tec' (base-model targets) | 'pixel' (MAE baseline / bootstrap)
    attn_proj_dim: int | None = _New.attn_proj_dim
    use_attention: bool = _New.use_attention
    use_input_adapter: bool = _New.use_input_adapter
    use_encoder_adapter: bool = _New.use_encoder_adapter
    adapter_group: int = _New.adapter_group
    k: int = _New.k
    tau: float = _New.tau
    feature_weight: float = _New.feature_weight
    attention_weight: float = _New.attention_weight
    norm_pix_loss: bool = _New.norm_pix_loss

    def __init__(self, **given):
        fields = dataclasses.fields(self)
        unknown = sorted(set(given) - {f.name for f in fields})
        if unknown:
            raise TypeError(f"ModelConfig got an unexpected keyword argument {unknown[0]!r}")
        for f in fields:
            object.__setattr__(self, f.name, given.get(f.name, f.default))
        object.__setattr__(self, "given_keys", tuple(given))

    def with_defaults(self, **defaults) -> ModelConfig:
        """These settings, with ``defaults`` for the keys not given (they count as given)."""
        return ModelConfig(**{**defaults, **{k: getattr(self, k) for k in self.given_keys}})

    def values(self) -> dict:
        """Every setting (defaults included) by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """The run's own settings (raises ConfigError naming ``model.<key>``)."""
        if not self.tau > 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")
        from stages.resolve import check_run_against

        check_run_against(None, None, self)


@dataclass
class TrainConfig:
    """One stage-2 run (``train.runs[]`` in pipeline.yaml).

    model: the new model's settings (:class:`ModelConfig`; the geometry comes from the cache /
    base model). batch_size is the global
    batch per optimizer step (all ranks x accum_steps). lr = blr x batch_size / 256, per-step
    linear warm-up over warmup_epochs then half-cycle cosine to min_lr. online_fraction: share
    of samples trained on a fresh view with targets computed online (1.0 = the reference fully
    online training). checkpoint_every: optimizer steps between checkpoints (0 = epoch ends
    only). max_steps: stop early (the schedule still spans ``epochs``). num_workers,
    prefetch_factor, persistent_workers, pin_memory: the DataLoader's, chosen from the machine
    when null (stages.loader.loader_settings; the choice is logged). read: how the cache is
    read, ``random`` (random access in the sample plan's order, any cache) or ``stream``
    (sequential reads of a self-contained WebDataset cache through a shuffle buffer of
    ``shuffle_buffer`` records per loader worker: stages.loader.StreamingCacheDataset).
    """

    name: str
    epochs: int
    batch_size: int
    model: ModelConfig = field(default_factory=ModelConfig)
    accum_steps: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    num_workers: int | None = None
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None
    pin_memory: bool | None = None
    online_fraction: float = 0.0
    # share of samples that may lack their cache record (damaged part, changed shard) and fall
    # back to online targets; null: 0 when online_fraction is 0, else online_fraction
    max_fallback_fraction: float | None = None
    view_selection: Literal["uniform", "round_robin"] = "uniform"
    read: Literal["random", "stream"] = "random"
    shuffle_buffer: int = 1000
    feature_norm: Literal["patch", "channel", "none"] = "patch"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 20
    amp: Literal["auto", "bf16", "none"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = None
    clip_grad: float | None = None
    deterministic: bool = False
    # start the new model's encoder from the base model's weights (paper Tab. 6(d) ablation;
    # the paper's default, and ours, is random initialisation)
    init_from_base: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # built in code with the YAML's mapping
            self.model = from_dict(ModelConfig, self.model, "model")

    def validate(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(f"{key}: {why}")

        if not self.name or "/" in self.name or self.name.startswith("."):
            fail("name", f"{self.name!r} must be a plain folder name")
        for key in ("epochs", "batch_size", "accum_steps", "keep_checkpoints", "log_every"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "checkpoint_every", "seed"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.accum_steps:
            fail("batch_size", f"{self.batch_size} is not divisible by accum_steps "
                 f"{self.accum_steps}")
        if not self.blr > 0:
            fail("blr", f"must be > 0, got {self.blr}")
        for key in ("min_lr", "warmup_epochs", "weight_decay"):
            if not getattr(self, key) >= 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.min_lr > scaled_lr(self.blr, self.batch_size):
            fail("min_lr", f"{self.min_lr} exceeds the peak lr blr x batch / 256 = "
                 f"{scaled_lr(self.blr, self.batch_size):.3g}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", f"each must be in [0, 1), got {list(self.betas)}")
        if not 0.0 <= self.online_fraction <= 1.0:
            fail("online_fraction", f"must be between 0 and 1, got {self.online_fraction}")
        if self.max_fallback_fraction is not None and not 0.0 <= self.max_fallback_fraction <= 1.0:
            fail("max_fallback_fraction", f"must be between 0 and 1 or null, got "
                 f"{self.max_fallback_fraction}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            fail("prefetch_factor", f"must be >= 1 or null, got {self.prefetch_factor}")
        if self.max_steps is not None and self.max_steps < 1:
            fail("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            fail("clip_grad", f"must be > 0 or null, got {self.clip_grad}")
        if self.shuffle_buffer < 1:
            fail("shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        if self.read == "stream":
            if self.model.target != "tec":
                fail("read", "stream reads the target cache; a pixel-target run (model.target: "
                     f"{self.model.target}) renders its views from the source - set read: random")
            if self.online_fraction > 0:
                fail("read", f"stream reads cached views only, but online_fraction "
                     f"{self.online_fraction} > 0 draws fresh views from the source images; set "
                     "online_fraction: 0 or read: random")
            if self.view_selection != "round_robin":
                fail("read", f"stream reads one view per epoch for every sample (a part's "
                     f"view-<v>.tar front to back), which view_selection: {self.view_selection} "
                     "cannot honour; set view_selection: round_robin or read: random")
        self.model.validate()


@dataclass
class TrainSummary:
    """What a stage-2 run did. samples/seconds/samples_per_s and the sample counts are this
    invocation's (a resumed run counts from its checkpoint on); steps/epochs are totals."""

    name: str
    steps: int = 0
    epochs: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    loader_samples_per_s: float | None = None
    data_wait_fraction: float | None = None
    online_samples: int = 0
    cached_samples: int = 0
    skipped_missing: int = 0
    skipped_bad: int = 0
    fallback_online: int = 0  # trained on online targets because their cache record is missing
    resumed_from_step: int | None = None
    losses: dict = field(default_factory=dict)
    lr: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    checkpoint: str | None = None
    export: str | None = None
    export_adapters: str | None = None
    export_info: str | None = None
    log_dir: str | None = None

    def format(self) -> str:
        loss = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.losses.items())) or "n/a"
        loader = "not measured"
        if self.loader_samples_per_s is not None:
            loader = (f"{self.loader_samples_per_s:.1f} samples/s capacity "
                      f"({self.loader_samples_per_s / max(self.samples_per_s, 1e-9):.1f}x training"
                      + (f", training waited {100 * self.data_wait_fraction:.0f}% of the time"
                         if self.data_wait_fraction is not None else "") + ")")
        lines = [
            f"run            {self.name} ({self.world_size} process(es) on {self.device})",
            f"trained        {self.steps} steps, {self.epochs:.2f} epochs"
            + (f" (resumed from step {self.resumed_from_step})"
               if self.resumed_from_step is not None else ""),
            f"this run       {self.samples} samples in {self.seconds:.1f} s "
            f"({self.samples_per_s:.1f} samples/s)",
            f"data           {self.cached_samples} cached views, {self.online_samples} online, "
            f"{self.skipped_missing} skipped (missing from cache), {self.skipped_bad} bad"
            + (f"; {self.fallback_online} of the online fell back from missing cache records"
               if self.fallback_online else ""),
            f"loader         {loader}",
            f"final loss     {loss} (lr {self.lr:.3g})",
            f"checkpoint     {self.checkpoint}",
            f"export         {self.export}",
        ]
        if self.export_adapters:
            lines.append(f"adapters       {self.export_adapters}")
        return "\n".join(lines)
