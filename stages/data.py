"""Stage-2 data: which (sample, view) each rank trains on at every step, and the pixels/targets.

Pieces, each small and separately testable:

- :class:`SourceIndex` — random access to the source images: the tar shards are indexed once
  (member offsets via ``tarfile``), so a sample is read with one positional read; the index is
  saved next to the run and reused.
- :class:`SamplePlan` — for every epoch a deterministic permutation of the samples (from
  ``(seed, epoch)``) and, per sample, the cached view to replay (uniform or round-robin) or a
  *fresh* view ``v = K + epoch`` whose targets are computed online (probability
  ``online_fraction``, drawn from ``(seed, epoch, sample)``; forced for samples missing from the
  cache when a base model is configured, otherwise those samples are skipped and counted).
- :class:`PlanSampler` — the slice of an epoch a rank consumes, starting at a data position
  ``(epoch, step)``. Global step ``s`` always consumes ``items[s*B:(s+1)*B]`` of the epoch, split
  into ``accum`` micro-steps x ``world`` ranks, so ranks are disjoint and a resume skips exactly
  what was consumed.
- :class:`TrainDataset` — map-style: decodes the source image, renders the view with
  :func:`stages.views.render_view` (the crop/flip recorded in the cache, checked against
  :func:`stages.views.view_params` of the manifest's policy), reads the cached targets (k rows).
- :func:`collate` / :class:`Batch`, and :class:`TargetBuilder`, which turns a batch into the
  model's :class:`tec.model.TargetBatch` on the training device, running the base model for the
  fresh (online) rows.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from storage.util import LruCache

from .configs import stable_seed
from .views import View, ViewPolicy, render_view, view_params

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "DataError",
    "PlanSampler",
    "ReplayMismatchError",
    "SamplePlan",
    "SourceIndex",
    "TargetBuilder",
    "TrainDataset",
    "collate",
    "mask_noise",
]

_INDEX_VERSION = 3  # 3: keys repeated across shards are qualified (stages.sources.unique_keys)


class DataError(ValueError):
    """The training data cannot be used as configured (one line naming what and why)."""


class ReplayMismatchError(DataError):
    """A cached view's recorded crop/flip differs from the view policy's (pixels would differ)."""


# ---------------------------------------------------------------------------------------------
# Source index: random access to source images


def _index_tar(path: str) -> tuple[list[str], list[int], list[int], list[int]]:
    """(keys, data offsets, sizes, labels) of the readable samples of one tar shard, in tar order.

    The samples are :func:`stages.sources.group_tar_members`' (the grouping and image field of
    :class:`stages.sources.WebDatasetSource`, so keys match the cache's). Repeated keys and
    samples whose image is cut are left out (stage 1 reports them as bad samples); a cut label
    reads as -1. A file that is not a tar raises tarfile.TarError.
    """
    from .sources import _file_size, _open_shard, group_tar_members

    keys, offsets, sizes, labels = [], [], [], []
    with _open_shard(path) as raw:
        size = _file_size(raw)
        for group, _ in group_tar_members(raw, path, mark_damage=False, log=False):
            if group.error is not None:  # a repeated key
                continue
            image = group.fields[group.image_field]
            if image.offset_data + image.size > size:
                continue
            label = -1
            cls = group.fields.get("cls")
            if cls is not None and cls.offset_data + cls.size <= size:
                try:
                    label = int(_pread_file(raw, cls.size, cls.offset_data).decode("ascii").strip())
                except (UnicodeDecodeError, ValueError):
                    label = -1
            keys.append(group.key)
            offsets.append(image.offset_data)
            sizes.append(image.size)
            labels.append(label)
    return keys, offsets, sizes, labels


def _list_image_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    """(keys, relative files, labels) of an image folder, as stages.sources.ImageFolderSource."""
    from .sources import open_source

    source = open_source("imagefolder", root)
    files = source.keyed_files()  # the same listing and keys as stage 1
    base = Path(source.root)
    return ([key for key, _, _ in files], [str(base / rel) for _, rel, _ in files],
            [label for _, _, label in files])


def _unique_tar_keys(shards: Sequence[str]) -> list[dict[str, str | None]]:
    """The renames of stages.sources.unique_keys for these tar shards, as stage 1 made them."""
    from .sources import WebDatasetSource, unique_keys
    from .stage1 import part_names

    keys = [WebDatasetSource(shard).scan(shard)[1] for shard in shards]
    return unique_keys(keys, part_names(list(shards)))


def _pread_file(raw, n: int, offset: int) -> bytes:
    """n bytes at offset of an open shard without moving its position (tarfile's walk)."""
    if isinstance(raw, io.BufferedReader):  # a local file
        return os.pread(raw.fileno(), n, offset)
    position = raw.tell()
    try:
        raw.seek(offset)
        return raw.read(n)
    finally:
        raw.seek(position)


def _is_url(path) -> bool:
    from storage.objstore import is_url

    return is_url(path)


def _file_signature(path: str) -> list:
    if _is_url(path):  # an object: its size and version tag (ETag / modification time)
        from storage.objstore import Url, call

        url = Url(path)
        info = call(url, url.fs.info, url.key)
        tag = (info.get("ETag") or info.get("LastModified") or info.get("mtime")
               or info.get("created"))
        return [str(path), int(info.get("size") or 0), str(tag)]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _url_is_file(path: str) -> bool:
    from storage.objstore import Url

    return Url(path).is_file()


class SourceIndex:
    """Random access to source samples: tar shards (WebDataset) or image-folder files.

    keys: list[str] in source order; file: int32 [N] index into ``files`` (the tar shard, or
    the image file itself); offsets, sizes: int64 [N] byte range of the image; labels: int64
    [N] (-1 = none).
    """

    _MAX_OPEN = 64

    def __init__(self, files: Sequence[str], keys: list[str], file: np.ndarray,
                 offsets: np.ndarray, sizes: np.ndarray, labels: np.ndarray):
        self.files = [str(s) for s in files]
        self.keys = keys
        self.file = np.asarray(file, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._fds: LruCache[int, int] = LruCache(self._MAX_OPEN, os.close)  # per process

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, kind: str, shards: Sequence[str], *, root: str | None = None,
              threads: int = 8) -> SourceIndex:
        """Index a source: tar headers only for 'webdataset', a directory walk for 'imagefolder'."""
        if kind == "imagefolder":
            keys, files, labels = _list_image_folder(root)
            sizes = [os.path.getsize(f) for f in files]
            return cls(files, keys, np.arange(len(files)), np.zeros(len(files)), np.array(sizes),
                       np.array(labels))
        if kind != "webdataset":
            raise DataError(f"source.kind {kind!r} is not supported; use webdataset or imagefolder")
        for shard in shards:
            if not (_url_is_file(shard) if _is_url(shard) else os.path.isfile(shard)):
                raise FileNotFoundError(f"source shard {shard} does not exist")
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
            try:
                results = list(pool.map(_index_tar, shards))
            except tarfile.TarError as exc:
                raise DataError(
                    f"a source shard cannot be read as an uncompressed tar ({exc})"
                ) from None
        renames = _unique_tar_keys(shards)
        keys, file, offsets, sizes, labels = [], [], [], [], []
        for i, (k, o, s, lab) in enumerate(results):
            for key, offset, size, label in zip(k, o, s, lab):
                key = renames[i].get(key, key)
                if key is None:  # repeated across shards and its qualified key taken: bad
                    continue
                keys.append(key)
                file.append(i)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
        return cls(shards, keys, np.array(file), np.array(offsets), np.array(sizes),
                   np.array(labels))

    @classmethod
    def load_or_build(cls, kind: str, shards: Sequence[str], cache_file: str | Path | None = None,
                      *, root: str | None = None, write: bool = True) -> SourceIndex:
        """Reuse ``cache_file`` when it indexes exactly these files (path, size, mtime)."""
        shards = [str(s) for s in shards]
        signature = ([kind, os.path.abspath(root)] if kind == "imagefolder"
                     else [_file_signature(s) for s in shards])
        if cache_file is not None and Path(cache_file).is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    if meta.get("version") == _INDEX_VERSION and meta.get("signature") == signature:
                        return cls(z["files"].tolist(), z["keys"].tolist(), z["file_id"],
                                   z["offsets"], z["sizes"], z["labels"])
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable source index %s (%s)", cache_file, exc)
        t0 = time.perf_counter()
        index = cls.build(kind, shards, root=root)
        logger.info("indexed %d source samples in %.1f s", len(index), time.perf_counter() - t0)
        if cache_file is not None and write:
            index.save(cache_file, signature)
        return index

    def save(self, path: str | Path, signature: list) -> None:
        from storage.layout import atomic_file

        meta = {"version": _INDEX_VERSION, "signature": signature}
        with atomic_file(Path(path), "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), files=np.array(self.files, dtype=str),
                     keys=np.array(self.keys, dtype=str), file_id=self.file, offsets=self.offsets,
                     sizes=self.sizes, labels=self.labels)

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i`` (one positional read; safe in forked workers)."""
        f = int(self.file[i])
        if _is_url(self.files[f]):  # an object: one ranged GET
            from storage.objstore import Url

            data = Url(self.files[f]).read_range(int(self.offsets[i]), int(self.sizes[i]))
            if len(data) != int(self.sizes[i]):
                raise DataError(f"source object {self.files[f]} is shorter than its index says "
                                f"(sample {self.keys[i]!r}); delete the run's source_index folder")
            return data
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds.put(f, os.open(self.files[f], os.O_RDONLY))
        size = int(self.sizes[i])
        data = os.pread(fd, size, int(self.offsets[i]))
        if len(data) != size:
            raise DataError(f"source file {self.files[f]} is shorter than its index says "
                            f"(sample {self.keys[i]!r}); delete the run's source_index folder")
        return data

    def close(self) -> None:
        self._fds.clear()


# ---------------------------------------------------------------------------------------------
# Sample plan and sampler


@dataclass(frozen=True)
class PlanItem:
    """One planned sample: source index, view index, fresh (targets online / none) or cached."""

    epoch: int
    index: int
    view: int
    fresh: bool


class SamplePlan:
    """Deterministic per-epoch order and view choice (see the module docstring).

    cache_index: int64 [N] row of each source sample in the cache (-1 = missing), or None when
    no cache is read. views: K cached views per sample (0 without cache). needs_targets: False
    in pixel mode (every view is fresh, nothing is computed online). can_compute_online: a base
    model is available for fresh/missing samples.
    """

    def __init__(self, num_samples: int, *, cache_index: np.ndarray | None, views: int,
                 seed: int, online_fraction: float, view_selection: str = "uniform",
                 needs_targets: bool = True, can_compute_online: bool = False):
        self.num_samples = int(num_samples)
        self.views = int(views)
        self.seed = int(seed)
        self.online_fraction = float(online_fraction)
        self.view_selection = view_selection
        self.needs_targets = needs_targets
        use_cache = needs_targets and cache_index is not None and self.online_fraction < 1.0
        self.cache_index = np.asarray(cache_index, dtype=np.int64) if use_cache else None
        if needs_targets and not can_compute_online and self.cache_index is None:
            raise DataError("no target cache to read and no base model to compute targets online; "
                            "configure a cache or a base_model")
        self.all_fresh = (not needs_targets) or self.cache_index is None
        if self.cache_index is not None:
            self.missing = self.cache_index < 0
        else:
            self.missing = np.zeros(self.num_samples, dtype=bool)
        # Missing samples go online when a base model can compute their targets, else are skipped;
        # samples stage 1 reported as bad (cache_index -2, stages.records) are always skipped.
        self.skip = self.missing if not can_compute_online else np.zeros_like(self.missing)
        if self.cache_index is not None:
            self.skip = self.skip | (self.cache_index == -2)
        # no record and not reported bad (-1): counted as fallback_online when trained
        self.fallback = (self.cache_index == -1) if self.cache_index is not None else \
            np.zeros(self.num_samples, dtype=bool)
        self.eligible = np.flatnonzero(~self.skip)
        self.skipped_per_epoch = int(self.skip.sum())

    def __len__(self) -> int:
        """Samples trained on per epoch (before dropping the last partial batch)."""
        return len(self.eligible)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.eligible) // batch_size

    def epoch(
        self, epoch: int, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index int64 [M], view int64 [M], fresh bool [M]) for ``epoch`` in training order."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.eligible))
        index = self.eligible[order[:limit] if limit is not None else order]
        fresh_view = self.views + epoch
        if self.all_fresh:
            return index, np.full(len(index), fresh_view, np.int64), np.ones(len(index), bool)
        online = np.random.default_rng([self.seed, epoch, 1]).random(self.num_samples)
        fresh = (online[index] < self.online_fraction) | self.missing[index]
        if self.view_selection == "round_robin":
            cached_view = np.full(len(index), epoch % self.views, np.int64)
        else:
            cached_view = np.random.default_rng([self.seed, epoch, 2]).integers(
                0, self.views, self.num_samples)[index]
        return index, np.where(fresh, fresh_view, cached_view), fresh


class PlanSampler(Sampler):
    """Yields the :class:`PlanItem` s one rank consumes from data position ``(epoch, step)`` on.

    An epoch has ``steps`` optimizer steps of ``batch_size`` samples; step ``s`` consumes epoch
    items ``[s*B, (s+1)*B)`` laid out as [accum, world, micro], so this rank's micro-batch ``a``
    of step ``s`` is ``items[s*B + (a*world + rank)*micro : ... + micro]``.
    """

    def __init__(self, plan: SamplePlan, *, batch_size: int, accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0):
        if batch_size % (accum_steps * world_size):
            raise DataError(f"batch_size {batch_size} is not divisible by accum_steps x world size "
                            f"= {accum_steps} x {world_size}; change batch_size or accum_steps")
        self.plan = plan
        self.batch_size = batch_size
        self.accum = accum_steps
        self.world = world_size
        self.rank = rank
        self.micro = batch_size // (accum_steps * world_size)
        self.steps = plan.steps_per_epoch(batch_size)
        if self.steps < 1:
            raise DataError(f"only {len(plan)} usable samples, fewer than batch_size {batch_size}; "
                            "lower batch_size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(step)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum * self.micro

    def __iter__(self):
        index, view, fresh = self.plan.epoch(self.epoch, self.steps * self.batch_size)
        shape = (self.steps, self.accum, self.world, self.micro)
        pick = np.arange(self.steps * self.batch_size).reshape(shape)[
            self.start_step:, :, self.rank
        ]
        for p in pick.reshape(-1):
            yield PlanItem(self.epoch, int(index[p]), int(view[p]), bool(fresh[p]))


def mask_noise(seed: int, epoch: int, index: int, num_patches: int) -> torch.Tensor:
    """MAE masking noise [L] for one sample in one epoch: a pure function of (seed, epoch, sample),
    so masks do not depend on ranks, workers or resumes."""
    gen = torch.Generator().manual_seed(stable_seed("mask", seed, epoch, index))
    return torch.rand(num_patches, generator=gen)


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass
class CacheRead:
    """How to read targets from the cache (opened lazily in each worker process)."""

    path: str
    index: np.ndarray  # int64 [N] source sample -> cache sample (-1 = missing)
    k: int  # attention rows kept (k of k_max)
    attention: bool  # read the attention target
    half: bool  # ship features/logits as float16 (lossless for the float16 codec)


class TrainDataset(Dataset):
    """Map-style dataset over :class:`PlanItem` s -> one sample dict (see :func:`collate`).

    Output per item: image uint8 [3,S,S], noise float32 [L], and for cached items features
    [L,C], feature_mean [C], feature_std [C], attn_logits [H,k+1,L], attn_index [k] (int64).
    A source image that cannot be decoded yields ``{'skip': reason}``.
    """

    def __init__(self, source: SourceIndex, policy: ViewPolicy, *, seed: int, num_patches: int,
                 cache: CacheRead | None = None, check_views: bool = True):
        self.source = source
        self.policy = policy
        self.seed = seed
        self.num_patches = num_patches
        self.cache = cache
        self.check_views = check_views
        self._reader = None

    def __len__(self) -> int:
        return len(self.source)

    def reader(self):
        if self._reader is None:
            from storage import open_cache

            self._reader = open_cache(self.cache.path)
        return self._reader

    def use_reader(self, reader) -> None:
        """Read targets through an already open CacheReader (the trainer's): workers then get
        it with the dataset instead of re-opening and re-checking the cache each."""
        self._reader = reader

    def view_of(self, item: PlanItem, height: int, width: int) -> tuple[View, dict | None]:
        """The view to render and, for a cached item, its cache record."""
        key = self.source.keys[item.index]
        expected = view_params(self.policy, key, item.view, height, width)
        if item.fresh:
            return expected, None
        row = int(self.cache.index[item.index])
        # float16 codec: take the stored float16 arrays as they are (no float32 round trip)
        record = self.reader().read(row, item.view, decode=not self.cache.half)
        crop = [int(x) for x in np.asarray(record["crop"]).reshape(4)]
        recorded = View(crop[0], crop[1], crop[2], crop[3], bool(np.asarray(record["flip"]).item()))
        if self.check_views:
            size = [int(x) for x in np.asarray(record["source_size"]).reshape(-1)[:2]]
            if size != [height, width] or recorded != expected:
                raise ReplayMismatchError(
                    f"cache {self.cache.path}: sample {key!r} view {item.view} was recorded as "
                    f"{recorded} on a {size[0]}x{size[1]} image, but the view policy gives "
                    f"{expected} on the {height}x{width} source image; the source or the view "
                    "code changed since stage 1 - rebuild the cache")
        return recorded, record

    def __getitem__(self, item: PlanItem) -> dict[str, Any]:
        from .sources import BadSample, decode_image

        start = time.perf_counter()
        key = self.source.keys[item.index]
        out: dict[str, Any] = {"key": key, "index": item.index, "view": item.view,
                               "fresh": item.fresh}
        try:
            image = decode_image(self.source.read_bytes(item.index))
        except BadSample as exc:
            out["skip"] = str(exc) or type(exc).__name__
            out["load_seconds"] = time.perf_counter() - start
            return out
        view, record = self.view_of(item, image.shape[0], image.shape[1])
        out["image"] = render_view(image, view, self.policy.output_size, self.policy.interpolation)
        out["noise"] = mask_noise(self.seed, item.epoch, item.index, self.num_patches)
        if record is not None:
            out.update(self._targets(record))
        out["load_seconds"] = time.perf_counter() - start
        return out

    def _targets(self, record: dict) -> dict[str, torch.Tensor]:
        c = self.cache
        dtype = np.float16 if c.half else np.float32
        out = {
            "features": _tensor(record["features"], dtype),
            "feature_mean": _tensor(record["feature_mean"], np.float32),
            "feature_std": _tensor(record["feature_std"], np.float32),
        }
        if c.attention:
            out["attn_logits"] = _tensor(np.asarray(record["attn_logits"])[:, : c.k + 1], dtype)
            out["attn_index"] = _tensor(np.asarray(record["attn_index"])[: c.k], np.int64)
        return out


def _tensor(array, dtype) -> torch.Tensor:
    """A writable, contiguous torch copy-free view where possible (read-only arrays are copied)."""
    a = np.ascontiguousarray(array, dtype=dtype)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# Batches

_TARGET_KEYS = ("features", "feature_mean", "feature_std", "attn_logits", "attn_index")


@dataclass
class Batch:
    """One micro-batch of B samples (skipped samples removed).

    images: uint8 [B,3,S,S]; noise: float32 [B,L]; fresh: bool [B] (view drawn fresh: targets
    computed online, or none in pixel mode); cached: target tensors for the rows where ``fresh``
    is False, in row order (features [Bc,L,C], feature_mean/std [Bc,C], attn_logits
    [Bc,H,k+1,L], attn_index [Bc,k]); keys/views/indices per row; skipped: (key, reason) pairs;
    load_seconds: worker time spent producing the batch.
    """

    images: torch.Tensor
    noise: torch.Tensor
    fresh: torch.Tensor
    cached: dict[str, torch.Tensor]
    keys: list[str]
    views: list[int]
    indices: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    load_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        self.noise = self.noise.pin_memory()
        self.cached = {k: v.pin_memory() for k, v in self.cached.items()}
        return self


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack dataset items into a :class:`Batch` (items with 'skip' are dropped and listed)."""
    start = time.perf_counter()
    skipped = [(it["key"], it["skip"]) for it in items if "skip" in it]
    good = [it for it in items if "skip" not in it]
    load = sum(it.get("load_seconds", 0.0) for it in items)
    if not good:
        empty = torch.empty(0)
        return Batch(empty, empty, torch.empty(0, dtype=torch.bool), {}, [], [],
                     torch.empty(0, dtype=torch.int64), skipped, load)
    cached_items = [it for it in good if not it["fresh"]]
    cached = {}
    if cached_items:
        for name in _TARGET_KEYS:
            if name in cached_items[0]:
                cached[name] = torch.stack([it[name] for it in cached_items])
    batch = Batch(
        images=torch.stack([it["image"] for it in good]),
        noise=torch.stack([it["noise"] for it in good]),
        fresh=torch.tensor([it["fresh"] for it in good], dtype=torch.bool),
        cached=cached,
        keys=[it["key"] for it in good],
        views=[it["view"] for it in good],
        indices=torch.tensor([it["index"] for it in good], dtype=torch.int64),
        skipped=skipped,
    )
    batch.load_seconds = load + time.perf_counter() - start
    return batch


# ---------------------------------------------------------------------------------------------
# Targets on the training device


class TargetBuilder:
    """Batch -> :class:`tec.model.TargetBatch` on the device: cached rows from the batch, fresh
    rows from the base model (``extract_targets``, bf16 autocast when ``amp_dtype`` is set).

    k: attention rows the new model uses; mode: feature normalisation 'patch'|'channel'|'none'.
    """

    def __init__(self, *, base_model: torch.nn.Module | None, k: int, mode: str,
                 attention: bool, last_n: int = 2, k_max: int | None = None,
                 amp_dtype: torch.dtype | None = None):
        self.base_model = base_model
        self.k = k
        self.mode = mode
        self.attention = attention
        self.last_n = last_n
        self.k_max = k if k_max is None else k_max
        self.amp_dtype = amp_dtype

    def online(self, images: torch.Tensor):
        """tec.targets.Targets for normalised images [B,3,S,S] from the base model."""
        from tec.targets import extract_targets

        if self.base_model is None:
            raise DataError("a fresh view needs online targets but no base model is configured")
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            return extract_targets(self.base_model, images, last_n=self.last_n, k_max=self.k_max)

    def __call__(self, images: torch.Tensor, batch: Batch):
        """images: normalised float [B,3,S,S] on the device; returns TargetBatch."""
        from tec.model import TargetBatch
        from tec.targets import feature_target

        device = images.device
        fresh = batch.fresh.to(device)
        n_fresh = int(batch.fresh.sum())
        parts: dict[str, torch.Tensor] = {}
        if n_fresh == len(batch):
            t = self.online(images)
            parts = {"features": t.features, "feature_mean": t.feature_mean,
                     "feature_std": t.feature_std, "attn_logits": t.attn_logits[:, :, : self.k + 1],
                     "attn_index": t.attn_index[:, : self.k]}
        else:
            from .loader import cached_to_device

            # stored dtypes (float16, int8 + scales) become float32 targets here, on the device
            cached = cached_to_device(batch.cached, device, k=self.k)
            if n_fresh == 0:
                parts = cached
            else:
                t = self.online(images[fresh])
                online = {"features": t.features, "feature_mean": t.feature_mean,
                          "feature_std": t.feature_std,
                          "attn_logits": t.attn_logits[:, :, : self.k + 1],
                          "attn_index": t.attn_index[:, : self.k]}
                for name, value in cached.items():
                    full = value.new_empty((len(batch),) + tuple(value.shape[1:]))
                    full[~fresh] = value
                    full[fresh] = online[name].to(value.dtype)
                    parts[name] = full
        features = feature_target(parts["features"], parts["feature_mean"], parts["feature_std"],
                                  self.mode)
        if not self.attention:
            return TargetBatch(features=features)
        return TargetBatch(features=features, attn_logits=parts["attn_logits"],
                           attn_index=parts["attn_index"])


def index_digest(shards: Sequence[str]) -> str:
    """Short name for a source index file of these shards."""
    return hashlib.blake2b("\n".join(s if _is_url(s) else os.path.abspath(s)
                                     for s in shards).encode(),
                           digest_size=6).hexdigest()
