"""``tec cache extend CACHE --views K2``: grow a cache from K to K2 views without touching it.

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
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

__all__ = ["ExtendSummary", "extend_views"]


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
    from stages.stage1 import run_stage1
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
    targets, base, cwd = _stage1_settings(root, config)
    rel = f"extensions/views-{before}-{views}"
    layer_cfg = dataclasses.replace(targets, cache=str(root / rel), views=views - before,
                                    first_view=before, strict=False)
    logger.info("extending %s: views %d..%d into %s", root, before, views - 1, rel)
    with _cwd(cwd):
        s1 = run_stage1(layer_cfg, base, ray_address=ray_address, strict=False,
                        progress=progress)
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
