"""The stage-2 input path at GPU rates: batched reads of a self-contained cache.

A micro-batch is built in one call (:meth:`BatchedTrainDataset.__getitems__`, which
``torch.utils.data.DataLoader`` calls with the whole list of :class:`stages.data.PlanItem` s)
instead of one Python call per sample plus a collate:

* cached views of a cache **with pixels** (``targets.pixels: jpeg | png``): the records are read
  with :meth:`storage.CacheReader.read_batch` (storage order, only the fields the step uses,
  blosc decoding straight into the batch arrays), each view's stored image is decoded into its
  row of one uint8 [B,S,S,3] array, and the targets stay in their stored form (float16, int8
  plus per-row scales, the lowrank codec's integer codes: storage.batch.device_payload):
  :func:`cached_to_device` dequantises them on the training device, so the CPU never builds
  float32 targets;
* fresh (online) views, and every view of a cache **without pixels**, go through the per-sample
  :class:`stages.data.TrainDataset` (decode the source image, render the view): today's path,
  kept bit-identical.

:class:`StreamingCacheDataset` is the streaming read pattern for WebDataset caches with pixels
(sequential reads of each part's view tar, a shuffle buffer); the trainer reads by random access.

The cache reader is opened once by the trainer and handed to the workers (it is picklable and
reopens its file handles lazily per process), so a worker does not re-open and re-check the
cache. :func:`loader_settings` chooses the DataLoader's workers, prefetch, persistence and pinned
memory from the machine (CPU cores per GPU) and logs the choice; each can be overridden in the
run's config.

Shapes: B micro-batch, S view side, L patches, C base-model width, H heads, R = k_max + 1 rows.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import Batch, DataError, PlanItem, ReplayMismatchError, TrainDataset, collate, mask_noise
from .views import View, ViewPolicy, view_params

logger = logging.getLogger(__name__)

__all__ = [
    "BatchedTrainDataset",
    "LoaderSettings",
    "cached_to_device",
    "loader_settings",
    "passthrough",
    "StreamingCacheDataset",
]


# ---------------------------------------------------------------------------------------------
# DataLoader settings


@dataclass(frozen=True)
class LoaderSettings:
    """What the trainer passes to torch.utils.data.DataLoader, and why (``reason``)."""

    workers: int
    prefetch_factor: int | None
    persistent_workers: bool
    pin_memory: bool
    reason: str

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(num_workers=self.workers, pin_memory=self.pin_memory,
                                   persistent_workers=self.persistent_workers)
        if self.workers > 0:
            out["prefetch_factor"] = self.prefetch_factor
        return out


def usable_cpus() -> int:
    """CPU cores this process may run on (affinity / cgroup aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_settings(device: torch.device, *, workers: int | None = None,
                    prefetch_factor: int | None = None, persistent_workers: bool | None = None,
                    pin_memory: bool | None = None, cpus: int | None = None,
                    local_ranks: int | None = None) -> LoaderSettings:
    """DataLoader settings from the machine; any argument given (not None) overrides the choice.

    GPU: the cores of this node are shared by its ranks (``LOCAL_WORLD_SIZE``); each rank keeps
    one core for its own loop and gives the rest to loader workers (at most 16: beyond that a
    worker mostly waits on the page cache), prefetch 4 batches per worker, persistent workers,
    pinned memory (batches copied to the GPU asynchronously). CPU: the training step itself
    uses the cores, so at most 2 workers (half the cores), prefetch 2, no pinned memory.
    """
    cpus = int(cpus or usable_cpus())
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_rank = max(1, cpus // max(1, local_ranks))
    if device.type == "cuda":
        auto_workers = min(16, max(1, per_rank - 1))
        auto_prefetch, auto_pin = 4, True
        why = f"{cpus} CPU cores / {local_ranks} GPU rank(s) on this node = {per_rank} per rank"
    else:
        auto_workers = min(2, max(0, per_rank // 2))
        auto_prefetch, auto_pin = 2, False
        why = f"CPU training on {per_rank} core(s): the step needs the cores"
    w = auto_workers if workers is None else int(workers)
    if w < 0:
        raise DataError(f"num_workers: must be >= 0, got {w}")
    pf = (auto_prefetch if prefetch_factor is None else int(prefetch_factor)) if w > 0 else None
    if pf is not None and pf < 1:
        raise DataError(f"prefetch_factor: must be >= 1, got {pf}")
    persistent = (w > 0) if persistent_workers is None else bool(persistent_workers) and w > 0
    pin = auto_pin if pin_memory is None else bool(pin_memory)
    if pin and device.type != "cuda":
        raise DataError("pin_memory: true needs a CUDA device (pinned memory is page-locked "
                        "host memory for asynchronous copies to the GPU); remove it")
    overridden = [name for name, v in (("num_workers", workers), ("prefetch_factor", prefetch_factor),
                                       ("persistent_workers", persistent_workers),
                                       ("pin_memory", pin_memory)) if v is not None]
    reason = why + (f"; set in the config: {', '.join(overridden)}" if overridden else "")
    return LoaderSettings(w, pf, persistent, pin, reason)


# ---------------------------------------------------------------------------------------------
# targets on the device


def cached_to_device(cached: dict[str, torch.Tensor], device: torch.device, *,
                     k: int | None = None) -> dict[str, torch.Tensor]:
    """A batch's cached target tensors (stored dtypes) -> float32 targets on ``device``.

    Accepts float16/float32 features [Bc,L,C] and attn_logits [Bc,H,R,L], or int8 ones with
    'features_scale' [Bc,L] and 'attn_logits_scale' [Bc,H,R] (dequantised here, on the device);
    attn_index [Bc,R-1] of any integer type becomes int64; or the lowrank codec's payload
    (storage.compact.unpack_payload): features = (u * u_scale) @ (v * v_scale) with u int8
    [Bc,L,r], v int8 [Bc,r,C], and attn_logits = attn_max - attn_codes * attn_step. k: keep the
    first k+1 attention rows and k indices. Returns features, feature_mean, feature_std (and
    attn_logits, attn_index), float32 / int64.
    """
    moved = {name: t.to(device, non_blocking=True) for name, t in cached.items()}
    out: dict[str, torch.Tensor] = {}
    if "features_u" in moved:  # lowrank payload
        a = moved.pop("features_u").float() * moved.pop("features_u_scale").float().unsqueeze(-2)
        b = moved.pop("features_v").float() * moved.pop("features_v_scale").float().unsqueeze(-1)
        out["features"] = torch.matmul(a, b)
        if "attn_codes" in moved:
            step = moved.pop("attn_step").float().unsqueeze(-1)
            out["attn_logits"] = (moved.pop("attn_max").float().unsqueeze(-1)
                                  - moved.pop("attn_codes").float() * step)
        for name in ("attn_codes", "attn_max", "attn_step"):
            moved.pop(name, None)
    for name, t in moved.items():
        if name.endswith("_scale"):
            continue
        scale = moved.get(f"{name}_scale")
        if scale is not None:
            t = t.float() * scale.float().unsqueeze(-1)
        elif t.is_floating_point():
            t = t.float()
        elif name == "attn_index":
            t = t.long()
        out[name] = t
    if k is not None and "attn_logits" in out:
        out["attn_logits"] = out["attn_logits"][:, :, : k + 1]
        out["attn_index"] = out["attn_index"][:, :k]
    return out


def passthrough(batch: Batch) -> Batch:
    """collate_fn for a dataset whose __getitems__ already returns a Batch."""
    return batch


# ---------------------------------------------------------------------------------------------
# the dataset


class BatchedTrainDataset(Dataset):
    """Map-style dataset whose ``__getitems__`` turns a micro-batch of PlanItems into a Batch.

    reader: the open storage.CacheReader (None: no cache). cache_index: int64 [N] plan sample ->
    cache sample (-1 missing). keys: [N] sample keys. items: the per-sample TrainDataset for
    fresh views and caches without pixels (None when the run reads no source). k: attention
    rows used; attention: read the attention target; check_views: compare every replayed view's
    recorded crop/flip with the view policy (a few tens of microseconds a view).
    Batch.images is uint8 [B,3,S,S] (channels-last memory when read from the cache's pixels).
    """

    def __init__(self, *, reader, cache_index: np.ndarray | None, keys: list[str],
                 policy: ViewPolicy, seed: int, num_patches: int, k: int, attention: bool,
                 items: TrainDataset | None, check_views: bool = True):
        self.reader = reader
        self.cache_index = None if cache_index is None else np.asarray(cache_index, np.int64)
        self.keys = keys
        self.policy = policy
        self.seed = seed
        self.num_patches = num_patches
        self.k = k
        self.attention = attention
        self.items = items
        self.check_views = check_views
        self.pixels = reader is not None and reader.spec.pixels != "none"
        if reader is not None:
            from storage.batch import fields_for

            self.fields = fields_for(reader.spec, attention=attention, views=True)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: PlanItem) -> Batch:
        return self.__getitems__([item])

    def __getitems__(self, items: list[PlanItem]) -> Batch:
        if not self.pixels:
            return collate([self._item(it) for it in items])
        start = time.perf_counter()
        fresh = {j: self._item(it) for j, it in enumerate(items) if it.fresh}
        skipped = [(r["key"], r["skip"]) for r in fresh.values() if "skip" in r]
        rows = [j for j in range(len(items)) if "skip" not in fresh.get(j, {})]
        cached_rows = [j for j in rows if not items[j].fresh]
        stored, samples = None, None
        if cached_rows:
            samples = self.cache_index[[items[j].index for j in cached_rows]]
            if (samples < 0).any():
                j = cached_rows[int(np.flatnonzero(samples < 0)[0])]
                raise DataError(f"sample {self.keys[items[j].index]!r} is planned as cached but is "
                                f"not in cache {self.reader.root}")
            views = np.array([items[j].view for j in cached_rows], dtype=np.int64)
            stored = self.reader.read_batch(samples, views, self.fields, pixels=True)
        return self.assemble(items, rows, cached_rows, samples, stored, fresh, skipped, start)

    def assemble(self, items, rows, cached_rows, samples, stored, fresh, skipped,
                 start: float) -> Batch:
        """The Batch of ``items[j] for j in rows``: cached rows from ``stored`` (stacked stored
        arrays of cache samples ``samples``, with 'pixels'), fresh rows from ``fresh`` (j ->
        TrainDataset item)."""
        size = self.policy.output_size
        images = torch.empty((len(rows), size, size, 3), dtype=torch.uint8)
        noise = torch.empty((len(rows), self.num_patches), dtype=torch.float32)
        cached: dict[str, torch.Tensor] = {}
        if cached_rows:
            if self.check_views:
                self._check_views(items, cached_rows, samples, stored)
            cached = self._targets(stored)
        position = {j: r for r, j in enumerate(rows)}
        from storage.pixels import decode_pixels

        images_np = images.numpy()
        for c, j in enumerate(cached_rows):
            r = position[j]
            decode_pixels(stored["pixels"][c], out=images_np[r])
            it = items[j]
            noise[r] = mask_noise(self.seed, it.epoch, it.index, self.num_patches)
        for j, res in fresh.items():
            if j in position:
                images[position[j]] = res["image"].permute(1, 2, 0)
                noise[position[j]] = res["noise"]
        batch = Batch(
            images=images.permute(0, 3, 1, 2),
            noise=noise,
            fresh=torch.tensor([items[j].fresh for j in rows], dtype=torch.bool),
            cached=cached,
            keys=[self.keys[items[j].index] for j in rows],
            views=[items[j].view for j in rows],
            indices=torch.tensor([items[j].index for j in rows], dtype=torch.int64),
            skipped=skipped,
        )
        batch.load_seconds = time.perf_counter() - start
        return batch

    def _item(self, item: PlanItem) -> dict[str, Any]:
        if self.items is None:
            raise DataError(f"sample {self.keys[item.index]!r} needs its source image (a fresh "
                            f"view, or a cache without pixels) but the run reads no source")
        return self.items[item]

    def _check_views(self, items, rows, samples, stored) -> None:
        crop, flip = stored["crop"], stored["flip"]
        for c, j in enumerate(rows):
            it = items[j]
            key = self.keys[it.index]
            h, w = self.reader.source_size(int(samples[c]))
            expected = view_params(self.policy, key, it.view, h, w)
            t, lft, hh, ww = (int(x) for x in crop[c])
            recorded = View(t, lft, hh, ww, bool(flip[c]))
            if recorded != expected:
                raise ReplayMismatchError(
                    f"cache {self.reader.root}: sample {key!r} view {it.view} was recorded as "
                    f"{recorded} on a {h}x{w} image, but the view policy gives {expected}; the "
                    "view code changed since stage 1 - rebuild the cache")

    def _targets(self, stored: dict) -> dict[str, torch.Tensor]:
        """Stacked stored arrays -> the batch's cached tensors (stored dtypes where the device
        dequantises, float16 from the codec's own CPU decoder otherwise)."""
        from storage.batch import device_payload

        payload = device_payload(self.reader.spec, {n: stored[n] for n in self.fields
                                                    if n not in ("crop", "flip")})
        if payload is not None:
            arrays = payload
        else:
            from storage.batch import decode_records

            decoded = decode_records(self.reader.spec, {n: stored[n] for n in self.fields})
            arrays = {n: decoded[n] for n in ("features", "feature_mean", "feature_std")}
            arrays["features"] = arrays["features"].astype(np.float16)
            if self.attention:
                arrays["attn_logits"] = decoded["attn_logits"].astype(np.float16)
                arrays["attn_index"] = decoded["attn_index"]
        return {n: torch.from_numpy(a) for n, a in arrays.items()}


# ---------------------------------------------------------------------------------------------
# streaming (WebDataset caches)


class StreamingCacheDataset(torch.utils.data.IterableDataset):
    """A self-contained WebDataset cache read as a stream: sequential reads and a shuffle buffer.

    Epoch e reads view ``(e + seed) % K`` of every sample (round robin: a streaming reader reads
    each part's ``view-<v>.tar`` front to back, 1/K of the cache; a uniform view choice would read
    every view's tar, K times the bytes). Parts are shuffled per epoch (seeded) and dealt to the
    ``world`` ranks and each rank's DataLoader workers; a shuffle buffer of ``shuffle_buffer``
    records mixes samples across parts. Yields Batches of ``batch_size`` (the last partial batch
    of each worker is dropped), built like BatchedTrainDataset's: pixels decoded, targets in their
    stored dtypes, the mask noise of (seed, epoch, sample). Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(self, reader, *, policy: ViewPolicy, seed: int, num_patches: int, k: int,
                 attention: bool, batch_size: int, shuffle_buffer: int = 1000, rank: int = 0,
                 world: int = 1, check_views: bool = True):
        if reader.spec.backend != "webdataset" or reader.spec.pixels == "none":
            raise DataError(f"cache {reader.root}: streaming needs a WebDataset cache with view "
                            f"pixels (this one: {reader.spec.backend}, pixels "
                            f"{reader.spec.pixels}); use random access (BatchedTrainDataset)")
        if shuffle_buffer < 1 or batch_size < 1:
            raise DataError("shuffle_buffer and batch_size must be >= 1")
        self.batched = BatchedTrainDataset(
            reader=reader, cache_index=np.arange(reader.num_samples), keys=reader.keys,
            policy=policy, seed=seed, num_patches=num_patches, k=k, attention=attention,
            items=None, check_views=check_views)
        self.reader, self.seed, self.batch_size = reader, seed, batch_size
        self.shuffle_buffer, self.rank, self.world = shuffle_buffer, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of_epoch(self, epoch: int) -> int:
        return (epoch + self.seed) % self.reader.spec.views

    def my_parts(self) -> list[str]:
        """This rank's and worker's parts of the epoch (every part exactly once over all)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rng = np.random.default_rng([self.seed, self.epoch, 3])
        parts = [self.reader.parts[i] for i in rng.permutation(len(self.reader.parts))]
        return parts[self.rank * workers + worker:: self.world * workers]

    def __iter__(self):
        from storage.batch import stream_view

        epoch, view = self.epoch, self.view_of_epoch(self.epoch)
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        rng = np.random.default_rng([self.seed, epoch, 4, self.rank, info.id if info else 0])
        buffer: list = []
        pending: list = []
        for part in self.my_parts():
            for sample, stored in stream_view(self.reader, part, view):
                buffer.append((sample, stored))
                if len(buffer) >= self.shuffle_buffer:
                    pending.append(buffer.pop(int(rng.integers(len(buffer)))))
                    if len(pending) == self.batch_size:
                        yield self._batch(pending, epoch, view)
                        pending = []
        rng.shuffle(buffer)
        for rec in buffer:
            pending.append(rec)
            if len(pending) == self.batch_size:
                yield self._batch(pending, epoch, view)
                pending = []

    def _batch(self, records: list, epoch: int, view: int) -> Batch:
        start = time.perf_counter()
        fields = self.batched.fields
        samples = np.array([s for s, _ in records], dtype=np.int64)
        stored = {name: np.stack([np.asarray(r[name]) for _, r in records]) for name in fields}
        stored["pixels"] = [r["pixels"] for _, r in records]
        items = [PlanItem(epoch, int(s), view, False) for s in samples]
        rows = list(range(len(items)))
        return self.batched.assemble(items, rows, rows, samples, stored, {}, [], start)
