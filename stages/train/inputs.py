"""Resolving what a run trains on (:func:`resolve_inputs` -> :class:`RunInputs`): cache manifest,
base model, view policy and source, checked against each other with one-line refusals."""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.configs import BaseModelConfig
from stages.data import (
    SourceIndex,
    index_digest,
)
from stages.resolve import BaseGeometry, ResolvedBase, Targets, as_resolved, check_run_against
from stages.views import ViewPolicy
from storage.util import first_line

from .config import CacheMismatchError, TrainConfig, TrainSetupError
from .dist import DistEnv

logger = logging.getLogger("stages.train")


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
    base_model: nn.Module | None = None  # the run's copy of the base model (online targets)
    base: ResolvedBase | None = None  # the base model's description (None: not used)
    source_index: SourceIndex | None = None  # None: a self-contained cache, no source read
    cache_reader: Any = None  # the open storage.CacheReader (handed to the loader workers)
    # of a cache grown by `tec cache extend --shards`: the shard extensions the run reads
    shard_extensions: int | None = None




def _expand_source(source) -> tuple[str, list[str], str | None]:
    """(kind, shard ids, image-folder root or None) of a SourceConfig-like object (kind, path)."""
    from stages.sources import open_source

    kind = getattr(source, "kind", "webdataset")
    path = getattr(source, "path", None)
    if not path:
        raise TrainSetupError("source.path: no source images configured; set source.path")
    shards = [str(s) for s in open_source(kind, path).shards()]
    return kind, shards, (str(path) if kind == "imagefolder" else None)


def _same_files(a: list[str], b: list[str]) -> bool:
    return [os.path.realpath(x) for x in a] == [os.path.realpath(x) for x in b]


def _open_cache_checked(cache: str, base: ResolvedBase | None, views: int | None = None,
                        shard_extensions: int | None = None):
    """Open a complete cache and check it belongs to this run's base model (schema, base model
    fingerprint, manifest identity)."""
    from storage import CacheError, open_cache
    from storage.objstore import as_root, check_location

    check_location(str(cache), what="cache")
    if not as_root(cache).exists():
        raise FileNotFoundError(f"cache: target cache {cache} does not exist; run stage 1 first")

    def refuse(exc: CacheError) -> CacheMismatchError:
        message = first_line(exc)
        return CacheMismatchError(message if str(cache) in message else f"cache {cache}: {message}")

    try:
        # the manifest's identity checksum is checked after the base model, so that a cache of
        # another base model is named as such
        reader = open_cache(cache, check_identity=False, views=views,
                            shard_extensions=shard_extensions)
        if base is not None:
            cached_base = reader.manifest.get("base_model", {})
            reader.check_base_model(base.fingerprint(
                last_n=int(cached_base.get("last_n", 2)),
                k_max=int(cached_base.get("k_max", reader.spec.k_max))))
        reader.check_manifest_identity()
    except CacheError as exc:
        raise refuse(exc) from None
    return reader


def resolve_inputs(run: TrainConfig, *, cache: str | None, source,
                   base: BaseModelConfig | ResolvedBase | None,
                   view_policy: ViewPolicy | None, device: torch.device,
                   out_dir: Path, dist: DistEnv, cache_views: int | None = None) -> RunInputs:
    """Decide the model config, view policy, shards and target sources; refuse mismatches.

    base: the base model (resolved here when given as a BaseModelConfig and the run needs it).
    """
    needs_targets = run.model.target == "tec"
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
    base = as_resolved(base)
    # the run's own copy, on the CPU until the trainer knows it is needed (it may move it)
    base_model = copy.deepcopy(base.model) if base is not None else None

    reader = None
    views, k_max, last_n, codec = 0, None, 2, None
    grown, grown_shards = None, None
    if cache is not None:
        grown, grown_shards = shards_in_use(str(cache), source)
        reader = _open_cache_checked(str(cache), base, cache_views, grown)
        _check_read_mode(run, reader, cache)
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
        if reader.shard_extensions:  # the cache's shards and those it was extended with
            # in source order, as a stage 1 over all of them lists them (samples line up)
            shards = grown_shards if grown_shards is not None else sorted(reader.shards)
        # a self-contained run reads no source: the configured one is neither read nor checked
        if source is not None and getattr(source, "path", None) and not _self_contained(
                reader, run, needs_targets):
            if getattr(source, "kind", kind) != kind:
                raise CacheMismatchError(
                    f"cache {cache} was built from a {kind!r} source, the run configures "
                    f"{source.kind!r}; use the source the cache was built from")
            if grown is not None:  # checked against the cache's shards by shards_in_use
                same, what = True, ""
            elif kind == "imagefolder":
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
        targets = Targets.of_cache(reader, str(cache))
        geometry = base.geometry if base is not None else BaseGeometry.recorded(
            cached_base, spec, policy.output_size)
    else:
        kind, shards, root = _expand_source(source) if source is not None else (None, None, None)
        if shards is None:
            raise TrainSetupError(f"run {run.name}: no cache and no source; configure source.path")
        geometry = base.geometry if base is not None else None
        policy = view_policy or (ViewPolicy(output_size=geometry.img_size) if geometry
                                 else ViewPolicy())
        policy.validate()
        targets = Targets(view_size=policy.output_size, key="")  # the run's own views
    model_cfg = check_run_against(geometry, targets, run.model, error=CacheMismatchError)

    if reader is not None and _self_contained(reader, run, needs_targets):
        logger.info("run %s: cache %s stores the view pixels (%s); no source image is read",
                    run.name, cache, reader.spec.pixels)
        return RunInputs(model_cfg=model_cfg, policy=policy, shards=shards, source_kind=kind,
                         cache_path=str(cache), cache_index=np.arange(reader.num_samples),
                         views=views, k_max=k_max, last_n=last_n, codec=codec,
                         base_model=base_model, base=base, source_index=None,
                         cache_reader=reader, shard_extensions=reader.shard_extensions)
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
        from stages.records import (
            MissingRecordsError,
            check_missing,
            match_records,
            sample_parts,
        )

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
                     codec=codec, base_model=base_model, base=base,
                     source_index=source_index, cache_reader=reader,
                     shard_extensions=reader.shard_extensions if reader is not None else None)


def shards_in_use(cache: str, source) -> tuple[int | None, list[str] | None]:
    """Of a cache grown by `tec cache extend --shards`: (the shard extensions the configured
    ``source`` names, its shards in source order or None), so that a run configured with the old
    shard list reads what it read before and one with the grown list reads every sample;
    (None, None) for another cache or no configured source (every sample). CacheMismatchError
    (one line) for a source that is not the cache's shards plus some of those added."""
    import json

    from stages.stage1.grown import source_prefix
    from storage.objstore import as_root

    path = as_root(cache) / "manifest.json"
    if source is None or not getattr(source, "path", None) or not path.is_file():
        return None, None  # open_cache reports a missing manifest
    try:
        manifest = json.loads(path.read_text())
        return source_prefix(manifest, getattr(source, "kind", "webdataset"), str(source.path))
    except ValueError as exc:
        raise CacheMismatchError(f"cache {cache}: {first_line(exc)}") from None
    except (KeyError, TypeError, AttributeError):
        return None, None  # a malformed manifest: open_cache names the problem


def _self_contained(reader, run: TrainConfig, needs_targets: bool) -> bool:
    """Whether the run trains from the cache alone: the cache stores the view pixels and every
    sample is a cached view (online_fraction 0). Fresh views need the source images."""
    return reader.spec.pixels != "none" and needs_targets and run.online_fraction == 0.0


def _check_read_mode(run: TrainConfig, reader, cache) -> None:
    """``read: stream`` needs a self-contained WebDataset cache (one line naming the key)."""
    if getattr(run, "read", "random") != "stream":
        return
    spec = reader.spec
    if spec.backend != "webdataset":
        raise TrainSetupError(
            f"read: stream reads WebDataset caches; cache {cache} is {spec.backend}, which is "
            "read by random access - set read: random")
    if spec.pixels == "none":
        raise TrainSetupError(
            f"read: stream needs a self-contained cache, but cache {cache} stores no view pixels "
            "(targets.pixels: none) - set read: random, or rebuild the cache with "
            "targets.pixels: jpeg")


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
            "pixels (targets.pixels: none), so stage 2 renders every view from the source - "
            "restore the source, or rebuild the cache with targets.pixels: jpeg to train without "
            "it")


# ---------------------------------------------------------------------------------------------
# The trainer
