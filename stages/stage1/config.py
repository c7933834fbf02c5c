"""Stage-1 settings (targets.*), its errors, the summary of a run and the cache-relative names of
its reports."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from stages.configs import ConfigError
from stages.views import ViewPolicy
from storage.util import format_bytes

# The bad-sample report of the whole cache, relative to the cache root (one JSON object a line).
REPORT_NAME = "reports/bad_samples.jsonl"
# The stage-1 settings and base model a cache was built with (absolute paths), relative to the
# cache root: what `tec cache repair` recomputes damaged parts with. Not part of the identity.
CONFIG_NAME = "reports/stage1_config.json"


class Stage1Error(ValueError):
    """Stage 1 cannot run or did not finish (one line saying what to do)."""


class Stage1StrictError(Stage1Error):
    """strict mode: the cache is complete but some samples were skipped as bad."""

    def __init__(self, message: str, summary: Stage1Summary | None = None):
        super().__init__(message)
        self.summary = summary  # what the run did, for the caller to print


class NonFiniteTargetsError(Stage1Error):
    """The base model gave NaN/inf targets: a retry gives the same, the base model must change."""


# ------------------------------------------------------------------------------ configuration
@dataclass
class SourceConfig:
    """The input images: WebDataset tar shards (a pattern) or an image folder (cut into shards)."""

    kind: Literal["webdataset", "imagefolder"] = "webdataset"
    path: str = ""
    shard_size: int = 1000

    def validate(self) -> None:
        if not self.path:
            raise ConfigError(
                "targets.source.path: give the input shards (a pattern) or an image folder"
            )
        if self.shard_size < 1:
            raise ConfigError(f"targets.source.shard_size: must be >= 1, got {self.shard_size}")


@dataclass
class RayConfig:
    """Where and how wide stage 1 runs.

    address: join this cluster (else $RAY_ADDRESS, else a local Ray instance).
    num_cpus / num_gpus: size of the local instance (default: the machine's).
    num_actors: base-model actors (default: one per GPU; on CPU one per 16 CPUs).
    threads_per_actor: torch threads of a base-model actor (default: GPU 2; CPU its share of
    the CPUs left after the shard tasks).
    concurrent_shards: shard tasks (decode + render, one CPU each) running at once (default: the
    CPUs the actors leave).
    max_retries: retries of a shard task / restarts of an actor whose worker died.
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    num_actors: int | None = None
    threads_per_actor: int | None = None
    concurrent_shards: int | None = None
    max_retries: int = 3

    def validate(self) -> None:
        for name in ("num_cpus", "num_actors", "threads_per_actor", "concurrent_shards"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"targets.ray.{name}: must be >= 1, got {value}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"targets.ray.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.max_retries < 0:
            raise ConfigError(f"targets.ray.max_retries: must be >= 0, got {self.max_retries}")


@dataclass
class Stage1Config:
    """Stage 1 (``targets:`` in pipeline.yaml): which images, which views, which cache.

    views: K views per sample; last_n: blocks averaged for the feature target; k_max: attention
    rows stored (any k <= k_max can be trained with); batch_size: views per base-model forward
    pass; max_in_flight: batches a shard task keeps queued on the actors (>= 2 overlaps decoding
    with the forward pass); strict: fail (after finishing) if any sample was bad.
    pixels: store each view's rendered pixels in the cache ('jpeg' at ``pixels_quality``, or
    lossless 'png'), making it self-contained: stage 2 then reads no source image except for
    fresh (online) views. With jpeg the base model sees the decode of the stored bytes.
    codec: float16 | int8 | lowrank (compact, lossy; ``codec_params`` see storage/compact.py).
    precision: the base model's forward pass on a GPU (autocast dtype; float16 by measurement,
    benchmarks/README.md "Storage"); on a CPU it is always float32. The precision used is part of
    the cache's identity, and the target error of codec and precision against float32 is measured
    on the first samples and stored in the manifest (``target_error``).
    encode_on: where the lowrank codec encodes: ``cpu`` in the shard task's writer (numpy,
    storage/compact.py), ``device`` in the base-model actor right after the forward pass (torch on
    the actor's device, storage/compact_torch.py: only the stored arrays cross the object store),
    ``auto`` (default) the actor when the actors have GPUs, else cpu. Both encoders write the same
    format with the same decoded error; the bytes differ, so each part is written by one encoder
    (its commit marker names it). Not part of the cache's identity.
    cache (and source.path) may be fsspec URLs (s3://, gs://, memory://): no shared file system
    is needed. storage_options: {protocol: {filesystem keyword: value}} (e.g. ``{s3:
    {endpoint_url: ..., key: ..., secret: ...}}``) for those URLs, applied in every process of the
    run; without it credentials come from the standard environment (AWS_*, ...).
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    cache: str = ""
    backend: Literal["zarr", "webdataset"] = "zarr"
    codec: Literal["float16", "int8", "lowrank"] = "float16"
    codec_params: dict = field(default_factory=dict)
    precision: Literal["float32", "float16", "bfloat16"] = "float16"
    encode_on: Literal["auto", "cpu", "device"] = "auto"
    views: int = 10
    last_n: int = 2
    k_max: int = 16
    batch_size: int = 64
    max_in_flight: int = 2
    view_policy: ViewPolicy = field(default_factory=ViewPolicy)
    ray: RayConfig = field(default_factory=RayConfig)
    strict: bool = False
    pixels: Literal["none", "jpeg", "png"] = "none"
    pixels_quality: int = 90
    storage_options: dict = field(default_factory=dict)
    # views first_view .. first_view + views - 1 (a view layer written by `tec cache extend`)
    first_view: int = 0

    def validate(self) -> None:
        if not self.cache:
            raise ConfigError("targets.cache: give the target cache folder")
        for proto, opts in (self.storage_options or {}).items():
            if not isinstance(opts, dict):
                raise ConfigError(f"targets.storage_options.{proto}: expected a mapping of "
                                  f"filesystem options (endpoint_url, key, ...), got {opts!r:.40}")
        if self.first_view < 0:
            raise ConfigError(f"targets.first_view: must be >= 0, got {self.first_view}")
        for name in ("views", "last_n", "k_max", "batch_size", "max_in_flight"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"targets.{name}: must be >= 1, got {value}")
        from storage.compact import NAME as LOWRANK
        from storage.compact import CodecParamError, check_params

        if self.codec == LOWRANK:
            try:
                check_params(self.codec_params)
            except CodecParamError as exc:
                raise ConfigError(f"targets.{exc}") from None
        elif self.codec_params:
            raise ConfigError(f"targets.codec_params: codec {self.codec} takes no parameters; "
                              f"remove codec_params or use codec: {LOWRANK}")
        if self.encode_on == "device" and self.codec != LOWRANK:
            raise ConfigError(f"targets.encode_on: device encodes codec {LOWRANK} only (codec "
                              f"{self.codec} is rounded in the actor anyway); use auto or cpu")
        if not 1 <= self.pixels_quality <= 100:
            raise ConfigError(f"targets.pixels_quality: must be in [1, 100], got "
                              f"{self.pixels_quality}")
        self.source.validate()
        self.ray.validate()
        if isinstance(self.view_policy, dict):
            self.view_policy = ViewPolicy.from_dict(self.view_policy)
        self.view_policy.validate()


# ------------------------------------------------------------------------------ summary
@dataclass
class Stage1Summary:
    """What a stage-1 run did. images/views/forward_passes/seconds count this run's work only;
    skipped counts the bad samples of the whole cache (resumed parts included)."""

    cache: str
    backend: str
    images: int = 0
    views: int = 0
    skipped: int = 0
    parts_done: int = 0
    parts_skipped: int = 0
    parts_total: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    cache_samples: int = 0
    cache_bytes: int = 0
    bad_samples_report: str | None = None
    bad_reasons: dict = field(default_factory=dict)
    ray_address: str | None = None

    def format(self) -> str:
        lines = [
            f"target cache   {self.cache} ({self.backend}, "
            f"{format_bytes(self.cache_bytes, digits=1)})",
            f"parts          {self.parts_done} computed, {self.parts_skipped} already committed "
            f"(resumed), {self.parts_total} in all",
            f"this run       {self.images} images, {self.views} views, "
            f"{self.forward_passes} base-model forward passes in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s)" if self.parts_done else
            f"this run       nothing to compute (every part was committed) in "
            f"{self.seconds:.1f} s",
            f"cache          {self.cache_samples} samples",
        ]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.bad_reasons.items(),
                                                           key=lambda kv: -kv[1]))
            lines.append(f"bad samples    {self.skipped} skipped ({reasons}); "
                         f"listed in {self.bad_samples_report}")
        else:
            lines.append("bad samples    none")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ parts


def resolve_precision(cfg: Stage1Config) -> str:
    """The precision stage 1 runs the base model at: ``targets.precision`` on a GPU, float32 on
    a CPU (this process decides; the actors use what it decided, so the manifest is true)."""
    import torch

    if cfg.precision != "float32" and not torch.cuda.is_available():
        return "float32"
    return cfg.precision


def resolve_encode_on(cfg: Stage1Config, gpus: bool) -> bool:
    """Whether the base-model actors encode the lowrank codec (``targets.encode_on``): device
    always, cpu never, auto when the actors have GPUs (``gpus``). Decided once per run, so every
    part of a run is written by one encoder."""
    from storage.compact import NAME as LOWRANK

    if cfg.codec != LOWRANK or cfg.encode_on == "cpu":
        return False
    return cfg.encode_on == "device" or bool(gpus)


def _absolute(path) -> str:
    from storage.objstore import is_url

    if is_url(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))
