"""``tec cache transcode``: re-encode a complete cache with another codec, without the base model.

Every record of SRC is decoded to float32 and written to DST with the new codec (and, if asked,
another backend), part by part: DST's parts commit atomically like stage 1's, a rerun skips the
committed ones (resume), and ``verify_cache`` passes on the result. DST keeps SRC's identity
(base model, view policy, source, parts, stage-1 precision) but for the spec (a cache grown by
``tec cache extend`` becomes a flat one of all its views and shards); its manifest records
the chain of transcodes (``transcode``: source, codecs, time, the error against the source on the
first records, and a warning when a lossy cache was re-encoded into another lossy codec, whose
errors add up).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .cache import create_cache, grown_source, open_cache
from .objstore import as_root, resolved
from .schema import CODECS, CacheError, CacheSpec

log = logging.getLogger(__name__)

LOSSY = ("int8", "lowrank")
ERROR_RECORDS = 16


def lossy_chain_warning(src: CacheSpec, dst: CacheSpec) -> str | None:
    """The warning for re-encoding lossy targets into another lossy codec (None if not)."""
    if src.codec in LOSSY and dst.codec in LOSSY and \
            (src.codec, src.codec_params) != (dst.codec, dst.codec_params):
        return (f"lossy {src.codec} targets re-encoded as {dst.codec}: the two codecs' errors add "
                f"up; transcode from a float16 cache to get {dst.codec}'s own error only")
    return None


def transcode_cache(src: str | Path, dst: str | Path, *, codec: str,
                    codec_params: dict | None = None, backend: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Re-encode cache ``src`` into ``dst`` with ``codec`` (and ``backend``); returns a summary
    {parts_written, parts_skipped, records, warning, manifest}. progress(part, done, total)."""
    if codec not in CODECS:
        raise CacheError(f"--codec {codec!r} is not one of {', '.join(CODECS)}")
    src, dst = as_root(src), as_root(dst)  # folders or object-store URLs
    if resolved(src) == resolved(dst):
        raise CacheError(f"transcode: SRC and DST are the same path ({src}); write a new cache")
    reader = open_cache(src)  # complete, checked against its markers
    spec = dataclasses.replace(reader.spec, codec=codec, codec_params=codec_params or None,
                               backend=backend or reader.spec.backend)
    m = reader.manifest
    warning = lossy_chain_warning(reader.spec, spec)
    if warning:
        log.warning("%s", warning)
    step = {"source": resolved(src), "from_codec": reader.spec.codec,
            "from_params": reader.spec.codec_params, "to_codec": spec.codec,
            "to_params": spec.codec_params, "at": datetime.now(timezone.utc).isoformat(
                timespec="seconds"), "warning": warning}
    step["error_vs_source"] = _error_vs_source(reader, spec)
    extra = {"transcode": list(m.get("transcode") or []) + [step]}
    if m.get("target_error") is not None:
        extra["source_target_error"] = m["target_error"]  # of the source's codec and precision
    writer = create_cache(dst, spec, base_model=m["base_model"],
                          view_policy={**m["view_policy"], "views": spec.views},  # grown: K2
                          source=grown_source(m),  # shards added by extend: its own now
                          parts=[(p["name"], int(p["slots"])) for p in reader.part_entries],
                          targets=m.get("targets") or {}, extra=extra)
    if writer.manifest.get("transcode", [{}])[-1].get("source") != step["source"]:
        raise CacheError(f"{dst} holds a transcode of another cache; choose another DST")
    committed = writer.committed_parts()
    written = skipped = records = 0
    for part in reader.parts:
        if part in committed:
            skipped += 1
            continue
        start, stop = reader.part_range(part)
        marker = reader._markers[part]
        with writer.open_part(part) as pw:
            for i in range(start, stop):
                recs = [reader.read(i, v) for v in range(reader.spec.views)]
                pw.write(reader.slot_of(i), reader.keys[i], _view_records(recs))
                records += len(recs)
            pw.commit(report=marker.get("report") or [])
        written += 1
        log.info("transcoded part %s (%d samples)", part, stop - start)
        if progress is not None:
            progress(part, written + skipped, len(reader.parts))
    manifest = writer.finalize()
    reader.close()
    return {"parts_written": written, "parts_skipped": skipped, "records": records,
            "warning": warning, "manifest": manifest}


def _view_records(recs: list[dict]) -> dict:
    """K decoded records of one sample -> the view_records PartWriter.write takes."""
    out = {name: np.stack([r[name] for r in recs]) for name in
           ("features", "feature_mean", "feature_std", "attn_logits", "attn_index", "crop")}
    out["flip"] = np.array([bool(r["flip"]) for r in recs])
    out["source_size"] = tuple(int(x) for x in recs[0]["source_size"])
    out["label"] = int(recs[0]["label"])
    if "pixels" in recs[0]:  # a self-contained cache keeps its view pixels
        out["pixels"] = [r["pixels"] for r in recs]
    return out


def _error_vs_source(reader, spec: CacheSpec) -> dict | None:
    """Feature relative RMS and attention-logit RMS of the new codec against the source's
    decoded records, on the first records (what the transcode itself adds)."""
    from .codecs import decode_view, prepare_views

    one = dataclasses.replace(spec, views=1)
    num = den = attn = 0.0
    count = n = 0
    for i in range(min(reader.num_samples, ERROR_RECORDS)):
        for v in range(reader.spec.views):
            rec = reader.read(i, v)
            view = {k: np.asarray(rec[k])[None] for k in ("features", "feature_mean",
                                                          "feature_std", "attn_logits",
                                                          "attn_index", "crop")}
            view.update(flip=np.asarray(rec["flip"])[None], source_size=(1, 1))
            stored, _ = prepare_views(one, reader.keys[i], view, first_view=v)
            out = decode_view({k: a[0] for k, a in stored.items()}, True)
            num += float(((out["features"] - rec["features"]) ** 2).sum())
            den += float((rec["features"].astype(np.float64) ** 2).sum())
            attn += float(((out["attn_logits"] - rec["attn_logits"]) ** 2).sum())
            count += rec["attn_logits"].size
            n += 1
            if n >= ERROR_RECORDS:
                break
        if n >= ERROR_RECORDS:
            break
    if not n:
        return None
    return {"records": n, "feature_rel_rms": (num / den) ** 0.5 if den else 0.0,
            "attn_logits_rms": (attn / count) ** 0.5}
