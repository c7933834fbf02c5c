"""``tec cache subset``: a smaller copy of a complete cache with its first K' views, to share.

View v of a sample is a pure function of (seed, key, v) and every view is encoded on its own
(the lowrank codec seeds its dither with the view index), so the first K' views of a K-view
cache are exactly what stage 1 would have written for K' views. The copy takes their stored
arrays bit for bit (:meth:`storage.cache.PartWriter.write_stored`: nothing decoded or encoded
again), part by part with the usual atomic commits: a rerun skips committed parts (resume) and
``verify_cache`` passes on the result. The copy keeps the source's identity but for the number
of views (spec and view policy); its manifest carries over the source's history sections
(transcodes, measured target error, ...) and appends a ``subset`` step: the source's path, its
manifest sha256 and view count, the views kept, the time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import layout
from .cache import create_cache, grown_source, open_cache
from .objstore import as_root, resolved
from .schema import CacheError, build_manifest, stored_fields

log = logging.getLogger(__name__)

__all__ = ["subset_cache"]

# manifest keys that a new cache writes itself (the rest is history to carry over); the
# source's view layers (tec cache extend) are read into the copy, not referenced by it
_OWN_KEYS = frozenset({"created", "finalized", "subset", "extensions"})


def _history(manifest: dict, spec) -> dict:
    """The source manifest's sections that are neither identity nor bookkeeping."""
    identity = set(build_manifest(spec, base_model={}, view_policy={}, source={}, parts=[],
                                  codec_config={}))
    return {k: v for k, v in manifest.items() if k not in identity and k not in _OWN_KEYS}


def subset_cache(src: str | Path, dst: str | Path, *, views: int,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Copy the first ``views`` views of every record of complete cache ``src`` into ``dst``.

    Returns {parts_written, parts_skipped, records, manifest}. progress(part, done, total).
    """
    src, dst = as_root(src), as_root(dst)  # folders or object-store URLs
    if resolved(src) == resolved(dst):
        raise CacheError(f"subset: CACHE and OUT are the same path ({src}); write a new cache")
    reader = open_cache(src)  # complete, checked against its markers
    total = reader.spec.views
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) \
            or not 1 <= views <= total:
        raise CacheError(f"--views {views!r}: must be between 1 and the {total} views of {src}")
    spec = dataclasses.replace(reader.spec, views=int(views))
    m = reader.manifest
    manifest_sha = hashlib.sha256(layout.manifest_path(src).read_bytes()).hexdigest()
    step = {"source": resolved(src), "source_manifest_sha256": manifest_sha,
            "source_views": total, "views": int(views),
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    extra = _history(m, spec)
    extra["subset"] = list(m.get("subset") or []) + [step]
    writer = create_cache(dst, spec, base_model=m["base_model"],
                          view_policy={**m["view_policy"], "views": int(views)},
                          source=grown_source(m),  # shards added by extend: its own now
                          parts=[(p["name"], int(p["slots"])) for p in reader.part_entries],
                          targets=m.get("targets") or {}, extra=extra)
    if writer.manifest.get("subset", [{}])[-1].get("source") != step["source"]:
        raise CacheError(f"{dst} holds another cache with the same settings (not a subset of "
                         f"{src}); choose another OUT")
    fields = list(stored_fields(spec))
    committed = writer.committed_parts()
    written = skipped = records = 0
    for part in reader.parts:
        if part in committed:
            skipped += 1
            continue
        start, stop = reader.part_range(part)
        with writer.open_part(part) as pw:
            for i in range(start, stop):
                recs = [reader.read(i, v, decode=False) for v in range(spec.views)]
                stored = {name: np.stack([r[name] for r in recs]) for name in fields}
                if spec.pixels != "none":
                    stored["pixels"] = [r["pixels"] for r in recs]
                pw.write_stored(reader.slot_of(i), reader.keys[i], stored,
                                label=int(recs[0]["label"]),
                                source_size=tuple(int(x) for x in recs[0]["source_size"]))
                records += len(recs)
            pw.commit(report=reader.bad_samples(part))
        written += 1
        log.info("subset part %s (%d samples, %d of %d views)", part, stop - start, spec.views,
                 total)
        if progress is not None:
            progress(part, written + skipped, len(reader.parts))
    manifest = writer.finalize()
    reader.close()
    return {"parts_written": written, "parts_skipped": skipped, "records": records,
            "manifest": manifest}
