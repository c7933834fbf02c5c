"""Stage 1: precompute the base model's targets for K views of every image, with Ray.

The work is a chain of small stages, one Ray task per input shard::

    source shard -> decode -> K views (view_params) -> render_views (uint8 pixels)
        -> batches -> base-model actor (normalize_images, extract_targets) -> PartWriter -> commit

* The driver (:func:`run_stage1`) takes the base model described once per command
  (:func:`stages.resolve.resolve_base`; it resolves a BaseModelConfig itself), lists the source
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
import json
import logging
import os
import time

from stages.configs import BaseModelConfig, to_dict
from stages.resolve import ResolvedBase, Targets, as_resolved, check_run_against

from .cluster import _run_on_ray, failure_message
from .config import (
    CONFIG_NAME,
    REPORT_NAME,
    Stage1Config,
    Stage1Error,
    Stage1StrictError,
    Stage1Summary,
    _absolute,
    resolve_encode_on,
    resolve_precision,
)
from .grown import grown_layout
from .shard import ShardHooks, ShardJob, _open_source, part_names

logger = logging.getLogger("stages.stage1")


# ------------------------------------------------------------------------------ the driver
def run_stage1(cfg: Stage1Config, base: BaseModelConfig | ResolvedBase, *,
               ray_address: str | None = None, strict: bool | None = None, progress: bool = True,
               hooks: ShardHooks | None = None) -> Stage1Summary:
    """Fill ``cfg.cache`` with the base model's targets for ``cfg.views`` views of every sample.

    Resumes: parts already committed are skipped (a complete cache costs no forward pass and
    no Ray start). ray_address (else ``cfg.ray.address``, else $RAY_ADDRESS) joins an existing
    cluster, whose nodes must see the same paths (shared file system) and have this package
    installed; otherwise a local Ray instance is started and shut down at the end. An already
    connected Ray (``ray.init`` by the caller) is used as is. strict (default ``cfg.strict``)
    raises :class:`Stage1StrictError` once the cache is complete if any sample was bad.
    Parts that still fail after ``cfg.ray.max_retries`` raise :class:`Stage1Error` after the
    others are committed. hooks: callbacks every shard task calls (fault injection in tests;
    see :class:`ShardHooks`).
    """
    strict = cfg.strict if strict is None else strict
    start = time.perf_counter()
    check_storage(cfg)  # an unusable URL is one line, before any base-model work
    built = _grown_from(cfg)
    if built is not None:  # grown by `tec cache extend` to targets.views: its K parts resume
        logger.info("cache %s was built with %d views and extended to %d or more: checking "
                    "its %d-view parts", cfg.cache, built, cfg.views, built)
        cfg = dataclasses.replace(cfg, views=built)
    resolved = _check_base_model(cfg, base)
    # actors (on any node) load exactly the weights fingerprinted here, or refuse
    base = resolved.config
    writer, jobs = _prepare_cache(cfg, resolved, hooks=hooks)
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


def _check_base_model(cfg: Stage1Config, base: BaseModelConfig | ResolvedBase) -> ResolvedBase:
    """The base model, loaded and described once (unless ``base`` already is), checked against
    the stage-1 settings (view size, k_max, last_n)."""
    config = base.config if isinstance(base, ResolvedBase) else base
    if not config.checkpoint and not config.pretrained:
        raise Stage1Error(
            "base_model.checkpoint: stage 1 needs the trained base model (a random one would "
            "fill the cache with meaningless targets); set it to an MAE/DINO/iBOT/timm checkpoint"
        )
    resolved = as_resolved(base)
    check_run_against(resolved.geometry, Targets.of_stage1(cfg), error=Stage1Error)
    return resolved


def _prepare_cache(cfg: Stage1Config, base: ResolvedBase, hooks: ShardHooks | None = None,
                   *, measure_error: bool = True):
    """Create (or reopen, to resume) the cache; returns (writer, jobs of uncommitted parts).
    measure_error: measure the codec's target error on a new cache's first samples."""
    from stages.sources import unique_keys
    from storage import CacheError, CacheSpec, create_cache

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
    geometry = base.geometry
    manifest = _existing_manifest(cfg.cache)
    growth = grown_layout(manifest, shards, scans) if manifest is not None and \
        cfg.source.kind == "webdataset" else None
    if growth is not None:
        # the cache's own shards plus shards added by `tec cache extend --shards`: the cache
        # keeps its identity (its own source and parts), the added parts are its extensions'
        logger.info("cache %s: its shards and those of %d shard extension(s)", cfg.cache,
                    growth.steps)
        names, renames = growth.names, growth.renames
        cache_source, cache_parts = manifest["source"], [(p["name"], int(p["slots"]))
                                                         for p in manifest["parts"]]
    else:
        cache_source = {"kind": cfg.source.kind, "path": cfg.source.path, "shards": shards,
                        "num_samples": sum(counts)}
        cache_parts = list(zip(names, counts))
    policy = cfg.view_policy
    spec = CacheSpec(num_patches=geometry.num_patches, channels=geometry.embed_dim,
                     heads=geometry.num_heads, k_max=cfg.k_max, views=cfg.views,
                     codec=cfg.codec, codec_params=cfg.codec_params or None,
                     backend=cfg.backend, pixels=cfg.pixels,
                     pixels_quality=cfg.pixels_quality,
                     image_size=policy.output_size if cfg.pixels != "none" else 0)
    precision = resolve_precision(cfg)
    extra = None

    if measure_error and manifest is None:
        # a new cache: measure the target error of its codec and precision on the first samples
        from stages.target_error import measure_stage1_error

        extra = {"target_error": measure_stage1_error(cfg, base, spec, precision, source,
                                                      shards[0])}
    try:
        writer = create_cache(
            cfg.cache, spec, base_model=base.fingerprint(last_n=cfg.last_n, k_max=cfg.k_max),
            targets={"precision": precision}, extra=extra,
            view_policy={**policy.to_dict(), "views": cfg.views,
                         **({"first_view": cfg.first_view} if cfg.first_view else {})},
            source=cache_source, parts=cache_parts,
        )
    except CacheError as exc:
        raise CacheError(f"{exc}{_new_shards_hint(cfg, manifest, shards)}") from None
    committed = writer.committed_parts()
    import torch

    # this process's view; a Ray run decides again from the actors' resources (cluster.py)
    encode_on_device = resolve_encode_on(cfg, gpus=torch.cuda.is_available())
    # Workers may run elsewhere (another cwd, another node): give them absolute paths.
    wds = cfg.source.kind == "webdataset"
    jobs = [
        ShardJob(shard=_absolute(shard) if wds else shard, part=name, index=i, slots=count,
                 source_kind=cfg.source.kind,
                 source_path=cfg.source.path if wds else _absolute(cfg.source.path),
                 shard_size=cfg.source.shard_size, cache=_absolute(cfg.cache), views=cfg.views,
                 policy=policy.to_dict(), batch_size=cfg.batch_size,
                 max_in_flight=cfg.max_in_flight, hooks=hooks, renames=renames[i],
                 storage_options=dict(cfg.storage_options or {}), first_view=cfg.first_view,
                 encode_on_device=encode_on_device)
        for i, (shard, name, count) in enumerate(zip(shards, names, counts))
        if name not in committed
    ]
    return writer, jobs


def _new_shards_hint(cfg: Stage1Config, manifest: dict | None, shards: list[str]) -> str:
    """When the configured source holds every shard of the cache and more: how to add them."""
    from .grown import history_steps, norm_shard

    if manifest is None or cfg.source.kind != "webdataset":
        return ""
    have = {norm_shard(s) for step, _ in history_steps(manifest) for s in step}
    new = [s for s in shards if norm_shard(s) not in have]
    if not new or not have <= {norm_shard(s) for s in shards}:
        return ""
    return (f" - the source names {len(new)} shard(s) the cache does not hold (first: "
            f"{new[0]}); add them with `tec cache extend {cfg.cache} --shards SPEC`")


def _existing_manifest(cache: str) -> dict | None:
    """The manifest of the cache at ``cache``, None when there is none yet."""
    from storage import layout
    from storage.objstore import as_root

    path = layout.manifest_path(as_root(cache))
    return layout.read_json(path, "manifest") if path.exists() else None


def _record_config(cfg: Stage1Config, base: BaseModelConfig) -> None:
    """Write CONFIG_NAME: the settings `tec cache repair` needs to recompute a part."""
    base_dict = to_dict(base)
    if base_dict.get("checkpoint"):
        base_dict["checkpoint"] = _absolute(base_dict["checkpoint"])
    from storage import layout
    from storage.objstore import as_root

    path = as_root(cfg.cache) / CONFIG_NAME
    # the source path as configured (it is part of the cache's identity), resolved from cwd
    layout.write_json_atomic(path, {"targets": to_dict(cfg), "base_model": base_dict,
                                    "cwd": os.getcwd()}, style="sorted")


def _finish_summary(summary: Stage1Summary, cfg: Stage1Config, writer, start: float) -> None:
    """Aggregate the parts' bad-sample reports into REPORT_NAME and fill the totals."""
    from storage import inspect_cache, layout
    from storage.objstore import as_root

    root = as_root(cfg.cache)
    bad = _bad_samples(writer)
    report = root / REPORT_NAME
    layout.write_text_atomic(report, "".join(json.dumps(entry, sort_keys=True) + "\n"
                                             for entry in bad))
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
