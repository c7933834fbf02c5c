"""`tec cache inspect` and `tec cache verify`: a summary of a cache and a full integrity check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import layout
from .cache import (
    EXTENSIONS_KEY,
    _committed,
    _read_marker,
    _shown,
    extension_edits,
    manifest_edits,
    manifest_parts,
    open_cache,
    part_checksum,
    shard_entries,
    shard_entry_identity,
    slot_count_edits,
    view_layer_mismatch,
)
from .objstore import Url, as_root
from .schema import CacheError, CacheSpec, check_manifest_readable, decoded_nbytes, record_nbytes
from .util import format_bytes


def _load_manifest(root: Path) -> dict:
    mpath = layout.manifest_path(root)
    if not mpath.exists():
        raise CacheError(f"no target cache at {root} ({layout.MANIFEST} missing)")
    manifest = layout.read_json(mpath, "manifest")
    check_manifest_readable(manifest, str(mpath))
    return manifest


def inspect_cache(path: str | Path) -> dict:
    """Summary of a cache: manifest sections, completeness, counts and sizes.

    Keys: path, format, schema_version, created, finalized, spec, codec, base_model, view_policy,
    source, parts_total, parts_committed, missing_parts, complete, slots_total, samples,
    bad_samples, views_per_sample, records, bytes_data (committed part files), bytes_total
    (data + markers + manifest), bytes_per_view, raw_bytes_per_view (stored tensors before
    compression and framing), float32_bytes_per_view, compression_ratio (raw / on disk),
    unfinished_writes (parts with temp data of an unfinished attempt), view_layers and
    shard_extensions (`tec cache extend`; the parts of complete shard extensions are counted
    with the cache's own), unfinished_extension (an extension by shards not finished yet).
    """
    root = as_root(path)
    manifest = _load_manifest(root)
    spec = CacheSpec.from_dict(manifest["spec"])
    listed = manifest_parts(manifest)  # the cache's parts and those of its shard extensions
    committed = _committed(root, manifest, listed)
    parts = [p["name"] for p in listed]
    missing = [p for p in parts if p not in committed]
    damaged = {p: why for p in committed if (why := _data_missing(root, p, committed[p]))}
    samples = sum(int(m.get("samples", 0)) for m in committed.values())
    bytes_data = sum(int(m.get("bytes", 0)) for m in committed.values())
    bytes_meta = layout.manifest_path(root).stat().st_size
    for p in committed:
        mp = layout.marker_path(root, p)
        if mp.exists():
            bytes_meta += mp.stat().st_size
    records = samples * spec.views
    tmp = root / layout.TMP_DIR
    entries = shard_entries(manifest, pending=True)
    pending = [e for e in entries if e.get("status") != "complete"]
    if isinstance(root, Url):  # objects of attempts that died before their marker
        present = {d.name for d in (root / layout.PARTS_DIR).iterdir()}
        unfinished = sorted(p for p in missing + [q["name"] for e in pending for q in e["parts"]]
                            if p in present)
    else:
        unfinished = sorted(d.name for d in tmp.iterdir() if d.is_dir() and any(d.iterdir())) \
            if tmp.is_dir() else []
    raw = record_nbytes(spec)
    per_view = bytes_data / records if records else 0.0
    return {
        "path": str(root),
        "format": manifest.get("format"),
        "schema_version": manifest.get("schema_version"),
        "created": manifest.get("created"),
        "finalized": manifest.get("finalized"),
        "spec": manifest["spec"],
        "codec": manifest.get("codec", {}),
        "targets": manifest.get("targets", {}),
        "target_error": manifest.get("target_error"),
        "transcode": manifest.get("transcode"),
        "subset": manifest.get("subset"),
        "base_model": manifest.get("base_model", {}),
        "view_policy": manifest.get("view_policy", {}),
        "source": manifest.get("source", {}),
        "parts_total": len(parts),
        "parts_committed": len(committed),
        "missing_parts": missing,
        "complete": not missing and not damaged,
        "damaged_parts": damaged,
        "slots_total": sum(int(p["slots"]) for p in listed),
        "samples": samples,
        "bad_samples": sum(int(m.get("bad_samples", 0)) for m in committed.values()),
        "views_per_sample": spec.views,
        "records": records,
        "bytes_data": bytes_data,
        "bytes_total": bytes_data + bytes_meta,
        "bytes_per_view": per_view,
        "raw_bytes_per_view": raw,
        "float32_bytes_per_view": decoded_nbytes(spec),
        "compression_ratio": (raw / per_view) if per_view else None,
        "unfinished_writes": unfinished,
        # view layers added by `tec cache extend --views` (each a cache of its own)
        "view_layers": [{"path": e.get("path"), "views": e.get("views"), "at": e.get("at")}
                        for e in manifest.get(EXTENSIONS_KEY) or []
                        if isinstance(e, dict) and e.get("kind") == "views"],
        # source shards added by `tec cache extend --shards` (their parts follow the cache's)
        "shard_extensions": [{"id": e.get("id"), "path": e.get("path"),
                              "shards": len(e["shards"]), "samples": e.get("num_samples"),
                              "parts": [q["name"] for q in e["parts"]], "at": e.get("at"),
                              "completed": e.get("completed")}
                             for e in entries if e.get("status") == "complete"],
        "unfinished_extension": None if not pending else {
            "path": pending[0].get("path"), "parts": len(pending[0]["parts"]),
            "committed": len(_committed(root, manifest, pending[0]["parts"]))},
    }


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items())


def _codec_lines(s: dict) -> list[str]:
    """Codec parameters, stage-1 precision and the target error measured by stage 1 (v2)."""
    lines = []
    low = s.get("codec", {}).get("lowrank")
    if low:
        lines.append(f"codec params  {_kv(low.get('params', {}))}; rank {low.get('rank')}, "
                     f"{low.get('bits_per_feature_value')} bits per feature value, "
                     f"{low.get('bits_per_attention_value')} per attention logit")
    if s.get("targets"):
        lines.append(f"stage 1       base-model forward in {s['targets'].get('precision', '?')}")
    err = s.get("target_error")
    if isinstance(err, dict) and "total" in err:
        t = err["total"]
        lines.append(
            f"target error  vs float32 on {err.get('views')} views of the first part "
            f"({err.get('codec')}, {err.get('precision')}): feature rel. RMS "
            f"{t['feature_rel_rms']:.4f}, attention excess CE {t['attn_excess_ce_tau1.0']:.4f} / "
            f"{t['attn_excess_ce_tau1.8']:.4f} nats (tau 1.0 / 1.8), top-k agreement "
            f"{t['topk_agreement']:.3f}")
    elif isinstance(err, dict):
        lines.append(f"target error  {err.get('error', '?')}")
    for step in s.get("transcode") or []:
        lines.append(f"transcoded    from {step.get('from_codec')} ({step.get('source')}) at "
                     f"{step.get('at')}" + (f"; WARNING: {step['warning']}" if step.get("warning")
                                            else ""))
    for step in s.get("subset") or []:
        lines.append(f"subset        first {step.get('views')} of the {step.get('source_views')} "
                     f"views of {step.get('source')} at {step.get('at')}")
    return lines


def format_inspect(summary: dict) -> str:
    """Human-readable multi-line text of an `inspect_cache` summary."""
    s = summary
    spec = s["spec"]
    comp = s.get("codec", {}).get("compression", {})
    comp_txt = comp.get("id", "?") if comp.get("id") != "blosc" else \
        f"blosc {comp.get('cname')} level {comp.get('clevel')}, byte shuffle"
    status = ("complete" if s["complete"]
              else f"INCOMPLETE ({len(s['missing_parts'])} parts missing)")
    damaged = s.get("damaged_parts") or {}
    if damaged:
        status = (f"DAMAGED ({len(damaged)} committed part(s) lack their data"
                  + (f", {len(s['missing_parts'])} parts missing" if s["missing_parts"] else "")
                  + f"; run `tec cache verify {s['path']}` and `tec cache repair {s['path']}`)")
    source = {k: (v if k != "shards" else f"{len(v)} shards") for k, v in s["source"].items()}
    lines = [
        f"target cache  {s['path']}",
        f"format        {s['format']} schema v{s['schema_version']}  "
        f"created {s.get('created') or '?'}  finalized {s.get('finalized') or 'no'}",
        f"backend       {spec['backend']}   values {spec['codec']}   compression {comp_txt}",
        *_codec_lines(s),
        f"record        L={spec['num_patches']} C={spec['channels']} H={spec['heads']} "
        f"k_max={spec['k_max']}  views per sample K={spec['views']}",
        f"base model    {_kv(s['base_model'])}",
        f"view policy   {_kv(s['view_policy'])}",
        f"source        {_kv(source)}",
        f"parts         {s['parts_committed']}/{s['parts_total']} committed - {status}",
        f"samples       {s['samples']} valid of {s['slots_total']} slots, {s['bad_samples']} bad "
        f"samples reported; {s['records']} records",
        f"size          {format_bytes(s['bytes_total'])} total, "
        f"{format_bytes(s['bytes_data'])} part data",
    ]
    if spec.get("pixels", "none") != "none":
        quality = f" quality {spec.get('pixels_quality')}" if spec["pixels"] == "jpeg" else ""
        lines.append(f"view pixels   {spec['pixels']}{quality}, {spec.get('image_size')} px: "
                     f"stored with every view (self-contained: cached views need no source image; "
                     f"the per-view size below includes them)")
    if s["records"]:
        lines.append(f"per view      {format_bytes(s['bytes_per_view'])} on disk = "
                     f"{s['bytes_per_view'] / s['raw_bytes_per_view']:.3f} x its raw stored "
                     f"tensors ({format_bytes(s['raw_bytes_per_view'])}); "
                     f"{format_bytes(s['float32_bytes_per_view'])} decoded to float32")
    for part, why in list(damaged.items())[:10]:
        lines.append(f"damaged       part {part}: {why}")
    if s["missing_parts"]:
        shown = (", ".join(s["missing_parts"][:10])
                 + (" ..." if len(s["missing_parts"]) > 10 else ""))
        lines.append(f"missing       {shown}")
    for layer in s.get("view_layers") or []:
        first, stop = layer["views"]
        lines.append(f"view layer    views {first}..{stop - 1} in {layer['path']} "
                     f"(tec cache extend, {layer.get('at')}): K={stop} in all")
    for ext in s.get("shard_extensions") or []:
        names = ext["parts"]
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        lines.append(f"shards added  {ext['shards']} shard(s), {ext.get('samples')} samples of "
                     f"{ext['path']} (tec cache extend, {ext.get('at')}): part(s) {shown}")
    pending = s.get("unfinished_extension")
    if pending:
        lines.append(f"unfinished    tec cache extend --shards {pending['path']}: "
                     f"{pending['committed']} of {pending['parts']} parts committed (not visible "
                     f"yet; rerun it to finish)")
    if s["unfinished_writes"]:
        lines.append(f"unfinished    temp data of {len(s['unfinished_writes'])} part(s) being "
                     f"written or left by a crash: {', '.join(s['unfinished_writes'][:10])}")
    return "\n".join(lines)


def verify_cache(path: str | Path, *, deep: bool = False) -> list[str]:
    """Re-read every committed part and recompute its checksums; one problem line per fault.

    Each line names the part (or the manifest) and the file. Checks: manifest readable and of a
    known schema; every part committed; every file listed in the part's marker present with its
    size and sha256; no unlisted files; manifest part status (after finalize) agreeing with the
    marker; the manifest's identity sections and slot counts unchanged since each part was
    committed (the marker records a checksum of them). deep=True also decodes every record.
    [] means the cache is intact.
    """
    root = as_root(path)
    try:
        manifest = _load_manifest(root)
    except CacheError as e:
        return [f"manifest: {e}"]
    problems: list[str] = []
    status = manifest.get("part_status") or {}
    markers: dict[str, dict] = {}
    try:
        entries = shard_entries(manifest, pending=True)
    except CacheError as e:
        return [f"manifest: {e}"]
    unfinished = {q["name"]: e for e in entries if e.get("status") != "complete"
                  for q in e["parts"]}
    for entry in manifest_parts(manifest, pending=True):
        part = entry["name"]
        try:
            marker = _read_marker(root, part)
        except CacheError as e:
            problems.append(f"part {part}: {e}")
            continue
        if marker is None:
            if part in unfinished:  # one line for the whole extension, below
                continue
            problems.append(f"part {part}: not committed" + (
                f" (the manifest lists it as committed but status/{part}.json is missing)"
                if status.get(part, {}).get("status") == "committed" else ""))
            continue
        markers[part] = marker
        directory = layout.part_dir(root, part)
        files = marker.get("files", {})
        if directory.is_symlink():
            problems.append(f"part {part}: data directory {directory} is a link (to "
                            f"{os.readlink(directory)}); a part's data is never linked")
        if not directory.is_dir():
            problems.append(f"part {part}: data directory {directory} is missing")
            continue
        for rel in layout.list_files(directory):
            if rel not in files:
                problems.append(f"part {part}: unexpected file {rel}")
        for rel, info in sorted(files.items()):
            fp = directory / rel
            if not fp.is_file():
                problems.append(f"part {part}: file {rel} is missing")
                continue
            size = fp.stat().st_size
            if size != info.get("bytes"):
                problems.append(f"part {part}: file {rel} is {size} bytes, "
                                f"expected {info.get('bytes')} (truncated or replaced)")
                continue
            if layout.file_sha256(fp) != info.get("sha256"):
                problems.append(f"part {part}: file {rel} fails its sha256 checksum (corrupted)")
        recorded = status.get(part)
        if recorded is not None and recorded.get("checksum") != part_checksum(files):
            problems.append(f"part {part}: manifest part status differs from status/{part}.json "
                            f"(rewritten after finalize?); run finalize again")
    for e in {id(e): e for e in unfinished.values()}.values():
        done = sum(q["name"] in markers for q in e["parts"])
        problems.append(f"shard extension {e.get('id')}: `tec cache extend --shards "
                        f"{e.get('path')}` is unfinished ({done} of {len(e['parts'])} parts "
                        f"committed, not visible to readers); rerun it to finish it")
    for part, slots, committed in slot_count_edits(manifest, markers,
                                                   manifest_parts(manifest, pending=True)):
        problems.append(f"part {part}: {layout.MANIFEST} lists {slots} sample slots, the part was "
                        f"committed with {committed} (manifest edited?)")
    edited, sections = manifest_edits(manifest, markers)
    if edited:
        what = f"changed: {', '.join(sections)}" if sections else "identity sections changed"
        which = f"part {edited[0]} was" if len(edited) == 1 else f"parts {_shown(edited)} were"
        problems.append(f"manifest: {layout.MANIFEST} was edited after {which} committed ({what}; "
                        f"its identity checksum no longer matches the commit marker); restore it "
                        f"or rebuild the cache")
    for part in extension_edits(manifest, markers):
        problems.append(f"manifest: the shard extension of part {part} was edited after the part "
                        f"was committed (its checksum in status/{part}.json no longer matches); "
                        f"restore {layout.MANIFEST}")
    if deep and not problems:
        problems.extend(_decode_all(root))
    problems.extend(_verify_view_layers(root, manifest, deep))
    return problems


def _verify_view_layers(root, manifest: dict, deep: bool) -> list[str]:
    """Each view layer (`tec cache extend --views`): recorded identity and settings agreeing
    with the cache's, same samples, and itself verified (its lines prefixed with its path)."""
    problems = []
    total = CacheSpec.from_dict(manifest["spec"]).views
    for entry in manifest.get(EXTENSIONS_KEY) or []:
        if not isinstance(entry, dict) or entry.get("kind") != "views":
            continue
        where = f"view layer {entry.get('path')}"
        try:
            start, stop = (int(v) for v in entry["views"])
            layer_root = root / str(entry["path"])
            layer_manifest = _load_manifest(layer_root)
        except CacheError as e:
            problems.append(f"{where}: {e}")
            continue
        except (KeyError, TypeError, ValueError):
            problems.append(f"manifest: an entry of {EXTENSIONS_KEY!r} is malformed")
            continue
        why = view_layer_mismatch(manifest, layer_manifest, start, stop, entry) \
            if start == total else f"holds views from {start}, expected from {total}"
        if why is None:
            try:  # the layer holds every complete shard extension of the cache
                mine = [shard_entry_identity(e) for e in shard_entries(manifest)]
                theirs = [shard_entry_identity(e) for e in shard_entries(layer_manifest)]
            except CacheError as e:
                mine, theirs = [], [str(e)]
            if theirs[:len(mine)] != mine:
                why = "its shard extensions differ from the cache's"
        if why is not None:
            problems.append(f"{where}: does not belong to this cache ({why})")
        problems.extend(f"{where}: {line}" for line in verify_cache(layer_root, deep=deep))
        total = stop
    return problems


def _data_missing(root: Path, part: str, marker: dict) -> str | None:
    """Why a committed part's data is not there (folder or listed file missing or of another
    size, folder replaced by a link), from directory entries only; None when it is."""
    directory = layout.part_dir(root, part)
    if directory.is_symlink():
        return f"its data folder is a link ({directory} -> {os.readlink(directory)})"
    if not directory.is_dir():
        return f"its data folder {directory} is missing"
    for rel, info in sorted((marker.get("files") or {}).items()):
        try:
            size = (directory / rel).stat().st_size
        except OSError:
            return f"file {rel} is missing"
        if size != info.get("bytes"):
            return f"file {rel} is {size} bytes, expected {info.get('bytes')}"
    return None


# float fields of a decoded record: each value must be finite
_FLOAT_FIELDS = ("features", "feature_mean", "feature_std", "attn_logits")


def _decode_all(root: Path) -> list[str]:
    """Decode every record of every committed part: each must decode and hold finite values
    (checksums only prove the bytes are the ones written, not that they were right)."""
    problems = []
    reader = open_cache(root, require_complete=False, views=0)  # layers: verified on their own
    for part in reader.parts:
        try:
            for rec in reader.iter_records(parts=[part], decode=True):
                bad = [k for k in _FLOAT_FIELDS
                       if k in rec and not np.isfinite(np.asarray(rec[k], dtype=np.float32)).all()]
                if bad:
                    problems.append(
                        f"part {part}: record {rec['key']!r} view {rec['view']} holds non-finite "
                        f"values in {', '.join(bad)} (NaN/inf written by a broken base model); "
                        f"rewrite the part with `tec cache repair {root}`")
                    break
        except CacheError as e:
            problems.append(f"part {part}: {e}")
    reader.close()
    return problems
