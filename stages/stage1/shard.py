"""The shard task (:func:`process_shard`): one source shard -> K views of each sample -> the
base-model actors (:class:`BaseModelActor`) -> one committed cache part."""
from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from stages.configs import BaseModelConfig
from stages.views import ViewPolicy

from .config import NonFiniteTargetsError, Stage1Error

logger = logging.getLogger("stages.stage1")


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

    def __call__(self, views: np.ndarray, encode: dict | None = None,
                 seeds: list[int] | None = None) -> dict[str, np.ndarray]:
        """views: uint8 [B,3,S,S] -> dict of numpy arrays: features [B,L,C], feature_mean and
        feature_std [B,C] (float32), attn_logits [B,H,k_max+1,L], attn_index [B,k_max] (int64).

        With ``float16`` (the cache's float16 codec) features and attn_logits come back rounded
        to float16, exactly what the cache stores, at half the bytes through the object store.

        encode: the lowrank codec's parameters to encode with, here on the actor's device
        (``storage.compact_torch``, targets.encode_on): features and attn_logits are replaced by
        the codec's stored arrays (~7x fewer bytes through the object store than float32
        targets) plus ``features_finite`` / ``attn_logits_finite`` (bool [B]) and ``encoder``.
        seeds: the dither seed of each view (``compact.record_seed``), for stochastic rounding.
        """
        import torch

        from tec.targets import extract_targets, normalize_images

        # Arrays from the object store are read-only; a uint8 copy is cheap.
        x = torch.from_numpy(np.array(views, dtype=np.uint8, copy=True)).to(self.device)
        x = normalize_images(x)
        with torch.autocast(device_type="cuda", dtype=self.autocast or torch.float16,
                            enabled=self.autocast is not None):
            targets = extract_targets(self.model, x, last_n=self.last_n, k_max=self.k_max)
        if encode is not None:
            return self._encoded(targets, encode, seeds)
        big = torch.float16 if self.float16 else torch.float32
        return {
            "features": targets.features.to(big).cpu().numpy(),
            "feature_mean": targets.feature_mean.float().cpu().numpy(),
            "feature_std": targets.feature_std.float().cpu().numpy(),
            "attn_logits": targets.attn_logits.to(big).cpu().numpy(),
            "attn_index": targets.attn_index.long().cpu().numpy(),
        }


    def _encoded(self, targets, params: dict, seeds) -> dict:
        """The lowrank codec's stored arrays of a batch, encoded on this actor's device."""
        from storage.compact_torch import encode_views, finite_views

        ok_features, ok_attn = finite_views(targets.features, targets.attn_logits)
        stored = encode_views(targets.features, targets.attn_logits, params, seeds=seeds,
                              finite=(ok_features, ok_attn))
        out = {name: t.cpu().numpy() for name, t in stored.items()}
        out.update(feature_mean=targets.feature_mean.float().cpu().numpy(),
                   feature_std=targets.feature_std.float().cpu().numpy(),
                   attn_index=targets.attn_index.long().cpu().numpy(),
                   features_finite=ok_features.cpu().numpy(),
                   attn_logits_finite=ok_attn.cpu().numpy(),
                   encoder=f"torch ({self.device.type})")
        return out


# ------------------------------------------------------------------------------ the shard task
class ShardHooks:
    """Callbacks a shard task calls at fixed points; this base class does nothing.

    Fault injection (the tests' crashes, slow batches, attempt counts) subclasses it and hands an
    instance to :func:`stages.stage1.run_stage1` (``hooks=``). It travels to the workers inside
    each :class:`ShardJob`, so an instance must pickle.
    """

    def attempt(self, job: ShardJob) -> None:
        """An attempt at ``job.part`` starts (the part is open, no sample read yet)."""

    def sample(self, job: ShardJob, slot: int) -> None:
        """Sample ``slot`` of the shard was read and is about to be decoded."""

    def batch(self, job: ShardJob) -> None:
        """A batch of views was submitted to a base-model actor."""


_NO_HOOKS = ShardHooks()


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
    hooks: ShardHooks | None = None  # fault injection (tests); None: no callbacks
    renames: dict = field(default_factory=dict)  # this shard's stages.sources.unique_keys
    storage_options: dict = field(default_factory=dict)  # targets.storage_options
    first_view: int = 0  # compute views first_view .. first_view + views - 1
    encode_on_device: bool = False  # lowrank: the actors encode (targets.encode_on, resolved)


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


_FINITE_CHECKED = ("features", "feature_mean", "feature_std", "attn_logits")


def _finite(out: dict, name: str) -> bool:
    """Whether an actor output's ``name`` is all finite (an encoding actor sends the flags)."""
    flags = out.get(f"{name}_finite")
    if flags is not None:
        return bool(np.asarray(flags).all())
    return bool(np.isfinite(out[name]).all())


class _SampleAssembler:
    """Collects per-view target rows (arriving in submission order) into per-sample records."""

    def __init__(self, views: int, write, part: str = ""):
        self.views = views
        self.write = write
        self.part = part
        self.pending: collections.deque = collections.deque()  # sample metas in row order
        self.rows: dict[str, list] = {}
        self.filled = 0  # rows of pending[0] received so far

    def expect(self, meta: dict) -> None:
        self.pending.append(meta)

    def add(self, out: dict) -> None:
        """One actor output: float targets, or the lowrank codec's stored arrays (+ encoder)."""
        out = dict(out)
        encoder = out.pop("encoder", None)
        bad = [k for k in _FINITE_CHECKED if not _finite(out, k)]
        if bad:
            key = self.pending[0]["key"] if self.pending else "?"
            raise NonFiniteTargetsError(
                f"part {self.part}: the base model gave non-finite targets (NaN/inf in "
                f"{', '.join(bad)}) for the views of sample {key!r} and those batched with it; a "
                "retry gives the same - check base_model.checkpoint (NaN or overflowing weights) "
                "and run stage 1 again once the base model gives finite outputs")
        n = len(out["attn_index"])
        start = 0
        while start < n:
            take = min(self.views - self.filled, n - start)
            for k, v in out.items():
                self.rows.setdefault(k, []).append(v[start:start + take])
            self.filled += take
            start += take
            if self.filled == self.views:
                meta = self.pending.popleft()
                record = {k: np.concatenate(rows) for k, rows in self.rows.items()}
                if encoder is not None:
                    record["encoder"] = encoder
                record.update(crop=meta["crop"], flip=meta["flip"],
                              source_size=meta["source_size"], label=meta["label"])
                if "pixels" in meta:
                    record["pixels"] = meta["pixels"]
                self.write(meta["slot"], meta["key"], record)
                self.rows = {}
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
    from storage.compact import record_seed

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
    stored_pixels = writer.spec.pixels
    remote = bool(actors) and hasattr(actors[0], "__ray_call__")  # Ray actor handles
    if remote:
        import ray

        fetch = ray.get
    else:
        def fetch(out):
            return out
    hooks = job.hooks or _NO_HOOKS

    try:
        part = writer.open_part(job.part)
    except PartCommittedError:  # committed since the check above
        return _committed_elsewhere(result, start)
    assembler = _SampleAssembler(job.views, part.write, job.part)
    in_flight: collections.deque = collections.deque()
    buffer: list[torch.Tensor] = []  # uint8 [K,3,S,S] per sample, not yet submitted
    buffered = 0
    calls = 0
    # lowrank encoded by the actors: they get the cache's codec parameters and, for stochastic
    # rounding, each view's dither seed (the writer's numpy encoder would draw the same)
    encode = _actor_encoding(job, writer.spec)
    seeds: list[int] = []  # dither seeds of the buffered views (stochastic rounding only)

    def submit(n: int) -> None:
        nonlocal buffer, buffered, calls, seeds
        batch = torch.cat(buffer).numpy()
        head, rest = batch[:n], batch[n:]
        buffer = [torch.from_numpy(rest)] if len(rest) else []
        buffered = len(rest)
        actor = actors[(job.index + calls) % len(actors)]
        calls += 1
        args = (head,) if encode is None else (head, encode, seeds[:n] if seeds else None)
        seeds = seeds[n:]
        in_flight.append(actor.__call__.remote(*args) if remote else actor(*args))
        result.forward_passes += 1
        result.views += len(head)
        hooks.batch(job)

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            assembler.add(fetch(in_flight.popleft()))

    hooks.attempt(job)
    keys_seen: set[str] = set()
    try:
        for slot, sample in enumerate(source.samples(job.shard)):
            if slot >= job.slots:
                raise Stage1Error(f"shard {job.shard} holds more than the {job.slots} samples "
                                  "counted when the cache was created; the source changed")
            hooks.sample(job, slot)
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
                meta["pixels"], pixels = stored_view_pixels(pixels, stored_pixels,
                                                             writer.spec.pixels_quality)
            assembler.expect(meta)
            if encode is not None and encode["rounding"] == "stochastic":
                seeds += [record_seed(key, v)
                          for v in range(job.first_view, job.first_view + job.views)]
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


def _actor_encoding(job: ShardJob, spec) -> dict | None:
    """The lowrank parameters the actors encode this part with, or None (the writer encodes)."""
    from storage.compact import NAME as LOWRANK

    if not job.encode_on_device:
        return None
    if spec.codec != LOWRANK:
        raise Stage1Error(f"part {job.part}: encoding on the base model's device is for codec "
                          f"{LOWRANK}, the cache's codec is {spec.codec}")
    return dict(spec.codec_params)


def stored_view_pixels(pixels, fmt: str, quality: int):
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
