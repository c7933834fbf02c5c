"""``tec cache extend CACHE --views K2 | --shards MORE``: grow a cache without touching it.

Views
-----

Views v in [K, K2) of every sample are computed by stage 1 (with the settings and base model the
cache was built with, ``<cache>/reports/stage1_config.json``, or a pipeline file's) into a *view
layer*: a complete cache of the same samples under ``<cache>/extensions/views-K-K2/`` whose view
policy starts at ``first_view: K``. View v of a sample is a pure function of (seed, key, v)
(stages.views.view_params), so the layer holds exactly the records a K2-view stage 1 would have
written for those views. Then the cache's manifest gains an ``extensions`` entry (path, views,
the layer's identity checksum, time, stage-1 figures): a section outside the cache's identity, so
every committed part and its marker stay valid and `tec cache verify` still passes.

Readers (storage.CacheReader) then see K2 views; ``open_cache(path, views=K)`` (and a run whose
``targets.views`` is K) reads exactly the records it read before. Interrupted, it resumes like
stage 1 (the layer's committed parts are kept); extending again adds the next layer.

Shards
------
``--shards MORE`` (a shard spec as ``data.train`` takes: a path, glob, brace list, folder or URL)
adds source shards: stage 1 computes one part per new shard, exactly the part a stage 1 over all
the shards writes for it (stages/stage1/grown.py checks that part names and the duplicate-key
policy leave every cached record as it is, and refuses shards the cache holds already), in the
cache and, for the views it holds, in each view layer. The manifest's ``extensions`` section
gains a ``shards`` entry (spec, shards, parts, sample count, times), outside the cache's
identity: the cache's parts and markers stay valid. The entry is written first as *pending*
(readers do not see its parts) and becomes complete when every new part is committed in the
cache and in its layers (CacheWriter.finalize), so a killed extension is resumed by running it
again. Readers then list the new parts after the cache's own; stage 2 configured with the old
shard list reads exactly the records it read before, with the grown list it reads all.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

__all__ = ["ExtendShardsSummary", "ExtendSummary", "extend_shards", "extend_views"]


@dataclass
class ExtendSummary:
    cache: str
    views_before: int
    views_after: int
    layer: str
    stage1: object = None  # stages.stage1.Stage1Summary of the layer

    def format(self) -> str:
        s = self.stage1
        return "\n".join([
            f"extended      {self.cache}: {self.views_before} -> {self.views_after} views "
            f"(views {self.views_before}..{self.views_after - 1} in {self.layer})",
            f"computed      {s.images} images, {s.views} views, {s.forward_passes} base-model "
            f"forward passes ({s.parts_skipped} layer parts already there)",
            "kept          every existing part as it was (a run with the old targets.views reads "
            "the same records)"])


def extend_views(path, views: int, *, config=None, ray_address: str | None = None,
                 progress: bool = True) -> ExtendSummary:
    """Add views [K, ``views``) to the complete cache at ``path`` (see the module docstring).

    config: a PipelineConfig whose targets/base_model to use instead of the recorded settings.
    Raises CacheError (one line) for views <= K, an incomplete cache, or a layer whose samples
    differ from the cache's (the source changed since it was built).
    """
    from stages.repair import _cwd, _stage1_settings
    from storage import layout, open_cache
    from storage.cache import EXTENSIONS_KEY, view_layer_mismatch
    from storage.objstore import Url, as_root
    from storage.schema import CacheError, manifest_identity

    root = as_root(path)
    if not isinstance(root, Url):
        root = root.resolve()
    if isinstance(views, bool) or not isinstance(views, int):
        raise CacheError(f"--views {views!r}: give the new number of views K2 (an integer)")
    reader = open_cache(root)  # complete, with the layers it already has
    before = reader.spec.views
    reader.close()
    if views <= before:
        raise CacheError(f"--views {views}: the cache {root} has {before} views already; give "
                         f"K2 > {before} (tec cache subset makes a copy with fewer)")
    _refuse_unfinished(root, reader.manifest)
    targets, base, cwd = _stage1_settings(root, config)
    rel = f"extensions/views-{before}-{views}"
    logger.info("extending %s: views %d..%d into %s", root, before, views - 1, rel)
    with _cwd(cwd):
        s1 = build_view_layer(root, reader.manifest, rel, before, views, targets, base,
                              ray_address=ray_address, progress=progress)
    layer = open_cache(root / rel)
    manifest = layout.read_json(layout.manifest_path(root), "manifest")
    entry = {"kind": "views", "path": rel, "views": [before, views],
             "identity": manifest_identity(layer.manifest),
             "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "images": s1.images, "forward_passes": s1.forward_passes}
    why = view_layer_mismatch(manifest, layer.manifest, before, views, entry)
    if why is None and (layer.parts != reader.parts or layer.keys != reader.keys):
        why = "its samples differ from the cache's: the source changed since the cache was built"
    layer.close()
    if why is not None:
        raise CacheError(f"cache {root}: the new view layer {rel} cannot extend it ({why}); "
                         f"delete {rel} and rebuild the cache")
    manifest[EXTENSIONS_KEY] = list(manifest.get(EXTENSIONS_KEY) or []) + [entry]
    layout.write_json_atomic(layout.manifest_path(root), manifest)
    return ExtendSummary(cache=str(root), views_before=before, views_after=views, layer=rel,
                         stage1=s1)


def _refuse_unfinished(root, manifest: dict) -> None:
    """CacheError when an extension by shards of the cache is unfinished."""
    from storage.cache import shard_entries
    from storage.schema import CacheError

    for entry in shard_entries(manifest, pending=True):
        if entry.get("status") != "complete":
            raise CacheError(f"cache {root} has an unfinished `tec cache extend --shards "
                             f"{entry.get('path')}`; rerun it to finish it first")


def grown_path(manifest: dict, *, pending: bool = False) -> str:
    """The shard spec of a cache's own shards and every shard it was extended with (with
    ``pending`` the unfinished extension's too), as stage 1 reads it ('::'-joined)."""
    from storage.cache import shard_entries

    return "::".join([str(manifest["source"]["path"])]
                     + [str(e["path"]) for e in shard_entries(manifest, pending=pending)])


def build_view_layer(root, manifest: dict, rel: str, start: int, stop: int, targets, base, *,
                     ray_address: str | None = None, progress: bool = True, hooks=None):
    """Compute (or resume) the view layer ``rel`` of the cache at ``root``: views [start, stop)
    of every sample the cache shows, with its settings ``targets`` / ``base``. The layer is a
    cache of the cache's own shards (same identity sections) and holds each of the cache's
    complete shard extensions, added one after the other as ``tec cache extend --shards`` adds
    them. Returns the last stage-1 summary. Runs in the cwd the settings are relative to."""
    from stages.stage1 import run_stage1
    from storage.cache import add_shard_extension, shard_entries

    layer_root = root / rel
    own = dataclasses.replace(targets.source, path=str(manifest["source"]["path"]))
    cfg = dataclasses.replace(targets, cache=str(layer_root), views=stop - start,
                              first_view=start, strict=False, source=own)
    s1 = run_stage1(cfg, base, ray_address=ray_address, strict=False, progress=progress,
                    hooks=hooks)
    for j, entry in enumerate(shard_entries(manifest), start=1):
        add_shard_extension(layer_root, entry)
        grown = dataclasses.replace(own, path="::".join(
            [own.path] + [str(e["path"]) for e in shard_entries(manifest)[:j]]))
        s1 = run_stage1(dataclasses.replace(cfg, source=grown), base, ray_address=ray_address,
                        strict=False, progress=progress, hooks=hooks)
    return s1


@dataclass
class ExtendShardsSummary:
    cache: str
    spec: str
    shards: int
    parts: list
    samples_before: int
    samples_after: int
    layers: int = 0
    stage1: object = None  # stages.stage1.Stage1Summary of the cache's new parts

    def format(self) -> str:
        s = self.stage1
        shown = ", ".join(self.parts[:5]) + (" ..." if len(self.parts) > 5 else "")
        lines = [
            f"extended      {self.cache}: {self.shards} shard(s) of {self.spec} added as "
            f"part(s) {shown}",
            f"samples       {self.samples_before} -> {self.samples_after}",
            f"computed      {s.images} images, {s.views} views, {s.forward_passes} base-model "
            f"forward passes in the cache" + (f" (and the views of {self.layers} view "
                                             f"layer(s))" if self.layers else ""),
            "kept          every existing part as it was (a run configured with the old shard "
            "list reads the same records)"]
        return "\n".join(lines)


def _absolute_spec(spec: str) -> str:
    """A shard spec with each local '::' item made absolute (the extension is recorded so)."""
    from storage.objstore import is_url

    items = [item for item in str(spec).split("::") if item]
    return "::".join(item if is_url(item) else os.path.abspath(os.path.expanduser(item))
                     for item in items)


def extend_shards(path, more: str, *, config=None, ray_address: str | None = None,
                  progress: bool = True, hooks=None) -> ExtendShardsSummary:
    """Add the source shards ``more`` to the complete cache at ``path`` (see the module
    docstring).

    config: a PipelineConfig whose targets/base_model to use instead of the recorded settings.
    hooks: stage-1 shard-task callbacks (fault injection in tests). Raises CacheError (one line)
    for shards the cache holds already, new shards whose part names or sample keys would change
    cached records, an image-folder cache, or an unfinished extension by other shards.
    """
    from stages.repair import _cwd, _stage1_settings
    from stages.sources import ShardSpecError, WebDatasetSource
    from stages.stage1 import Stage1Error, run_stage1
    from stages.stage1.grown import norm_shard
    from storage import layout, open_cache
    from storage.cache import EXTENSIONS_KEY, VIEWS_KIND, add_shard_extension, shard_entries
    from storage.objstore import Url, as_root
    from storage.schema import CacheError

    root = as_root(path)
    if not isinstance(root, Url):
        root = root.resolve()
    if not isinstance(more, str) or not more.strip(":"):
        raise CacheError(f"--shards {more!r}: give the new shards (a path, glob, brace list, "
                         "folder or URL, as data.train)")
    reader = open_cache(root)  # complete, checked against its markers
    manifest, samples_before = reader.manifest, reader.num_samples
    reader.close()
    if (manifest.get("source") or {}).get("kind", "webdataset") != "webdataset":
        raise CacheError(f"cache {root} was built from an image folder, which stage 1 cuts into "
                         "shards by its file list; adding images would cut it anew - build a "
                         "new cache (or use WebDataset shards)")
    entries = shard_entries(manifest, pending=True)
    pending = [e for e in entries if e.get("status") != "complete"]
    targets, base, cwd = _stage1_settings(root, config)
    spec = _absolute_spec(more)  # relative to the caller's cwd, not the settings'
    with _cwd(cwd):
        try:
            new = WebDatasetSource(spec).shards()
        except (ShardSpecError, FileNotFoundError) as exc:
            raise CacheError(f"--shards {more}: {exc}") from None
        if pending:
            entry = pending[0]
            if {norm_shard(s) for s in entry["shards"]} != {norm_shard(s) for s in new}:
                raise CacheError(f"cache {root} has an unfinished `tec cache extend --shards "
                                 f"{entry.get('path')}`; rerun it to finish it first")
            logger.info("resuming the extension of %s by %s", root, entry["path"])
        else:
            entry = _new_entry(root, manifest, more, spec, new, len(entries) + 1)
        # pending everywhere first (the cache's writer needs it), then computed: each view
        # layer's views, then the cache's own, whose finalize makes the extension complete
        entry = add_shard_extension(root, entry)
        layers = [e for e in manifest.get(EXTENSIONS_KEY) or []
                  if isinstance(e, dict) and e.get("kind") == VIEWS_KIND]
        for layer in layers:
            add_shard_extension(root / str(layer["path"]), entry)
        now = layout.read_json(layout.manifest_path(root), "manifest")
        source = dataclasses.replace(targets.source, path=grown_path(now, pending=True))
        logger.info("extending %s by %d shard(s) of %s", root, len(entry["shards"]), spec)
        for layer in layers:
            start, stop = (int(v) for v in layer["views"])
            run_stage1(dataclasses.replace(targets, cache=str(root / str(layer["path"])),
                                           views=stop - start, first_view=start, strict=False,
                                           source=source),
                       base, ray_address=ray_address, strict=False, progress=progress,
                       hooks=hooks)
        views = int(manifest["spec"]["views"])
        try:
            s1 = run_stage1(dataclasses.replace(targets, views=views, first_view=0,
                                                strict=False, source=source),
                            base, ray_address=ray_address, strict=False, progress=progress,
                            hooks=hooks)
        except Stage1Error as exc:
            raise CacheError(f"cache {root}: the extension by {more} is unfinished ({exc}); "
                             "rerun it to resume") from None
    done = next(e for e in shard_entries(layout.read_json(layout.manifest_path(root),
                                                          "manifest"), pending=True)
                if e.get("id") == entry["id"])
    if done.get("status") != "complete":
        raise CacheError(f"cache {root}: the extension by {more} is unfinished (a part or view "
                         "layer is missing); rerun it to resume")
    reader = open_cache(root)
    after = reader.num_samples
    reader.close()
    return ExtendShardsSummary(cache=str(root), spec=str(entry["path"]),
                               shards=len(entry["shards"]),
                               parts=[p["name"] for p in entry["parts"]],
                               samples_before=samples_before, samples_after=after,
                               layers=len(layers), stage1=s1)


def _new_entry(root, manifest: dict, more: str, spec: str, new: list[str], ident: int) -> dict:
    """The pending shard extension of ``new`` (checked; one line naming what is refused)."""
    from stages.sources import WebDatasetSource
    from stages.stage1 import Stage1Error
    from stages.stage1.grown import check_growth, history_steps, norm_shard
    from stages.stage1.shard import part_names
    from storage.schema import CacheError

    steps = history_steps(manifest)
    have = {norm_shard(s): part["name"] for shards, parts in steps
            for s, part in zip(shards, parts)}
    again = [s for s in new if norm_shard(s) in have]
    if again:
        raise CacheError(f"--shards {more}: shard {again[0]} is in cache {root} already (part "
                         f"{have[norm_shard(again[0])]}); give only shards it does not hold")
    source = WebDatasetSource(grown_path(manifest) + "::" + spec)
    shards = source.shards()
    if {norm_shard(s) for s in shards} != set(have) | {norm_shard(s) for s in new}:
        extra = next((s for s in shards if norm_shard(s) not in have
                      and norm_shard(s) not in {norm_shard(t) for t in new}), None)
        raise CacheError(f"cache {root}: its source {manifest['source'].get('path')} names "
                         f"other shards now than it was built from" + (
                             f" (first new one: {extra}; add it with --shards too)" if extra
                             else "") + "; restore the source")
    scans = [source.scan(s) for s in shards]  # headers only
    names = part_names(shards)
    index = {norm_shard(s): i for i, s in enumerate(shards)}
    parts = [{"name": names[index[norm_shard(s)]], "slots": int(scans[index[norm_shard(s)]][0])}
             for s in new]
    try:
        check_growth(steps + [(new, parts)], shards, scans)
    except Stage1Error as exc:
        raise CacheError(f"--shards {more}: {exc}") from None
    return {"kind": "shards", "id": ident, "path": spec, "shards": new,
            "num_samples": sum(p["slots"] for p in parts), "parts": parts,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
