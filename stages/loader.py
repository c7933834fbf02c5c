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
(sequential reads of each part's view tar, a shuffle buffer): the trainer's ``read: stream``.
``read: random`` (the default) reads micro-batches of the sample plan by random access.

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
    "make_loader",
    "passthrough",
    "shuffle_order",
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
    overridden = [name for name, v in (("num_workers", workers),
                                       ("prefetch_factor", prefetch_factor),
                                       ("persistent_workers", persistent_workers),
                                       ("pin_memory", pin_memory)) if v is not None]
    reason = why + (f"; set in the config: {', '.join(overridden)}" if overridden else "")
    return LoaderSettings(w, pf, persistent, pin, reason)


def make_loader(dataset, settings: LoaderSettings, *, sampler=None, batch_size: int | None = None,
                worker_init_fn=None) -> torch.utils.data.DataLoader:
    """The DataLoader of a stage-2 dataset with ``settings`` (pinned memory exactly when
    ``settings.pin_memory``: a CUDA device and not switched off in the config).

    dataset: a BatchedTrainDataset (map-style: ``sampler`` yields its PlanItems, ``batch_size``
    of them per call) or a StreamingCacheDataset (iterable: yields whole Batches). Batches are
    returned as the dataset built them (uint8 images, targets in stored dtypes); with pinned
    memory the loader's pin thread calls :meth:`stages.data.Batch.pin_memory` on them.
    """
    workers = settings.workers
    common = dict(collate_fn=passthrough, worker_init_fn=worker_init_fn if workers > 0 else None,
                  **settings.kwargs())
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=None, **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       drop_last=False, **common)


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


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer`` items emits a stream of ``n`` items:
    int64 [n] input positions in output order. Each arriving item enters the buffer; once it
    holds ``buffer`` items, a uniformly drawn one leaves; at the end of the stream the rest leave
    in a random order. A pure function of (n, buffer, rng): the stream's order is known before
    a byte is read (what a resume and the skipping of consumed records rely on)."""
    draws = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    held: list[int] = []
    t = 0
    for i in range(n):
        held.append(i)
        if len(held) >= buffer:
            j = int(draws[i] * len(held))
            held[j], held[-1] = held[-1], held[j]
            out[t] = held.pop()
            t += 1
    rest = np.array(held, dtype=np.int64)
    rng.shuffle(rest)
    out[t:] = rest
    return out


class StreamingCacheDataset(torch.utils.data.IterableDataset):
    """A self-contained WebDataset cache read as a stream (``read: stream`` in a run).

    One epoch, a pure function of (seed, epoch) and the layout (ranks, loader workers):

    * view: epoch e reads view ``e % K`` of every sample (view_selection: round_robin: a stream
      reads each part's ``view-<v>.tar`` front to back, 1/K of the cache; a uniform view choice
      would read every view's tar, K times the bytes);
    * order: the parts in a permutation seeded by (seed, epoch), each part's records in the
      order they lie in its tar: one sequence of the N samples, of which the first ``steps x
      B`` are used (B = batch_size x accum_steps x world, steps = N // B: the rest is dropped,
      as the random path drops the last partial batch), every sample at most once;
    * sharding: rank r takes the r-th contiguous range of ``steps x accum_steps`` micro-batches
      (every rank the same number of steps); within a rank micro-batch j belongs to stream
      ``j % W`` (W: the DataLoader's workers, at least 1), each stream a contiguous sub-range of
      the rank's, read sequentially through its own shuffle buffer of ``shuffle_buffer``
      records (seeded by (seed, epoch, rank, stream));
    * delivery: DataLoader worker w serves stream ``(w + J) % W``, J the micro-batches the rank
      consumed earlier in the epoch, so the DataLoader's round robin over its workers yields
      micro-batches J, J + 1, ... in order, also after a mid-epoch resume.

    A resume at (epoch, step) thus continues with exactly the samples, order and masks of the
    uninterrupted run (same ranks, workers and shuffle buffer): the shuffle buffer is replayed
    on record numbers (:func:`shuffle_order`, nothing read) and the records consumed before
    the resume are skipped with a seek, not read. Yields Batches of ``batch_size`` (the
    micro-batch) built like BatchedTrainDataset's: the stored pixels decoded, targets in their
    stored dtypes, the recorded view checked, the mask noise of (seed, epoch, sample). Use with
    ``DataLoader(batch_size=None)``; call :meth:`set_position` before each ``iter(loader)``
    (the position lives in shared memory, so persistent workers see it).
    """

    def __init__(self, reader, *, policy: ViewPolicy, seed: int, num_patches: int, k: int,
                 attention: bool, batch_size: int, shuffle_buffer: int = 1000, rank: int = 0,
                 world: int = 1, accum_steps: int = 1, check_views: bool = True):
        if reader.spec.backend != "webdataset" or reader.spec.pixels == "none":
            raise DataError(f"cache {reader.root}: streaming needs a WebDataset cache with view "
                            f"pixels (this one: {reader.spec.backend}, pixels "
                            f"{reader.spec.pixels}); use random access (BatchedTrainDataset)")
        if shuffle_buffer < 1 or batch_size < 1 or accum_steps < 1:
            raise DataError("shuffle_buffer, batch_size and accum_steps must be >= 1")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in [0, {world})")
        self.batched = BatchedTrainDataset(
            reader=reader, cache_index=np.arange(reader.num_samples), keys=reader.keys,
            policy=policy, seed=seed, num_patches=num_patches, k=k, attention=attention,
            items=None, check_views=check_views)
        self.reader, self.seed = reader, int(seed)
        self.batch_size, self.accum = int(batch_size), int(accum_steps)
        self.shuffle_buffer, self.rank, self.world = int(shuffle_buffer), int(rank), int(world)
        global_batch = self.batch_size * self.accum * self.world
        self.steps = reader.num_samples // global_batch
        if self.steps < 1:
            raise DataError(f"cache {reader.root} holds {reader.num_samples} samples, fewer than "
                            f"one batch of {global_batch}; lower batch_size")
        self.part_sizes = np.array([stop - start for start, stop in
                                    (reader.part_range(part) for part in reader.parts)],
                                   dtype=np.int64)
        # (epoch, step) of the next iteration, shared with the loader workers
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    def set_position(self, epoch: int, step: int = 0) -> None:
        """Start the next iteration at optimizer step ``step`` of ``epoch``."""
        if not 0 <= int(step) <= self.steps:
            raise ValueError(f"step {step} is not in [0, {self.steps}]")
        self._position[0], self._position[1] = int(epoch), int(step)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def view_of_epoch(self, epoch: int) -> int:
        return int(epoch) % self.reader.spec.views

    def stream_range(self, stream: int, streams: int) -> tuple[int, int]:
        """(first position, length) of one stream's samples in the epoch's sequence."""
        micro_batches = self.steps * self.accum  # per rank
        counts = [len(range(s, micro_batches, streams)) for s in range(streams)]
        start = self.rank * micro_batches * self.batch_size + self.batch_size * sum(counts[:stream])
        return start, counts[stream] * self.batch_size

    def segment(self, epoch: int, stream: int, streams: int) -> list[tuple[int, np.ndarray]]:
        """The stream's samples in reading order: (part index, part-local records in tar order)
        runs. Only the parts the stream reads are opened."""
        from storage.batch import view_order

        view = self.view_of_epoch(epoch)
        sizes = self.part_sizes
        perm = np.random.default_rng([self.seed, epoch, 3]).permutation(len(sizes))
        ends = np.cumsum(sizes[perm])
        start, length = self.stream_range(stream, streams)
        runs = []
        for p, end, size in zip(perm.tolist(), ends.tolist(), sizes[perm].tolist()):
            begin = end - size
            lo, hi = max(begin, start), min(end, start + length)
            if lo < hi:
                runs.append((p, view_order(self.reader, p, view)[lo - begin: hi - begin]))
        return runs

    def stream_batches(self, epoch: int, step: int, stream: int, streams: int):
        """The Batches of one stream from the rank's position (epoch, step) on."""
        from storage.batch import allocate, parse_record, stream_records

        view = self.view_of_epoch(epoch)
        runs = self.segment(epoch, stream, streams)
        n = sum(len(records) for _, records in runs)
        order = shuffle_order(n, self.shuffle_buffer,
                              np.random.default_rng([self.seed, epoch, 4, self.rank, stream]))
        skip = len(range(stream, step * self.accum, streams)) * self.batch_size
        wanted = np.zeros(n, dtype=bool)
        wanted[order[skip:]] = True

        def reads():
            first = 0
            for p, records in runs:
                mine = wanted[first: first + len(records)]
                positions = first + np.flatnonzero(mine)
                got = stream_records(self.reader, p, view, records[mine], parse=False,
                                     into=buffer_for)
                for position, (sample, data) in zip(positions.tolist(), got):
                    yield position, sample, data
                first += len(records)

        free: list[bytearray] = []  # read buffers of records already parsed, reused

        def buffer_for(n: int) -> memoryview:
            buf = free.pop() if free else bytearray()
            if len(buf) < n:
                buf = bytearray(n + n // 4)
            return memoryview(buf)[:n]

        source = reads()
        held: dict[int, tuple[int, memoryview]] = {}  # the shuffle buffer: records as read
        for b in range(skip, n, self.batch_size):
            start = time.perf_counter()
            positions = order[b: b + self.batch_size].tolist()
            for position in positions:
                while position not in held:
                    q, sample, data = next(source)
                    held[q] = (sample, data)
            samples = np.empty(len(positions), dtype=np.int64)
            stored = allocate(self.reader.spec, self.batched.fields, len(positions))
            stored["pixels"] = []
            for j, q in enumerate(positions):  # parsed one at a time into the batch arrays
                samples[j], data = held.pop(q)
                record = parse_record(self.reader, data)  # owns its memory: data is reused
                free.append(data.obj)
                for name in self.batched.fields:
                    stored[name][j] = record[name]
                stored["pixels"].append(record["pixels"])
            items = [PlanItem(epoch, int(s), view, False) for s in samples]
            rows = list(range(len(items)))
            yield self.batched.assemble(items, rows, rows, samples, stored, {}, [], start)

    def __iter__(self):
        from torch.utils.data import get_worker_info

        epoch, step = (int(x) for x in self._position.tolist())
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        yield from self.stream_batches(epoch, step, (worker + step * self.accum) % workers,
                                       workers)
