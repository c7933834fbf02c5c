"""Stage 2: train a new model from the target cache (with online fallback), DDP, exact resume.

The trainer is an assembly of small components, each in its own module:

=================  ==========================================================================
data               :mod:`stages.data`: source index, sample plan, sampler, dataset, targets
optimizer          :mod:`stages.optim`: AdamW groups, lr = blr x batch / 256, warm-up + cosine
checkpointer       :mod:`stages.checkpoint`: atomic files, rotation, RNG states, resume
metrics            :mod:`stages.metrics`: CSV + TensorBoard, tqdm, loader throughput
=================  ==========================================================================

:func:`train` resolves what to train on (cache manifest, base model, view policy, source) and
refuses mismatches with a one-line message, builds the components, runs :class:`Trainer.fit`,
and writes the timm-loadable exports. Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the
process group itself (NCCL on GPU, gloo on CPU); every rank calls the same function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from .checkpoint import (
    Checkpointer,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from .configs import BaseModelConfig, ConfigError, stable_seed, to_dict
from .data import (
    Batch,
    CacheRead,
    DataError,
    PlanSampler,
    SamplePlan,
    SourceIndex,
    TargetBuilder,
    TrainDataset,
    collate,
    index_digest,
)
from .loader import BatchedTrainDataset, loader_settings, passthrough
from .metrics import LoaderMeter, MetricsLogger, ProgressBar, Throughput, WindowMean
from .optim import LRSchedule, build_optimizer, scaled_lr
from .views import ViewPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "CacheMismatchError",
    "NonFiniteLossError",
    "StaleRunError",
    "TrainConfig",
    "TrainSetupError",
    "TrainSummary",
    "Trainer",
    "export_checkpoint",
    "train",
]

# Set to 1 to write the (step, key, view) of every sample each rank trains on to
# <out_dir>/debug/samples_rank<r>.tsv (used by the DDP tests to check disjoint sharding).
DEBUG_SAMPLES_ENV = "TEC_DEBUG_SAMPLE_KEYS"
# NewModelConfig fields that come from the cache / base model / view policy, not from the run.
_DERIVED_MODEL_KEYS = ("img_size", "base_embed_dim", "base_num_heads")


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


@dataclass
class TrainConfig:
    """One stage-2 run (``train.runs[]`` in pipeline.yaml).

    model: NewModelConfig fields (img_size, base_embed_dim and base_num_heads come from the
    cache / base model; patch_size defaults to the base model's). batch_size is the global
    batch per optimizer step (all ranks x accum_steps). lr = blr x batch_size / 256, per-step
    linear warm-up over warmup_epochs then half-cycle cosine to min_lr. online_fraction: share
    of samples trained on a fresh view with targets computed online (1.0 = the reference fully
    online training). checkpoint_every: optimizer steps between checkpoints (0 = epoch ends
    only). max_steps: stop early (the schedule still spans ``epochs``). num_workers,
    prefetch_factor, persistent_workers, pin_memory: the DataLoader's, chosen from the machine
    when null (stages.loader.loader_settings; the choice is logged).
    """

    name: str
    epochs: int
    batch_size: int
    model: dict = field(default_factory=dict)
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
        self.model_config()  # raises on unknown keys / invalid values

    def model_config(self, **derived) -> "Any":
        """NewModelConfig of this run; ``derived`` supplies img_size/base_* (placeholders if absent).

        Placeholders only let the run's own keys be checked before the cache is opened.
        """
        from tec.model import NewModelConfig

        given = sorted(set(self.model) & set(_DERIVED_MODEL_KEYS))
        if given:
            raise ConfigError(f"model.{given[0]}: comes from the target cache / base model; "
                              "remove it from the run's model settings")
        names = {f.name for f in dataclasses.fields(NewModelConfig)}
        unknown = sorted(set(self.model) - names)
        if unknown:
            raise ConfigError(f"unknown key model.{unknown[0]}; allowed keys: "
                              f"{', '.join(sorted(names - set(_DERIVED_MODEL_KEYS)))}")
        values = dict(self.model)
        patch = int(values.get("patch_size", derived.get("patch_size", 16)))
        values.setdefault("patch_size", patch)
        values["img_size"] = derived.get("img_size", patch * 64)
        values["base_embed_dim"] = derived.get("base_embed_dim", 8)
        values["base_num_heads"] = derived.get("base_num_heads", 1)
        tau = values.get("tau", 1.8)
        if isinstance(tau, (int, float)) and not tau > 0:
            raise ConfigError(f"model.tau: must be > 0, got {tau}")
        try:
            return NewModelConfig(**values).validate()
        except (TypeError, ValueError) as exc:
            message = _one_line(exc)
            if message.startswith("new-model config "):  # 'new-model config depth=4: ...'
                raise ConfigError("model." + message.removeprefix("new-model config ")) from None
            raise ConfigError(f"model: {message}") from None


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


# ---------------------------------------------------------------------------------------------
# Distributed environment


@dataclass
class DistEnv:
    """This process's place in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistEnv":
        """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) and join the process group if needed."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda" and not torch.cuda.is_available():
            raise TrainSetupError("device: 'cuda' requested but no CUDA device is available; "
                                  "use device: auto or cpu")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        owns = False
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        if torch_dist.is_initialized():
            rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                torch_dist.barrier(device_ids=[self.device.index])
            else:
                torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False


# ---------------------------------------------------------------------------------------------
# Resolving what to train on


@dataclass
class RunInputs:
    """Everything the run trains on, resolved and checked against each other."""

    model_cfg: Any  # tec.model.NewModelConfig
    policy: ViewPolicy
    shards: list[str]
    source_kind: str
    cache_path: str | None = None
    cache_index: np.ndarray | None = None  # int64 [N] source sample -> cache sample (-1 missing)
    views: int = 0  # K cached views
    k_max: int | None = None
    last_n: int = 2
    codec: str | None = None
    base_model: nn.Module | None = None
    source_index: SourceIndex | None = None  # None: a self-contained cache, no source read
    cache_reader: Any = None  # the open storage.CacheReader (handed to the loader workers)


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _expand_source(source) -> tuple[str, list[str], str | None]:
    """(kind, shard ids, image-folder root or None) of a SourceConfig-like object (kind, path)."""
    from .sources import open_source

    kind = getattr(source, "kind", "webdataset")
    path = getattr(source, "path", None)
    if not path:
        raise TrainSetupError("source.path: no source images configured; set source.path")
    shards = [str(s) for s in open_source(kind, path).shards()]
    return kind, shards, (str(path) if kind == "imagefolder" else None)


def _same_files(a: list[str], b: list[str]) -> bool:
    return [os.path.realpath(x) for x in a] == [os.path.realpath(x) for x in b]


def _open_cache_checked(cache: str, base: BaseModelConfig | None, base_model, run: TrainConfig,
                        views: int | None = None):
    """Open a complete cache and check it belongs to this run (schema, base model, shapes)."""
    from storage import CacheError, fingerprint_mismatch, open_cache

    from storage.objstore import as_root, check_location

    check_location(str(cache), what="cache")
    if not as_root(cache).exists():
        raise FileNotFoundError(f"cache: target cache {cache} does not exist; run stage 1 first")

    def refuse(exc: CacheError) -> CacheMismatchError:
        message = _one_line(exc)
        return CacheMismatchError(message if str(cache) in message else f"cache {cache}: {message}")

    try:
        # the manifest's identity checksum is checked after the base model, so that a cache of
        # another base model is named as such
        reader = open_cache(cache, check_identity=False, views=views)
    except CacheError as exc:
        raise refuse(exc) from None
    manifest = reader.manifest
    cached_base = manifest.get("base_model", {})
    if base_model is not None:
        expected = base.fingerprint(base_model, last_n=int(cached_base.get("last_n", 2)),
                                    k_max=int(cached_base.get("k_max", reader.spec.k_max)))
        diff = fingerprint_mismatch(cached_base, expected)
        if diff:
            raise CacheMismatchError(
                f"cache {cache} was built with a different base model ({'; '.join(diff)}); "
                "rebuild the cache with this base model or configure the one it was built with")
    try:
        reader.check_manifest_identity()
    except CacheError as exc:
        raise refuse(exc) from None
    return reader


def resolve_inputs(run: TrainConfig, *, cache: str | None, source, base: BaseModelConfig | None,
                   view_policy: ViewPolicy | None, device: torch.device,
                   out_dir: Path, dist: DistEnv, cache_views: int | None = None) -> RunInputs:
    """Decide the model config, view policy, shards and target sources; refuse mismatches."""
    target = run.model.get("target", "tec")
    needs_targets = target == "tec"
    if needs_targets and run.online_fraction < 1.0 and cache is None:
        raise TrainSetupError(
            f"run {run.name}: online_fraction {run.online_fraction} < 1 reads the target cache, "
            "but no cache is configured; set the cache or online_fraction: 1.0")
    if needs_targets and run.online_fraction > 0.0 and base is None:
        raise TrainSetupError(
            f"run {run.name}: online_fraction {run.online_fraction} > 0 computes targets online, "
            "but no base_model is configured; configure base_model or set online_fraction: 0")
    if not needs_targets and base is not None:
        logger.info("pixel-target run %s: the base model is not used", run.name)
        base = None

    base_model, geometry = None, None
    if base is not None:
        base_model = base.load().eval()  # on the CPU until the trainer knows it is needed
        from tec.teacher import describe_vit

        geometry = describe_vit(base_model)

    reader = None
    views, k_max, last_n, codec = 0, None, 2, None
    if cache is not None:
        reader = _open_cache_checked(str(cache), base, base_model, run, cache_views)
        manifest = reader.manifest
        cached_base = manifest.get("base_model", {})
        spec = reader.spec
        policy = ViewPolicy.from_dict(manifest["view_policy"])
        if view_policy is not None and view_policy.to_dict() != policy.to_dict():
            logger.warning("run %s: using the cache's view policy %s (not the configured %s)",
                           run.name, policy.to_dict(), view_policy.to_dict())
        src = manifest.get("source", {})
        kind, shards = src.get("kind", "webdataset"), [str(s) for s in src.get("shards", [])]
        root = str(src.get("path")) if kind == "imagefolder" else None
        # a self-contained run reads no source: the configured one is neither read nor checked
        if source is not None and getattr(source, "path", None) and not _self_contained(
                reader, run, needs_targets):
            if getattr(source, "kind", kind) != kind:
                raise CacheMismatchError(
                    f"cache {cache} was built from a {kind!r} source, the run configures "
                    f"{source.kind!r}; use the source the cache was built from")
            if kind == "imagefolder":
                same = os.path.realpath(str(source.path)) == os.path.realpath(root)
                what = f"the image folder {root!r}"
            else:
                same = _same_files(_expand_source(source)[1], shards)
                what = f"{len(shards)} shards of {src.get('path')!r}"
            if not same:
                raise CacheMismatchError(
                    f"cache {cache} was built from {what}, not from the configured source "
                    f"{source.path!r}; use the source the cache was built from")
        views, k_max, codec = int(spec.views), int(spec.k_max), spec.codec
        last_n = int(cached_base.get("last_n", 2))
        derived = dict(img_size=int(cached_base.get("img_size", policy.output_size)),
                       patch_size=int(cached_base.get("patch_size", 16)),
                       base_embed_dim=int(spec.channels), base_num_heads=int(spec.heads))
        if policy.output_size != derived["img_size"]:
            raise CacheMismatchError(
                f"cache {cache}: view size {policy.output_size} differs from the base model's "
                f"img_size {derived['img_size']}; the cache is inconsistent, rebuild it")
    else:
        kind, shards, root = _expand_source(source) if source is not None else (None, None, None)
        if shards is None:
            raise TrainSetupError(f"run {run.name}: no cache and no source; configure source.path")
        if geometry is not None:
            derived = dict(img_size=geometry["img_size"], patch_size=geometry["patch_size"],
                           base_embed_dim=geometry["embed_dim"], base_num_heads=geometry["num_heads"])
            policy = view_policy or ViewPolicy(output_size=geometry["img_size"])
            if policy.output_size != geometry["img_size"]:
                raise TrainSetupError(
                    f"view_policy.output_size {policy.output_size} differs from the base model's "
                    f"img_size {geometry['img_size']}; set view_policy.output_size: "
                    f"{geometry['img_size']}")
        else:
            policy = view_policy or ViewPolicy()
            derived = dict(img_size=policy.output_size)
        policy.validate()

    model_cfg = run.model_config(**derived)
    if needs_targets:
        patch = derived.get("patch_size")
        if patch is not None and model_cfg.patch_size != patch:
            raise CacheMismatchError(
                f"model.patch_size {model_cfg.patch_size} differs from the base model's patch size "
                f"{patch} (the targets have one row per base-model patch); remove model.patch_size")
        if reader is not None and model_cfg.num_patches != reader.spec.num_patches:
            raise CacheMismatchError(
                f"cache {cache} has {reader.spec.num_patches} patches per view, the model "
                f"{model_cfg.num_patches}; the cache does not fit this model")
        if k_max is not None and model_cfg.use_attention and model_cfg.k > k_max:
            raise CacheMismatchError(
                f"model.k {model_cfg.k} exceeds the cache's k_max {k_max} (attention rows stored "
                f"by stage 1); use k <= {k_max} or rebuild the cache with a larger k_max")
        if geometry is not None and (geometry["embed_dim"], geometry["num_heads"]) != (
                model_cfg.base_embed_dim, model_cfg.base_num_heads):
            raise CacheMismatchError(
                f"the base model (width {geometry['embed_dim']}, {geometry['num_heads']} heads) "
                f"does not match the cache (width {model_cfg.base_embed_dim}, "
                f"{model_cfg.base_num_heads} heads)")

    if reader is not None and _self_contained(reader, run, needs_targets):
        logger.info("run %s: cache %s stores the view pixels (%s); no source image is read",
                    run.name, cache, reader.spec.pixels)
        return RunInputs(model_cfg=model_cfg, policy=policy, shards=shards, source_kind=kind,
                         cache_path=str(cache), cache_index=np.arange(reader.num_samples),
                         views=views, k_max=k_max, last_n=last_n, codec=codec,
                         base_model=base_model, source_index=None, cache_reader=reader)
    if kind == "webdataset":
        _check_source_exists(shards, reader, run, cache)

    # The source index: rank 0 builds (or reuses) it, the others load what it wrote.
    index_file = out_dir / "source_index" / f"{index_digest([root] if root else shards)}.npz"
    if dist.is_main:
        source_index = SourceIndex.load_or_build(kind, shards, index_file, root=root)
    dist.barrier()
    if not dist.is_main:
        source_index = SourceIndex.load_or_build(kind, shards, index_file, root=root, write=False)

    cache_index = None
    if reader is not None:
        from .records import MissingRecordsError, check_missing, match_records, sample_parts

        # each sample's record within its own part: never two samples on one record
        part_of = sample_parts(reader, kind, source_index)
        cache_index = match_records(reader, source_index.keys, part_of)
        try:
            missing = check_missing(cache_index, part_of, reader, source_index.keys, run=run,
                                    cache=cache) if needs_targets else 0
        except MissingRecordsError as exc:
            raise CacheMismatchError(str(exc)) from None
        if missing and dist.is_main:
            logger.warning("run %s: %d samples lack their cache record and fall back to online "
                           "targets (counted as fallback_online)", run.name, missing)
    return RunInputs(model_cfg=model_cfg, policy=policy, shards=shards, source_kind=kind,
                     cache_path=str(cache) if cache is not None else None,
                     cache_index=cache_index, views=views, k_max=k_max, last_n=last_n,
                     codec=codec, base_model=base_model, source_index=source_index,
                     cache_reader=reader)


def _self_contained(reader, run: TrainConfig, needs_targets: bool) -> bool:
    """Whether the run trains from the cache alone: the cache stores the view pixels and every
    sample is a cached view (online_fraction 0). Fresh views need the source images."""
    return reader.spec.pixels != "none" and needs_targets and run.online_fraction == 0.0


def _check_source_exists(shards: list[str], reader, run: TrainConfig, cache) -> None:
    """One line naming the first missing source shard and why the run needs it."""
    from storage.objstore import Url, is_url

    missing = [s for s in shards if not (Url(s).is_file() if is_url(s) else os.path.isfile(s))]
    if not missing:
        return
    first = f"{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if reader is not None and reader.spec.pixels != "none":
        raise TrainSetupError(
            f"run {run.name}: online_fraction {run.online_fraction} draws fresh views, which need "
            f"the source images, but source shard {first} does not exist (cache {cache} is "
            "self-contained only for cached views); restore the source or set online_fraction: 0")
    if reader is not None:
        raise TrainSetupError(
            f"run {run.name}: source shard {first} does not exist; cache {cache} stores no view "
            "pixels (targets.pixels: none), so stage 2 renders every view from the source - restore "
            "the source, or rebuild the cache with targets.pixels: jpeg to train without it")


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class StepCounters:
    samples: int = 0
    online: int = 0
    cached: int = 0
    skipped_bad: int = 0
    fallback: int = 0  # samples that lacked their cache record (records.MISSING)


class Trainer:
    """Assembles the components for one run and runs the loop (every rank builds one)."""

    def __init__(self, run: TrainConfig, inputs: RunInputs, out_dir: Path, dist: DistEnv,
                 *, progress: bool = True):
        from tec.model import NewModel

        self.run = run
        self.inputs = inputs
        self.out_dir = Path(out_dir)
        self.dist = dist
        self.device = dist.device
        self.progress = progress and dist.is_main
        cfg = inputs.model_cfg
        self.needs_targets = cfg.target == "tec"

        amp = run.amp == "bf16" or (run.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if amp else None

        # data
        num_samples = (len(inputs.source_index) if inputs.source_index is not None
                       else inputs.cache_reader.num_samples)
        self.plan = SamplePlan(
            num_samples, cache_index=inputs.cache_index, views=inputs.views,
            seed=run.seed, online_fraction=run.online_fraction,
            view_selection=run.view_selection, needs_targets=self.needs_targets,
            can_compute_online=inputs.base_model is not None)
        self.sampler = PlanSampler(self.plan, batch_size=run.batch_size,
                                   accum_steps=run.accum_steps, world_size=dist.world_size,
                                   rank=dist.rank)
        base_model = inputs.base_model
        needs_online = self.needs_targets and (
            self.plan.all_fresh or run.online_fraction > 0 or bool(self.plan.missing.any()))
        if base_model is not None:
            # the base model only runs for fresh views and samples missing from the cache
            base_model = base_model.to(self.device) if needs_online else None
            inputs.base_model = base_model
        cache_read = None
        if self.needs_targets and self.plan.cache_index is not None:
            cache_read = CacheRead(path=inputs.cache_path, index=inputs.cache_index, k=cfg.k,
                                   attention=cfg.use_attention, half=inputs.codec == "float16")
        self.dataset = None
        if inputs.source_index is not None:
            self.dataset = TrainDataset(inputs.source_index, inputs.policy, seed=run.seed,
                                        num_patches=cfg.num_patches, cache=cache_read)
            if cache_read is not None:
                self.dataset.use_reader(inputs.cache_reader)  # no re-open per worker
        keys = (inputs.source_index.keys if inputs.source_index is not None
                else inputs.cache_reader.keys)
        # one micro-batch per call (__getitems__): cached views of a cache with pixels are read
        # in batches, the rest goes through the per-sample TrainDataset above
        self.batched = BatchedTrainDataset(
            reader=inputs.cache_reader if cache_read is not None else None,
            cache_index=inputs.cache_index, keys=keys, policy=inputs.policy, seed=run.seed,
            num_patches=cfg.num_patches, k=cfg.k, attention=cfg.use_attention,
            items=self.dataset)
        settings = loader_settings(self.device, workers=run.num_workers,
                                   prefetch_factor=run.prefetch_factor,
                                   persistent_workers=run.persistent_workers,
                                   pin_memory=run.pin_memory)
        workers = settings.workers
        if dist.is_main:
            logger.info("run %s data loader: %d workers, prefetch %s, persistent %s, pinned "
                        "memory %s (%s)", run.name, workers, settings.prefetch_factor,
                        settings.persistent_workers, settings.pin_memory, settings.reason)
        self.loader_settings = settings
        self.loader = torch.utils.data.DataLoader(
            self.batched, batch_size=self.sampler.micro, sampler=self.sampler,
            collate_fn=passthrough, worker_init_fn=_worker_init if workers > 0 else None,
            drop_last=False, **settings.kwargs())
        self.targets = None
        if self.needs_targets:
            self.targets = TargetBuilder(
                base_model=base_model, k=cfg.k, mode=run.feature_norm,
                attention=cfg.use_attention, last_n=inputs.last_n,
                k_max=inputs.k_max if inputs.k_max is not None else cfg.k,
                amp_dtype=self.amp_dtype)

        # model (same init on every rank; DDP also broadcasts rank 0's weights)
        torch.manual_seed(run.seed)
        self.model = NewModel(cfg).to(self.device)
        self.ddp = self.model
        if dist.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        # optimizer and schedule
        self.steps_per_epoch = self.sampler.steps
        self.schedule = LRSchedule(
            base_lr=scaled_lr(run.blr, run.batch_size), min_lr=run.min_lr,
            warmup_steps=run.warmup_epochs * self.steps_per_epoch,
            total_steps=run.epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, lr=self.schedule.base_lr,
                                         weight_decay=run.weight_decay, betas=run.betas)
        self.total_steps = run.epochs * self.steps_per_epoch
        if run.max_steps is not None:
            self.total_steps = min(self.total_steps, run.max_steps)

        # state
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=run.keep_checkpoints,
                                         is_writer=dist.is_main)
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None
        self.counters = StepCounters()
        self.loader_meter = LoaderMeter(workers)
        self.window = WindowMean()
        self.final_losses: dict[str, float] = {}
        self.lr = 0.0
        self._last_batch: Batch | None = None
        self._debug_file = None
        if os.environ.get(DEBUG_SAMPLES_ENV, "") not in ("", "0"):
            debug_dir = self.out_dir / "debug"
            debug_dir.mkdir(parents=True, exist_ok=True)
            self._debug_file = open(debug_dir / f"samples_rank{dist.rank}.tsv", "a")

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": self.dist.gather(capture_rng_state()),
            "world_size": self.dist.world_size,
            "new_model_config": self.inputs.model_cfg.to_dict(),
            "train_config": to_dict(self.run),
            "identity": getattr(self, "identity", None),  # stages.identity.run_identity
            "steps_per_epoch": self.steps_per_epoch,
            "data": {"cache": self.inputs.cache_path, "num_samples": len(self.plan),
                     "shards": len(self.inputs.shards)},
        }

    def save_checkpoint(self) -> Path:
        state = self.state_dict()  # collective (RNG gather): every rank
        path = self.checkpointer.save(state, self.global_step)
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def maybe_resume(self) -> None:
        """Continue from ``<out_dir>/checkpoints/last`` when it exists."""
        path = self.checkpointer.latest() if self.dist.is_main else None
        path = self.dist.broadcast(str(path) if path else None)
        if path is None:
            return
        state = load_checkpoint(path)
        if getattr(self, "identity", None) is not None:
            from .identity import identity_changes

            changes = identity_changes(state.get("identity"), self.identity)
            if changes:
                raise StaleRunError(
                    f"run {self.run.name}: {path} was trained from other inputs (changed: "
                    f"{'; '.join(changes)}); `tec run` trains it anew, or use a new run name or "
                    f"delete {self.out_dir} to start over", changes)
        if state.get("new_model_config") != self.inputs.model_cfg.to_dict():
            raise TrainSetupError(
                f"checkpoint {path} was written for a different model config; use a new run name "
                "or delete the run folder to start over")
        if (state.get("steps_per_epoch") != self.steps_per_epoch
                or state["train_config"].get("batch_size") != self.run.batch_size):
            raise TrainSetupError(
                f"checkpoint {path} was written with {state.get('steps_per_epoch')} steps per epoch "
                f"and batch_size {state['train_config'].get('batch_size')}, this run has "
                f"{self.steps_per_epoch} and {self.run.batch_size} (data or batch changed); use a "
                "new run name or delete the run folder to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            logger.warning("checkpoint %s was written by %d process(es), this run has %d; RNG "
                           "states are reseeded (data order and masks are unaffected)", path,
                           len(rng), self.dist.world_size)
        self.last_checkpoint = Path(path)
        self.resumed_from = self.global_step
        if self.dist.is_main:
            logger.info("resumed run %s from %s (step %d, epoch %d + %d steps)", self.run.name,
                        path, self.global_step, self.epoch, self.step_in_epoch)

    # ---- one optimizer step -----------------------------------------------------------------

    def _forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        from tec.targets import normalize_images

        images = normalize_images(batch.images.to(self.device, non_blocking=True))
        noise = batch.noise.to(self.device, non_blocking=True)
        targets = self.targets(images, batch) if self.targets is not None else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            return self.ddp(images, targets, noise=noise)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over ``accum_steps`` micro-batches, then one optimizer step."""
        accum = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(5, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            counts += torch.tensor([len(batch), int(batch.fresh.sum()) if len(batch) else 0,
                                    len(batch) - (int(batch.fresh.sum()) if len(batch) else 0),
                                    len(batch.skipped), 0], dtype=torch.float64)
            if len(batch) and self.plan.fallback.any():
                counts[4] += int(self.plan.fallback[batch.indices.numpy()].sum())
            weight = 1.0
            if len(batch) == 0:  # every sample bad: run a zero-weight step to keep DDP in step
                if self._last_batch is None:
                    raise DataError("a whole micro-batch was unreadable at the start of the run; "
                                    "check the source shards (bad samples are listed in the logs)")
                batch, weight = self._last_batch, 0.0
            self._last_batch = batch
            sync = i == accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                out = self._forward(batch)
                (out["loss"] * (weight / accum)).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * (weight / accum)
        names = sorted(sums)
        stats = torch.stack([sums[n] for n in names]).to(torch.float64).cpu()
        packed = torch.cat([stats, counts]).to(self.device)
        packed = self.dist.all_reduce_sum(packed).cpu()
        losses = {n: float(v) / self.dist.world_size for n, v in zip(names, packed[: len(names)])}
        c = [int(round(float(x))) for x in packed[len(names):]]
        if not all(math.isfinite(v) for v in losses.values()):
            self.optimizer.zero_grad(set_to_none=True)
            bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not math.isfinite(v))
            raise NonFiniteLossError(
                f"run {self.run.name}: non-finite loss ({bad}) at step {self.global_step} "
                f"(epoch {self.epoch}); stopped, last good checkpoint: "
                f"{self.last_checkpoint or 'none'} (lower blr or set clip_grad)")
        if self.run.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.clip_grad)
        self.lr = self.schedule.apply(self.optimizer, self.global_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.samples += c[0]
        self.counters.online += c[1]
        self.counters.cached += c[2]
        self.counters.skipped_bad += c[3]
        self.counters.fallback += c[4]
        return losses

    # ---- the loop ---------------------------------------------------------------------------

    def _log_samples(self, batches: list[Batch]) -> None:
        if self._debug_file is None:
            return
        for batch in batches:
            for key, view, fresh in zip(batch.keys, batch.views, batch.fresh.tolist()):
                self._debug_file.write(f"{self.global_step}\t{self.epoch}\t{key}\t{view}\t"
                                       f"{int(fresh)}\n")
        self._debug_file.flush()

    def fit(self) -> TrainSummary:
        run, dist = self.run, self.dist
        self.maybe_resume()
        metrics = MetricsLogger(self.out_dir / "logs", enabled=dist.is_main,
                                resume_step=self.resumed_from)
        bar = ProgressBar(self.total_steps, self.global_step, enabled=self.progress,
                          desc=run.name)
        throughput = Throughput()
        window_wait = 0.0
        start = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                self.sampler.set_position(self.epoch, self.step_in_epoch)
                batches = iter(self.loader)
                while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                    t0 = time.perf_counter()
                    try:
                        micro = [next(batches) for _ in range(run.accum_steps)]
                    except ValueError as exc:  # worker errors arrive with a traceback appended
                        raise type(exc)(_worker_error_line(exc)) from None
                    wait = time.perf_counter() - t0
                    window_wait += wait
                    self.loader_meter.add(sum(len(b) + len(b.skipped) for b in micro),
                                          sum(b.load_seconds for b in micro), wait)
                    self._log_samples(micro)
                    losses = self.train_step(micro)
                    step_samples = sum(len(b) for b in micro) * dist.world_size
                    throughput.add(step_samples)
                    self.window.add(losses)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                    if end_of_epoch:
                        self.epoch += 1
                        self.step_in_epoch = 0
                    bar.update(1, loss=losses["loss"], lr=self.lr,
                               samples_s=f"{throughput.overall_rate():.1f}")
                    done = self.global_step >= self.total_steps
                    if self.global_step % run.log_every == 0 or done:
                        values = self.window.pop()
                        self.final_losses = dict(values)
                        elapsed_rate = throughput.window_rate()
                        values.update(lr=self.lr, samples_per_s=elapsed_rate,
                                      epoch=self.global_step / self.steps_per_epoch)
                        if self.plan.fallback.any():  # records missing from the cache
                            values["fallback_online"] = self.counters.fallback
                        capacity = self.loader_meter.capacity()
                        if capacity is not None:
                            values["loader_samples_per_s"] = capacity * dist.world_size
                        metrics.log(self.global_step, values)
                    if (run.checkpoint_every and self.global_step % run.checkpoint_every == 0) \
                            or end_of_epoch or done:
                        self.save_checkpoint()
                    if end_of_epoch:
                        break
                del batches
        finally:
            bar.close()
            metrics.close()
            if self._debug_file is not None:
                self._debug_file.close()
            self.loader = None  # shuts persistent loader workers down (fit runs once)
        seconds = time.perf_counter() - start
        return self._summary(seconds)

    def _summary(self, seconds: float) -> TrainSummary:
        dist = self.dist
        meter = torch.tensor([self.loader_meter.samples, self.loader_meter.busy_seconds,
                              self.loader_meter.wait_seconds], dtype=torch.float64)
        meter = dist.all_reduce_sum(meter.to(self.device)).cpu()
        samples = self.counters.samples
        capacity = None
        if float(meter[1]) > 0:
            capacity = self.loader_meter.workers * float(meter[0]) / float(meter[1]) * dist.world_size
        return TrainSummary(
            name=self.run.name,
            steps=self.global_step,
            epochs=self.global_step / self.steps_per_epoch,
            samples=samples,
            seconds=seconds,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            loader_samples_per_s=capacity,
            data_wait_fraction=(float(meter[2]) / dist.world_size / seconds) if seconds > 0 else None,
            online_samples=self.counters.online if self.needs_targets else 0,
            cached_samples=self.counters.cached if self.needs_targets else 0,
            skipped_missing=self.plan.skipped_per_epoch * max(
                0, self._epochs_started()),
            skipped_bad=self.counters.skipped_bad,
            fallback_online=self.counters.fallback if self.needs_targets else 0,
            resumed_from_step=self.resumed_from,
            losses=self.final_losses,
            lr=self.lr,
            world_size=dist.world_size,
            device=str(self.device),
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            log_dir=str(self.out_dir / "logs"),
        )

    def _epochs_started(self) -> int:
        first = (self.resumed_from or 0) // self.steps_per_epoch
        last = math.ceil(self.global_step / self.steps_per_epoch)
        return max(0, last - first)


def _worker_init(_worker_id: int) -> None:
    # decoding and resizing are per-sample; one thread per worker avoids oversubscription
    torch.set_num_threads(1)


def _worker_error_line(exc: BaseException) -> str:
    """The original one-line message of an exception re-raised from a DataLoader worker."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ": " in line and line.split(": ", 1)[0].endswith(("Error", "Exception")):
            return line.split(": ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Exports


def _write_export(model, out: Path, *, keep_adapters: bool, extra: dict | None = None,
                  timm_folder: str | None = None) -> dict:
    """Export ``model`` to ``out`` (.safetensors) plus ``<stem>.json`` describing how to load it.

    timm_folder: the model's name; ``out`` is then ``<folder>/model.safetensors`` and the folder
    gets timm's ``config.json`` and a model card too (``create_model("local-dir:<folder>")``).
    """
    from tec.export import (DEFAULT_EXPORT_ARCH, adapters_path, export_timm, export_timm_folder,
                            timm_kwargs_for)

    out = Path(out)
    if timm_folder is not None:
        export_timm_folder(model, out.parent, keep_adapters=keep_adapters, name=timm_folder,
                           details=extra)
    else:
        export_timm(model, out, keep_adapters=keep_adapters)
    info = {
        "arch": DEFAULT_EXPORT_ARCH,
        "timm_kwargs": dict(timm_kwargs_for(model.cfg), num_classes=0),
        "file": out.name,
        "adapters_file": adapters_path(out).name if keep_adapters else None,
        "new_model_config": model.cfg.to_dict(),
        "load": "timm.create_model(arch, pretrained=True, "
                "pretrained_cfg_overlay=dict(file=<file>), **timm_kwargs)"
                + (" or timm.create_model('local-dir:<folder>', pretrained=True)"
                   if timm_folder is not None else ""),
        **(extra or {}),
    }
    info_path = out.with_name(out.name.removesuffix(".safetensors") + ".json")
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, info_path)
    return {"export": str(out), "adapters": str(adapters_path(out)) if keep_adapters else None,
            "info": str(info_path)}


# what an export folder holds (export_checkpoint rewrites such a folder, no other)
_EXPORT_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "model.adapters.safetensors",
                                  "model.json", "README.md"})


def export_checkpoint(checkpoint_path: str | Path, out: str | Path,
                      keep_adapters: bool = False, name: str | None = None) -> Path:
    """Export any stage-2 training checkpoint as a timm-loadable .safetensors file at ``out``.

    The input adapter is folded into the cls token; ``keep_adapters`` also writes the adapters
    (``<stem>.adapters.safetensors``). A ``<stem>.json`` next to it records the timm kwargs.
    An ``out`` not ending in .safetensors is a folder in timm's pretrained layout (config.json,
    model.safetensors, model.json, README.md model card titled ``name``, default the folder's).
    """
    from tec.model import NewModel, NewModelConfig

    out = Path(out)
    folder = out.suffix != ".safetensors"
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; give a .safetensors file "
                         "name or a folder for timm's pretrained layout")
    if folder and out.is_dir():  # rewrite an earlier export, never a folder holding other files
        others = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FOLDER_FILES)
        if others:
            raise ValueError(f"--out {out}: the folder holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")
    state = load_checkpoint(checkpoint_path)
    model = NewModel(NewModelConfig(**state["new_model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    if folder:  # no local checkpoint path in a folder that may be pushed to the Hub
        _write_export(model, out / "model.safetensors", keep_adapters=keep_adapters,
                      extra={"step": int(state["step"])},
                      timm_folder=name or out.resolve().name)
    else:
        _write_export(model, out, keep_adapters=keep_adapters,
                      extra={"checkpoint": str(checkpoint_path), "step": int(state["step"])})
    return out


# ---------------------------------------------------------------------------------------------
# Entry point


@contextlib.contextmanager
def _numerics(run: TrainConfig, device: torch.device):
    """Deterministic algorithms (``run.deterministic``) or TF32 matmuls on GPU, for the run only."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[2:]


def train(run: TrainConfig, *, cache: str | None = None, source=None,
          base: BaseModelConfig | None = None, view_policy: ViewPolicy | None = None,
          out_dir: str | Path, progress: bool = True,
          cache_views: int | None = None) -> TrainSummary:
    """Train one new model; every torchrun rank calls this with the same arguments.

    cache: target cache folder (None: fully online or pixel mode). source: an object with
    ``kind`` and ``path`` (checked against the cache's source when both are given). base: the
    base model (online fallback; its fingerprint is checked against the cache). view_policy:
    only used without a cache. cache_views: of a cache grown by `tec cache extend --views`, use
    its first cache_views views (``targets.views``; never fewer than it was built with; None:
    all). Resumes from ``<out_dir>/checkpoints/last`` when present; writes
    ``checkpoints/``, ``logs/`` and ``export/`` under ``out_dir``.
    """
    run.validate()
    out_dir = Path(out_dir)
    dist = DistEnv.from_env(run.device)
    try:
        with _numerics(run, dist.device):
            return _train(run, dist, cache=cache, source=source, base=base,
                          view_policy=view_policy, out_dir=out_dir, progress=progress,
                          cache_views=cache_views)
    finally:
        dist.close()


def _train(run: TrainConfig, dist: DistEnv, *, cache, source, base, view_policy, out_dir: Path,
           progress: bool, cache_views: int | None = None) -> TrainSummary:
    """The body of :func:`train` once the process group and numerics are set up."""
    if run.batch_size % (dist.world_size * run.accum_steps):
        raise TrainSetupError(
            f"batch_size: {run.batch_size} is not divisible by world size x accum_steps = "
            f"{dist.world_size} x {run.accum_steps}; change batch_size or accum_steps")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    random.seed(stable_seed("python", run.seed, dist.rank))
    np.random.seed(stable_seed("numpy", run.seed, dist.rank) % 2**32)
    inputs = resolve_inputs(run, cache=cache, source=source, base=base,
                            view_policy=view_policy, device=dist.device, out_dir=out_dir,
                            dist=dist, cache_views=cache_views)
    init_source = inputs.base_model  # the trainer keeps it only for online targets
    trainer = Trainer(run, inputs, out_dir, dist, progress=progress)
    from .identity import run_identity

    trainer.identity = run_identity(run, cache=inputs.cache_path, base=base,
                                    needs_targets=trainer.needs_targets)
    if run.init_from_base:
        _init_from_base(run, trainer, init_source)
    if dist.is_main:
        _write_run_info(out_dir, run, inputs, trainer)
    summary = trainer.fit()
    export_path = out_dir / "export" / "model.safetensors"
    # A finished run resumed at its last step trains nothing: keep its export byte-for-byte
    # (safetensors metadata order is not stable, so rewriting would change the file's sha256,
    # which caches built from it record as their base-model fingerprint).
    finished_before = (summary.resumed_from_step is not None
                       and summary.resumed_from_step >= trainer.global_step
                       and export_path.is_file())
    if dist.is_main and finished_before:
        summary.export = str(export_path)
        if not (export_path.parent / "config.json").is_file():  # exported before config.json
            from tec.export import write_timm_config

            write_timm_config(trainer.model.cfg, export_path.parent)
    elif dist.is_main:
        trainer.model.eval()
        paths = _write_export(trainer.model, export_path,
                              keep_adapters=True,
                              extra={"run": run.name, "step": trainer.global_step},
                              timm_folder=run.name)
        summary.export = paths["export"]
        summary.export_adapters = paths["adapters"]
        summary.export_info = paths["info"]
    dist.barrier()
    if dist.is_main:
        logger.info("run %s finished:\n%s", run.name, summary.format())
    return summary


def _init_from_base(run: TrainConfig, trainer: Trainer, base_model) -> None:
    """``init_from_base``: copy the base model's encoder into the new model before training
    (every rank copies the same weights; a resumed run then loads its checkpoint over them)."""
    from tec.model import init_from_base_model

    if base_model is None:
        raise TrainSetupError(f"run {run.name}: init_from_base needs a base_model (a pixel-target "
                              "run has none); configure base_model or set init_from_base: false")
    try:
        keys = init_from_base_model(trainer.model, base_model)
    except ValueError as exc:
        raise TrainSetupError(f"run {run.name}: {exc}") from None
    if trainer.dist.is_main:
        logger.info("run %s: new model initialised from the base model (%d tensors)", run.name,
                    len(keys))


def _write_run_info(out_dir: Path, run: TrainConfig, inputs: RunInputs, trainer: Trainer) -> None:
    info = {
        "train": to_dict(run),
        "new_model_config": inputs.model_cfg.to_dict(),
        "cache": inputs.cache_path,
        "view_policy": inputs.policy.to_dict(),
        "shards": inputs.shards,
        "samples_per_epoch": len(trainer.plan),
        "skipped_missing_per_epoch": trainer.plan.skipped_per_epoch,
        "steps_per_epoch": trainer.steps_per_epoch,
        "world_size": trainer.dist.world_size,
        "device": str(trainer.device),
        "amp": str(trainer.amp_dtype),
    }
    path = out_dir / "run.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
