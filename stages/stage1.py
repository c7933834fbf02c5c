"""Stage 1: precompute the base model's targets for K views of every image, with Ray.

The work is a chain of small stages, one Ray task per input shard::

    source shard -> decode -> K views (view_params) -> render_views (uint8 pixels)
        -> batches -> base-model actor (normalize_images, extract_targets) -> PartWriter -> commit

* The driver (:func:`run_stage1`) loads the base model once to fingerprint it, lists the source
  shards, creates (or reopens, to resume) the target cache, and submits one task per shard whose
  part is not committed yet. It shows progress as tasks finish and writes the bad-sample report.
* A shard task (:func:`process_shard`) decodes and renders views on its own CPU and keeps
  ``max_in_flight`` batches queued on the base-model actors, so decoding overlaps the forward
  pass. It writes each sample's K view records as soon as they are back and commits the part
  (with the part's bad samples) at the end. Tasks are idempotent: a retry reopens the part, which
  discards the half-written state of the failed attempt.
* A base-model actor (:class:`BaseModelActor`) loads the model once in ``__init__`` and maps
  batches of uint8 views to targets in ``__call__`` (one GPU each under ``targets.precision``
  autocast, float16 by default; else float32 on CPU threads).

Shapes: B batch of views, K views per sample, S view side, L patches, C base-model width,
H base-model heads.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.configs import BaseModelConfig, ConfigError, to_dict
from stages.views import ViewPolicy

__all__ = [
    "SourceConfig",
    "RayConfig",
    "Stage1Config",
    "Stage1Summary",
    "Stage1Error",
    "Stage1StrictError",
    "BaseModelActor",
    "ShardJob",
    "PartResult",
    "run_stage1",
    "process_shard",
    "part_names",
    "REPORT_NAME",
]

logger = logging.getLogger(__name__)

# The bad-sample report of the whole cache, relative to the cache root (one JSON object a line).
REPORT_NAME = "reports/bad_samples.jsonl"
# The stage-1 settings and base model a cache was built with (absolute paths), relative to the
# cache root: what `tec cache repair` recomputes damaged parts with. Not part of the identity.
CONFIG_NAME = "reports/stage1_config.json"
# Test-only fault injection (JSON): {"crash_dir": DIR, "batch_delay_s": SECONDS}. A shard task
# whose part has a file DIR/<part>.crash renames it to .crashed and kills its own worker process
# half-way through the shard; batch_delay_s slows every batch down (to interrupt a run midway).
# Read by the driver and passed to the tasks, so it reaches workers of any cluster.
TEST_HOOKS_ENV = "TEC_STAGE1_TEST_HOOKS"


class Stage1Error(ValueError):
    """Stage 1 cannot run or did not finish (one line saying what to do)."""


class Stage1StrictError(Stage1Error):
    """strict mode: the cache is complete but some samples were skipped as bad."""

    def __init__(self, message: str, summary: "Stage1Summary | None" = None):
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
        from storage.compact import NAME as LOWRANK, CodecParamError, check_params

        if self.codec == LOWRANK:
            try:
                check_params(self.codec_params)
            except CodecParamError as exc:
                raise ConfigError(f"targets.{exc}") from None
        elif self.codec_params:
            raise ConfigError(f"targets.codec_params: codec {self.codec} takes no parameters; "
                              f"remove codec_params or use codec: {LOWRANK}")
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
            f"target cache   {self.cache} ({self.backend}, {_human_bytes(self.cache_bytes)})",
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


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ------------------------------------------------------------------------------ parts
def part_names(shards: list[str]) -> list[str]:
    """One cache part name per source shard: its file name without extensions
    (``/data/train-000012.tar`` -> ``train-000012``, see ``storage.part_name_for``); names that
    would collide get the shard's index as a prefix."""
    from storage import part_name_for

    names = [part_name_for(str(shard)) for shard in shards]
    counts = collections.Counter(names)
    return [f"{i:06d}-{n}"[:200] if counts[n] > 1 else n for i, n in enumerate(names)]


# ------------------------------------------------------------------------------ the actor
class BaseModelActor:
    """Holds the frozen base model; maps batches of uint8 views to targets.

    Used as a Ray actor (``ray.remote(BaseModelActor)``) and directly in-process.
    """

    def __init__(self, base: dict, last_n: int, k_max: int, *, threads: int | None = None,
                 float16: bool = False, precision: str = "float32"):
        import torch

        from stages.configs import from_dict

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = from_dict(BaseModelConfig, base).load().to(self.device)
        self.last_n = last_n
        self.k_max = k_max
        self.float16 = float16
        # autocast dtype of the forward pass; float32 (none) on a CPU
        self.autocast = None if self.device.type != "cuda" or precision == "float32" else \
            {"float16": torch.float16, "bfloat16": torch.bfloat16}[precision]

    def info(self) -> dict:
        """Where the actor runs (also used to wait until the model is loaded)."""
        import torch

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": name, "host": socket.gethostname(), "pid": os.getpid(),
                "threads": torch.get_num_threads()}

    def __call__(self, views: np.ndarray) -> dict[str, np.ndarray]:
        """views: uint8 [B,3,S,S] -> dict of numpy arrays: features [B,L,C], feature_mean and
        feature_std [B,C] (float32), attn_logits [B,H,k_max+1,L], attn_index [B,k_max] (int64).

        With ``float16`` (the cache's float16 codec) features and attn_logits come back rounded
        to float16, exactly what the cache stores, at half the bytes through the object store.
        """
        import torch

        from tec.targets import extract_targets, normalize_images

        # Arrays from the object store are read-only; a uint8 copy is cheap.
        x = torch.from_numpy(np.array(views, dtype=np.uint8, copy=True)).to(self.device)
        x = normalize_images(x)
        with torch.autocast(device_type="cuda", dtype=self.autocast or torch.float16,
                            enabled=self.autocast is not None):
            targets = extract_targets(self.model, x, last_n=self.last_n, k_max=self.k_max)
        big = torch.float16 if self.float16 else torch.float32
        return {
            "features": targets.features.to(big).cpu().numpy(),
            "feature_mean": targets.feature_mean.float().cpu().numpy(),
            "feature_std": targets.feature_std.float().cpu().numpy(),
            "attn_logits": targets.attn_logits.to(big).cpu().numpy(),
            "attn_index": targets.attn_index.long().cpu().numpy(),
        }


# ------------------------------------------------------------------------------ the shard task
@dataclass
class ShardJob:
    """Everything a shard task needs (plain data, sent to the worker)."""

    shard: str
    part: str
    index: int
    slots: int
    source_kind: str
    source_path: str
    shard_size: int
    cache: str
    views: int
    policy: dict
    batch_size: int
    max_in_flight: int
    hooks: dict = field(default_factory=dict)
    renames: dict = field(default_factory=dict)  # this shard's stages.sources.unique_keys
    storage_options: dict = field(default_factory=dict)  # targets.storage_options
    first_view: int = 0  # compute views first_view .. first_view + views - 1


@dataclass
class PartResult:
    """What one shard task did."""

    part: str
    images: int = 0
    views: int = 0
    forward_passes: int = 0
    bad: list = field(default_factory=list)
    seconds: float = 0.0
    already_committed: bool = False
    worker: str = ""


_RECORD_KEYS = ("features", "feature_mean", "feature_std", "attn_logits", "attn_index")


class _SampleAssembler:
    """Collects per-view target rows (arriving in submission order) into per-sample records."""

    def __init__(self, views: int, write, part: str = ""):
        self.views = views
        self.write = write
        self.part = part
        self.pending: collections.deque = collections.deque()  # sample metas in row order
        self.rows: dict[str, list] = {k: [] for k in _RECORD_KEYS}
        self.filled = 0  # rows of pending[0] received so far

    def expect(self, meta: dict) -> None:
        self.pending.append(meta)

    def add(self, out: dict[str, np.ndarray]) -> None:
        bad = [k for k in _RECORD_KEYS[:4] if not np.isfinite(out[k]).all()]
        if bad:
            key = self.pending[0]["key"] if self.pending else "?"
            raise NonFiniteTargetsError(
                f"part {self.part}: the base model gave non-finite targets (NaN/inf in "
                f"{', '.join(bad)}) for the views of sample {key!r} and those batched with it; a "
                "retry gives the same - check base_model.checkpoint (NaN or overflowing weights) "
                "and run stage 1 again once the base model gives finite outputs")
        n = len(out["features"])
        start = 0
        while start < n:
            take = min(self.views - self.filled, n - start)
            for k in _RECORD_KEYS:
                self.rows[k].append(out[k][start:start + take])
            self.filled += take
            start += take
            if self.filled == self.views:
                meta = self.pending.popleft()
                record = {k: np.concatenate(self.rows[k]) for k in _RECORD_KEYS}
                record.update(crop=meta["crop"], flip=meta["flip"],
                              source_size=meta["source_size"], label=meta["label"])
                if "pixels" in meta:
                    record["pixels"] = meta["pixels"]
                self.write(meta["slot"], meta["key"], record)
                self.rows = {k: [] for k in _RECORD_KEYS}
                self.filled = 0


def process_shard(job: ShardJob, actors: list, writer=None) -> PartResult:
    """Compute and commit one part: every good sample of ``job.shard``, K views each.

    actors: base-model actor handles (Ray) or, in-process, objects with ``__call__``. Bad
    samples (unreadable records, undecodable images) are skipped and listed in the part's report.
    """
    import torch

    from stages.sources import BadSample, decode_image
    from stages.views import render_views, view_params, views_to_arrays
    from storage import PartCommittedError

    start = time.perf_counter()
    if job.storage_options:  # this worker may be on another node: configure its filesystems
        from storage.objstore import configure

        configure(job.storage_options)
    writer = writer if writer is not None else _open_writer(job.cache)
    result = PartResult(part=job.part, worker=f"{socket.gethostname()}:{os.getpid()}")
    if writer.is_committed(job.part):  # a retried task whose first attempt had committed
        result.already_committed = True
        return result
    policy = ViewPolicy.from_dict(job.policy)
    size = policy.output_size
    source = _shard_source(job)
    remote = bool(actors) and hasattr(actors[0], "__ray_call__")  # Ray actor handles
    if remote:
        import ray

        fetch = ray.get
    else:
        def fetch(out):
            return out
    crash_dir = job.hooks.get("crash_dir")
    delay = float(job.hooks.get("batch_delay_s") or 0.0)

    try:
        part = writer.open_part(job.part)
    except PartCommittedError:  # committed since the check above
        return _committed_elsewhere(result, start)
    assembler = _SampleAssembler(job.views, part.write, job.part)
    in_flight: collections.deque = collections.deque()
    stored_pixels = writer.spec.pixels
    buffer: list[torch.Tensor] = []  # uint8 [K,3,S,S] per sample, not yet submitted
    buffered = 0
    calls = 0

    def submit(n: int) -> None:
        nonlocal buffer, buffered, calls
        batch = torch.cat(buffer).numpy()
        head, rest = batch[:n], batch[n:]
        buffer = [torch.from_numpy(rest)] if len(rest) else []
        buffered = len(rest)
        actor = actors[(job.index + calls) % len(actors)]
        calls += 1
        in_flight.append(actor.__call__.remote(head) if remote else actor(head))
        result.forward_passes += 1
        result.views += len(head)
        if delay:
            time.sleep(delay)

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            assembler.add(fetch(in_flight.popleft()))

    attempts = job.hooks.get("attempts_dir")
    if attempts:  # test hook: count the attempts at this part
        Path(attempts, f"{job.part}.{os.getpid()}.{time.monotonic_ns()}").touch()
    keys_seen: set[str] = set()
    try:
        for slot, sample in enumerate(source.samples(job.shard)):
            if slot >= job.slots:
                raise Stage1Error(f"shard {job.shard} holds more than the {job.slots} samples "
                                  "counted when the cache was created; the source changed")
            if crash_dir and slot == job.slots // 2:
                marker = Path(crash_dir) / f"{job.part}.crash"
                if marker.exists():
                    marker.rename(marker.with_suffix(".crashed"))
                    logger.warning("test hook: killing the worker of part %s", job.part)
                    os._exit(1)
            key = job.renames.get(sample.key, sample.key)  # unique across the source
            try:
                if sample.error:
                    raise BadSample(sample.error)
                if key is None:
                    raise BadSample(f"duplicate key: {sample.key!r} names samples of other shards "
                                    f"too, and {job.part}/{sample.key} is taken by another sample")
                if key in keys_seen:
                    raise BadSample("duplicate key (an earlier sample of this shard has the same "
                                    "key)")
                image = decode_image(sample.data)
            except BadSample as exc:
                result.bad.append({"part": job.part, "slot": slot, "key": key or sample.key,
                                   "reason": str(exc)})
                continue
            keys_seen.add(key)
            h, w = int(image.shape[0]), int(image.shape[1])
            views = [view_params(policy, key, v, h, w)
                     for v in range(job.first_view, job.first_view + job.views)]
            pixels = render_views(image, views, size, policy.interpolation)  # [K,3,S,S]
            crop, flip = views_to_arrays(views)
            meta = {"slot": slot, "key": key, "crop": crop, "flip": flip,
                    "source_size": (h, w), "label": int(sample.label)}
            if stored_pixels != "none":
                meta["pixels"], pixels = _stored_view_pixels(pixels, stored_pixels,
                                                             writer.spec.pixels_quality)
            assembler.expect(meta)
            buffer.append(pixels)
            buffered += len(pixels)
            result.images += 1
            while buffered >= job.batch_size:
                submit(job.batch_size)
                drain(job.max_in_flight)
        if buffered:
            submit(buffered)
        drain(0)
        part.commit(report=result.bad)
    except PartCommittedError:
        # Another writer of the same cache committed this part while this task computed it,
        # e.g. a worker of a killed earlier run that still finished its task. Tasks are
        # deterministic and idempotent: the part is there, this copy was dropped (commit aborts).
        part.abort()
        return _committed_elsewhere(result, start)
    except BaseException:
        part.abort()
        raise
    result.seconds = time.perf_counter() - start
    return result


def _stored_view_pixels(pixels, fmt: str, quality: int):
    """Encode rendered views uint8 [K,3,S,S] for the cache; returns (K encoded images, the
    pixels the base model is fed [K,3,S,S]): for jpeg the decode of the stored bytes (the view's
    pixels by definition, bit-identical to what stage 2 decodes), for png the views themselves."""
    import torch

    from storage.pixels import decode_pixels, encode_pixels

    encoded = [encode_pixels(view.numpy(), fmt, quality) for view in pixels]
    if fmt == "jpeg":
        decoded = np.stack([decode_pixels(data) for data in encoded])  # [K,S,S,3]
        pixels = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()
    return encoded, pixels


def _committed_elsewhere(result: PartResult, start: float) -> PartResult:
    logger.info("part %s was committed by another writer meanwhile; keeping that copy and "
                "counting the part as already committed", result.part)
    return PartResult(part=result.part, already_committed=True, worker=result.worker,
                      seconds=time.perf_counter() - start)


def _open_source(kind: str, path: str, shard_size: int):
    from stages.sources import open_source

    if kind == "imagefolder":
        return open_source(kind, path, shard_size=shard_size)
    return open_source(kind, path)


@functools.lru_cache(maxsize=4)
def _folder_source(path: str, shard_size: int):
    # Listing a large image folder is slow: once per worker process, not once per shard task.
    return _open_source("imagefolder", path, shard_size)


def _shard_source(job: ShardJob):
    """A source that streams job.shard (a tar shard is opened by itself: no pattern expansion)."""
    if job.source_kind == "webdataset":
        return _open_source("webdataset", job.shard, job.shard_size)
    return _folder_source(job.source_path, job.shard_size)


def _open_writer(cache: str):
    """Reopen the cache the driver created, for writing parts (inside a worker)."""
    from storage import open_writer

    return open_writer(cache)


# ------------------------------------------------------------------------------ Ray plumbing
def _test_hooks() -> dict:
    raw = os.environ.get(TEST_HOOKS_ENV)
    if not raw:
        return {}
    try:
        hooks = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Stage1Error(f"${TEST_HOOKS_ENV} is not valid JSON ({exc})") from None
    logger.warning("stage-1 test hooks active: %s", hooks)
    return hooks


def _connect_ray(cfg: Stage1Config, ray_address: str | None) -> tuple[bool, str]:
    """Join the configured cluster or start a local Ray. Returns (started_here, address)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    if ray.is_initialized():  # a caller (notebook, test) already connected: use that
        if ray_address or cfg.ray.address:
            logger.info("Ray is already connected in this process; using it, not %s",
                        ray_address or cfg.ray.address)
        return False, ray.get_runtime_context().gcs_address
    address = ray_address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        _check_reachable(address)
        token_given = _use_given_auth_token()
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("check that $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH hold the head's token"
                    if token_given else
                    "if the cluster uses token authentication, give the driver the head's token: "
                    "RAY_AUTH_TOKEN_PATH=FILE (a copy of the head's ~/.ray/auth_token)")
            raise Stage1Error(
                f"cannot join the Ray cluster at {address} ({first}); check --ray-address / "
                f"$RAY_ADDRESS (host:port of the head node, or 'local' to start one here); "
                f"{hint}"
            ) from None
        return True, address
    kwargs: dict[str, Any] = dict(address="local", include_dashboard=False,
                                  log_to_driver=False, configure_logging=False,
                                  _node_ip_address="127.0.0.1")
    if cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)
    return True, ray.get_runtime_context().gcs_address


def _use_given_auth_token() -> bool:
    """A cluster token given in the environment turns on token authentication for this driver.

    Ray sends a token only in ``RAY_AUTH_MODE=token``; a driver that was handed the head's token
    (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) but not the mode would otherwise connect
    without it and be refused. An explicit ``RAY_AUTH_MODE`` is left as it is.
    """
    given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if given and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray reads its config once at import: re-read it, as ray's own token setup does
        from ray._raylet import Config

        Config.initialize("")
        logger.info("Ray cluster token given in the environment: token authentication on")
    return given


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address.strip())
    if match is None:  # 'auto', 'ray://...': leave it to Ray
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise Stage1Error(
            f"cannot reach the Ray head at {address} ({exc.strerror or exc}); check --ray-address "
            "/ $RAY_ADDRESS (host:port of the head node's GCS, default port 6379)"
        ) from None


@dataclass
class _Plan:
    """How stage 1 spreads over the cluster's resources."""

    num_actors: int
    actor_options: dict  # Ray resources of one base-model actor
    threads: int  # torch threads of one actor
    concurrent: int  # shard tasks running at once


def _plan(cfg: Stage1Config, resources: dict) -> _Plan:
    """Actors: one GPU each, else CPU threads; shard tasks get the CPUs the actors leave."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        num = cfg.ray.num_actors or gpus
        threads = cfg.ray.threads_per_actor or 2
        actor_cpus = 1 if cpus > num else 0
        options = {"num_gpus": 1, "num_cpus": actor_cpus}
    else:
        num = cfg.ray.num_actors or max(1, cpus // 16)
        decode_cpus = max(1, cpus // 4)
        threads = cfg.ray.threads_per_actor or max(1, (cpus - decode_cpus) // num)
        # Reserve the actors' CPUs but always leave one for the shard tasks (else nothing runs).
        actor_cpus = max(0, min(threads, (cpus - 1) // num))
        options = {"num_cpus": actor_cpus}
    # A task blocked on an actor releases its CPU to Ray, which would then start yet another
    # task (and worker process); bounding the tasks in flight keeps workers = CPUs.
    concurrent = cfg.ray.concurrent_shards or max(1, cpus - num * actor_cpus)
    return _Plan(num, options, threads, concurrent)


def _start_actors(cfg: Stage1Config, base: BaseModelConfig, plan: _Plan) -> tuple[list, list]:
    """Create the base-model actors; returns (actors, refs that resolve once each is loaded)."""
    import ray

    actor_cls = ray.remote(BaseModelActor).options(
        max_restarts=cfg.ray.max_retries, max_task_retries=cfg.ray.max_retries,
        **plan.actor_options,
    )
    base_dict = to_dict(base)
    if base_dict.get("checkpoint"):
        base_dict["checkpoint"] = _absolute(base_dict["checkpoint"])
    actors = [
        actor_cls.remote(base_dict, cfg.last_n, cfg.k_max, threads=plan.threads,
                         float16=cfg.codec == "float16", precision=resolve_precision(cfg))
        for _ in range(plan.num_actors)
    ]
    return actors, [a.info.remote() for a in actors]


def _wait_actors(ready: list, plan: _Plan, timeout: float = 600.0) -> None:
    """Block until every actor has loaded the base model; one-line error if one cannot."""
    import ray

    done, waiting = ray.wait(ready, num_returns=len(ready), timeout=timeout)
    if waiting:
        raise Stage1Error(
            f"{len(waiting)} of {plan.num_actors} base-model actors did not start within "
            f"{timeout:.0f} s (each wants {plan.actor_options}); lower targets.ray.num_actors or "
            "add resources to the Ray cluster"
        )
    for ref in done:
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise Stage1Error(f"a base-model actor failed to load the base model "
                              f"({lines[-1] if lines else type(exc).__name__})") from None
        logger.info("base-model actor on %s (%s, pid %s, %s threads)", info["host"],
                    info["device"], info["pid"], info["threads"])


def _run_tasks(cfg: Stage1Config, jobs: list[ShardJob], actors: list, ready: list, plan: _Plan,
               progress: bool) -> tuple[list[PartResult], list[tuple]]:
    """Run the shard tasks, at most plan.concurrent at a time, with a progress bar.

    Returns (results, [(part, error)] of the tasks that failed after their retries).
    """
    import ray
    from tqdm import tqdm

    task = ray.remote(process_shard).options(
        num_cpus=1, max_retries=cfg.ray.max_retries,
        retry_exceptions=[OSError, ray.exceptions.RayActorError],
    )
    queue = collections.deque(jobs)
    running: dict = {}  # ref -> job
    results: list[PartResult] = []
    failed: list[tuple] = []  # (part, reason, deterministic)

    def submit() -> None:
        while queue and len(running) < plan.concurrent:
            job = queue.popleft()
            running[task.remote(job, actors)] = job

    bar = None
    try:
        submit()  # the first tasks decode while the actors load the model
        _wait_actors(ready, plan)
        bar = tqdm(total=sum(j.slots for j in jobs), unit="img", desc="stage 1",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True, smoothing=0.1,
                   postfix=f"parts 0/{len(jobs)}")
        start = time.perf_counter()
        images = 0
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(done[0])
            bar.update(job.slots)
            try:
                res: PartResult = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                reason, fixed = task_failure(exc)
                if fixed:
                    logger.error("part %s failed (not retried: a retry gives the same): %s",
                                 job.part, reason)
                    if isinstance(getattr(exc, "cause", None), NonFiniteTargetsError):
                        queue.clear()  # the base model is at fault: every part would fail so
                else:
                    logger.error("part %s failed after %d retries: %s", job.part,
                                 cfg.ray.max_retries, reason)
                failed.append((job.part, reason, fixed))
                submit()  # after the queue was cleared for a base model at fault
                continue
            submit()
            results.append(res)
            images += res.images
            rate = images / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"parts {len(results) + len(failed)}/{len(jobs)}, "
                                f"{rate:.1f} images/s")
            if res.already_committed:
                logger.info("part %s was already committed (by another writer); skipped",
                            res.part)
            else:
                logger.info("part %s committed: %d images, %d bad, %.1f s (worker %s)",
                            res.part, res.images, len(res.bad), res.seconds, res.worker)
    finally:
        if bar is not None:
            bar.close()
        for ref in running:  # an error or Ctrl-C: stop what is still running
            ray.cancel(ref, force=True)
    return results, failed


def _run_on_ray(cfg: Stage1Config, base: BaseModelConfig, jobs: list[ShardJob],
                ray_address: str | None, progress: bool):
    import ray

    started, address = _connect_ray(cfg, ray_address)
    try:
        plan = _plan(cfg, ray.cluster_resources())
        logger.info("stage 1 on Ray at %s: %d base-model actors (%s, %d threads), %d shard "
                    "tasks at a time", address, plan.num_actors, plan.actor_options,
                    plan.threads, plan.concurrent)
        actors, ready = _start_actors(cfg, base, plan)
        try:
            results, failed = _run_tasks(cfg, jobs, actors, ready, plan, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    return results, failed, address


# ------------------------------------------------------------------------------ the driver
def run_stage1(cfg: Stage1Config, base: BaseModelConfig, *, ray_address: str | None = None,
               strict: bool | None = None, progress: bool = True) -> Stage1Summary:
    """Fill ``cfg.cache`` with the base model's targets for ``cfg.views`` views of every sample.

    Resumes: parts already committed are skipped (a complete cache costs no forward pass and
    no Ray start). ray_address (else ``cfg.ray.address``, else $RAY_ADDRESS) joins an existing
    cluster, whose nodes must see the same paths (shared file system) and have this package
    installed; otherwise a local Ray instance is started and shut down at the end. An already
    connected Ray (``ray.init`` by the caller) is used as is. strict (default ``cfg.strict``)
    raises :class:`Stage1StrictError` once the cache is complete if any sample was bad.
    Parts that still fail after ``cfg.ray.max_retries`` raise :class:`Stage1Error` after the
    others are committed.
    """
    strict = cfg.strict if strict is None else strict
    start = time.perf_counter()
    check_storage(cfg)  # an unusable URL is one line, before any base-model work
    built = _grown_from(cfg)
    if built is not None:  # grown by `tec cache extend` to targets.views: its K parts resume
        logger.info("cache %s was built with %d views and extended to %d or more: checking "
                    "its %d-view parts", cfg.cache, built, cfg.views, built)
        cfg = dataclasses.replace(cfg, views=built)
    geometry, fingerprint = _check_base_model(cfg, base)
    # actors (on any node) load exactly the weights fingerprinted here, or refuse
    base = dataclasses.replace(base, sha256=fingerprint["checkpoint_sha256"])
    writer, jobs = _prepare_cache(cfg, geometry, fingerprint, base)
    _record_config(cfg, base)
    summary = Stage1Summary(cache=_absolute(cfg.cache), backend=cfg.backend,
                            parts_total=len(writer.parts),
                            parts_skipped=len(writer.parts) - len(jobs))
    if summary.parts_skipped:
        logger.info("resuming: %d of %d parts already committed", summary.parts_skipped,
                    summary.parts_total)
    failed: list[tuple] = []  # (part, reason, deterministic)
    if jobs:
        results, failed, summary.ray_address = _run_on_ray(cfg, base, jobs, ray_address,
                                                           progress)
        for res in results:
            if res.already_committed:
                summary.parts_skipped += 1
                continue
            summary.parts_done += 1
            summary.images += res.images
            summary.views += res.views
            summary.forward_passes += res.forward_passes
    writer.finalize()
    _finish_summary(summary, cfg, writer, start)
    logger.info("stage 1 done:\n%s", summary.format())
    if failed:
        raise Stage1Error(failure_message(failed, summary.parts_total, cfg.ray.max_retries))
    if strict and summary.skipped:
        raise Stage1StrictError(
            f"strict: {summary.skipped} bad samples were skipped (listed in "
            f"{summary.bad_samples_report}); the cache is complete without them", summary
        )
    return summary


def task_failure(exc: BaseException) -> tuple[str, bool]:
    """(one-line reason, deterministic) of a failed shard task.

    Deterministic: the task raised a ValueError (a Stage1Error such as NonFiniteTargetsError,
    a CacheError, ...): the same inputs give the same error, so it is not retried and the
    message says what to change. Worker deaths and I/O errors (OSError) are transient.
    """
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ValueError) and not isinstance(cause, OSError):
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        return (lines[0] if lines else type(cause).__name__), True
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}", False


def failure_message(failed: list[tuple], parts_total: int, max_retries: int) -> str:
    """The one line stage 1 ends with when parts failed: [(part, reason, deterministic)]."""
    fixed = [f for f in failed if len(f) > 2 and f[2]]
    if fixed:
        part, reason = fixed[0][:2]
        return (f"{len(failed)} of {parts_total} parts failed, not retried (first: {part}: "
                f"{reason}); a rerun fails the same way until that is changed (the other parts "
                "are committed)")
    part, reason = failed[0][:2]
    return (f"{len(failed)} of {parts_total} parts failed after {max_retries} retries (first: "
            f"{part}: {reason}); the other parts are committed, rerun to resume")


def _grown_from(cfg: Stage1Config) -> int | None:
    """The K a cache was built with when `tec cache extend --views` grew it to at least
    ``cfg.views`` (> K) views; None otherwise (no cache there, or not grown that far)."""
    from storage import layout
    from storage.cache import EXTENSIONS_KEY
    from storage.objstore import as_root

    path = layout.manifest_path(as_root(cfg.cache))
    if not path.exists():
        return None
    manifest = layout.read_json(path, "manifest")
    base = int((manifest.get("spec") or {}).get("views", 0))
    total = max([base] + [int(e["views"][1]) for e in manifest.get(EXTENSIONS_KEY) or []
                          if isinstance(e, dict) and e.get("kind") == "views"])
    return base if base < cfg.views <= total else None


def check_storage(cfg: Stage1Config) -> None:
    """Configure ``targets.storage_options`` in this process and check that an object-store
    cache is reachable and writable and an object-store source reachable (StorageError, one line
    naming the URL: scheme not installed, endpoint unreachable, credentials refused, bucket
    missing). Local paths are left to the steps that use them."""
    from storage.objstore import check_location, configure, is_url

    configure(cfg.storage_options)
    check_location(cfg.cache, write=True, what="targets.cache")
    if cfg.source.kind == "imagefolder" and is_url(cfg.source.path):
        raise Stage1Error(f"targets.source.path: {cfg.source.path}: an image folder must be a "
                          "local (or mounted) folder; on object storage use WebDataset shards")
    if cfg.source.kind == "webdataset":
        for item in str(cfg.source.path).split("::"):
            check_location(item, what="targets.source.path")


def _check_base_model(cfg: Stage1Config, base: BaseModelConfig) -> tuple[dict, dict]:
    """Load the base model once on the driver: its geometry and fingerprint, checked against
    the config. Returns (describe_vit dict, manifest base_model fingerprint)."""
    from tec.teacher import describe_vit

    if not base.checkpoint and not base.pretrained:
        raise Stage1Error(
            "base_model.checkpoint: stage 1 needs the trained base model (a random one would "
            "fill the cache with meaningless targets); set it to an MAE/DINO/iBOT/timm checkpoint"
        )
    model = base.load()
    geometry = describe_vit(model)
    size = cfg.view_policy.output_size
    if size != geometry["img_size"]:
        raise Stage1Error(
            f"targets.view_policy.output_size {size} differs from the base model's img_size "
            f"{geometry['img_size']}; set targets.view_policy.output_size: {geometry['img_size']}"
        )
    if cfg.k_max > geometry["num_patches"]:
        raise Stage1Error(f"targets.k_max {cfg.k_max} exceeds the base model's "
                          f"{geometry['num_patches']} patches; lower targets.k_max")
    if cfg.last_n > geometry["depth"]:
        raise Stage1Error(f"targets.last_n {cfg.last_n} exceeds the base model's depth "
                          f"{geometry['depth']}; lower targets.last_n")
    return geometry, base.fingerprint(model, last_n=cfg.last_n, k_max=cfg.k_max)


def _prepare_cache(cfg: Stage1Config, geometry: dict, fingerprint: dict,
                   base: BaseModelConfig | None = None):
    """Create (or reopen, to resume) the cache; returns (writer, jobs of uncommitted parts)."""
    from stages.sources import unique_keys
    from storage import CacheSpec, create_cache

    source = _open_source(cfg.source.kind, cfg.source.path, cfg.source.shard_size)
    shards = [str(s) for s in source.shards()]
    if not shards:
        raise Stage1Error(f"targets.source.path: no input shards found at {cfg.source.path}")
    scans = [source.scan(s) for s in shards]  # (samples, keys) of each shard, headers only
    counts = [int(n) for n, _ in scans]
    names = part_names(shards)
    # keys repeated across shards (shards cut from separate folders) are qualified by part
    renames = unique_keys([keys for _, keys in scans], names)
    if any(renames):
        logger.info("%d sample keys repeat across shards; cached as <part>/<key>",
                    sum(len(r) for r in renames))
    policy = cfg.view_policy
    spec = CacheSpec(num_patches=geometry["num_patches"], channels=geometry["embed_dim"],
                     heads=geometry["num_heads"], k_max=cfg.k_max, views=cfg.views,
                     codec=cfg.codec, codec_params=cfg.codec_params or None,
                     backend=cfg.backend, pixels=cfg.pixels,
                     pixels_quality=cfg.pixels_quality,
                     image_size=policy.output_size if cfg.pixels != "none" else 0)
    precision = resolve_precision(cfg)
    extra = None
    from storage.objstore import as_root

    if base is not None and not (as_root(cfg.cache) / "manifest.json").exists():
        # a new cache: measure the target error of its codec and precision on the first samples
        from stages.target_error import measure_stage1_error

        extra = {"target_error": measure_stage1_error(cfg, base, spec, precision, source,
                                                      shards[0])}
    writer = create_cache(
        cfg.cache, spec, base_model=fingerprint, targets={"precision": precision}, extra=extra,
        view_policy={**policy.to_dict(), "views": cfg.views,
                     **({"first_view": cfg.first_view} if cfg.first_view else {})},
        source={"kind": cfg.source.kind, "path": cfg.source.path, "shards": shards,
                "num_samples": sum(counts)},
        parts=list(zip(names, counts)),
    )
    committed = writer.committed_parts()
    hooks = _test_hooks()
    # Workers may run elsewhere (another cwd, another node): give them absolute paths.
    wds = cfg.source.kind == "webdataset"
    jobs = [
        ShardJob(shard=_absolute(shard) if wds else shard, part=name, index=i, slots=count,
                 source_kind=cfg.source.kind,
                 source_path=cfg.source.path if wds else _absolute(cfg.source.path),
                 shard_size=cfg.source.shard_size, cache=_absolute(cfg.cache), views=cfg.views,
                 policy=policy.to_dict(), batch_size=cfg.batch_size,
                 max_in_flight=cfg.max_in_flight, hooks=hooks, renames=renames[i],
                 storage_options=dict(cfg.storage_options or {}), first_view=cfg.first_view)
        for i, (shard, name, count) in enumerate(zip(shards, names, counts))
        if name not in committed
    ]
    return writer, jobs


def resolve_precision(cfg: Stage1Config) -> str:
    """The precision stage 1 runs the base model at: ``targets.precision`` on a GPU, float32 on
    a CPU (this process decides; the actors use what it decided, so the manifest is true)."""
    import torch

    if cfg.precision != "float32" and not torch.cuda.is_available():
        return "float32"
    return cfg.precision


def _record_config(cfg: Stage1Config, base: BaseModelConfig) -> None:
    """Write CONFIG_NAME: the settings `tec cache repair` needs to recompute a part."""
    base_dict = to_dict(base)
    if base_dict.get("checkpoint"):
        base_dict["checkpoint"] = _absolute(base_dict["checkpoint"])
    from storage.objstore import Url, as_root

    path = as_root(cfg.cache) / CONFIG_NAME
    # the source path as configured (it is part of the cache's identity), resolved from cwd
    text = json.dumps({"targets": to_dict(cfg), "base_model": base_dict,
                       "cwd": os.getcwd()}, indent=2, sort_keys=True) + "\n"
    if isinstance(path, Url):  # one PUT replaces the object atomically
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _absolute(path) -> str:
    from storage.objstore import is_url

    if is_url(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


def _finish_summary(summary: Stage1Summary, cfg: Stage1Config, writer, start: float) -> None:
    """Aggregate the parts' bad-sample reports into REPORT_NAME and fill the totals."""
    from storage import inspect_cache

    from storage.objstore import Url, as_root

    root = as_root(cfg.cache)
    bad = _bad_samples(writer)
    report = root / REPORT_NAME
    text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in bad)
    if isinstance(report, Url):
        report.write_text(text)
    else:
        report.parent.mkdir(parents=True, exist_ok=True)
        tmp = report.with_name(report.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, report)
    summary.skipped = len(bad)
    summary.bad_reasons = dict(collections.Counter(_reason_kind(e.get("reason")) for e in bad))
    summary.bad_samples_report = str(report)
    summary.seconds = time.perf_counter() - start
    summary.images_per_s = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    info = inspect_cache(root)
    summary.cache_samples = int(info["samples"])
    summary.cache_bytes = int(info["bytes_total"])


def _bad_samples(writer) -> list[dict]:
    """The bad-sample reports of all committed parts, in part order (from the commit markers)."""
    from storage import layout

    bad = []
    for part in writer.parts:
        path = layout.marker_path(writer.root, part)
        if path.exists():
            for entry in layout.read_json(path, "commit marker").get("report") or []:
                bad.append({"part": part, **entry})
    return bad


def _reason_kind(reason) -> str:
    """'corrupt image data: OSError: ...' -> 'corrupt image data' (for the summary's tally)."""
    text = str(reason or "unknown")
    return text.split(":")[0].split(" (")[0].strip() or "unknown"
