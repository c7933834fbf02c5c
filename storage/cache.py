"""The cache API: create_cache / CacheWriter / PartWriter for stage 1, open_cache / CacheReader
for stage 2. Backend-specific byte layouts live in zarr_backend.py and wds_backend.py.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import compact, layout
from .codecs import codec_config, decode_view, encoder_of, prepare_views
from .objstore import Url, as_root, is_url
from .schema import (
    CacheError,
    CacheSpec,
    PartCommittedError,
    build_manifest,
    check_manifest_readable,
    check_part_name,
    fingerprint_mismatch,
    identity_keys,
    identity_mismatch,
    jsonable,
    manifest_identity,
    manifest_section_digests,
    stored_fields,
)
from .util import LruCache
from .wds_backend import SAMPLES_FILE as WDS_SAMPLES_FILE
from .wds_backend import WdsPartReader, WdsPartWriter
from .zarr_backend import ZarrPartReader, ZarrPartWriter

# where each backend keeps a part's sample list (valid slots, keys, labels, source sizes)
SAMPLES_RELPATH = {"zarr": "zarr.json", "webdataset": WDS_SAMPLES_FILE}

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN_FILES = 128
DEFAULT_MAX_OPEN_PARTS = 64


# manifest section of a grown cache (`tec cache extend`): its view layers and added shards, in
# the order they were added
EXTENSIONS_KEY = "extensions"
VIEWS_KIND, SHARDS_KIND = "views", "shards"
# the fields of a shard extension that its parts' commit markers record a checksum of
_SHARD_ENTRY_KEYS = ("kind", "id", "path", "shards", "num_samples", "parts")


def shard_entries(manifest: dict, *, pending: bool = False) -> list[dict]:
    """The shard extensions (`tec cache extend --shards`) of a manifest, in order: the complete
    ones, and with ``pending`` also an unfinished one (always the last; it is invisible to
    readers until every part of it, in the cache and in each view layer, is committed).

    An entry: ``{kind: shards, id: n, path: the shard spec, shards: [...], num_samples,
    parts: [{name, slots}], status: pending | complete, at, completed}``; its shards are new
    parts appended after the cache's own (``parts``), one part per shard as stage 1 makes them.
    """
    out = []
    for entry in manifest.get(EXTENSIONS_KEY) or []:
        if not isinstance(entry, dict) or entry.get("kind") != SHARDS_KIND:
            continue
        if not isinstance(entry.get("parts"), list) or not isinstance(entry.get("shards"), list) \
                or not all(isinstance(p, dict) and "name" in p and "slots" in p
                           for p in entry["parts"]):
            raise CacheError(f"an entry of {EXTENSIONS_KEY!r} in {layout.MANIFEST} is malformed "
                             f"({entry!r:.80})")
        if entry.get("status") == "complete" or pending:
            out.append(entry)
    return out


def shard_entry_identity(entry: dict) -> str:
    """Checksum of a shard extension's defining fields (its parts' markers record it)."""
    from .schema import _canonical_sha256

    return _canonical_sha256({k: entry.get(k) for k in _SHARD_ENTRY_KEYS})


def manifest_parts(manifest: dict, shard_extensions: int | None = None, *,
                   pending: bool = False) -> list[dict]:
    """[{name, slots}] of a cache's parts: its own, then those of its first ``shard_extensions``
    complete shard extensions (None: all), then with ``pending`` the unfinished one's."""
    entries = shard_entries(manifest, pending=pending)
    if shard_extensions is not None:
        entries = entries[:shard_extensions]
    return list(manifest["parts"]) + [p for e in entries for p in e["parts"]]


def manifest_shards(manifest: dict, shard_extensions: int | None = None) -> list[str]:
    """The source shard of each part of ``manifest_parts`` (same order); a cache whose
    manifest lists no shard per part (hand-built) gives its part names."""
    own = [str(s) for s in (manifest.get("source") or {}).get("shards") or []]
    if len(own) != len(manifest["parts"]):
        own = [p["name"] for p in manifest["parts"]]
    entries = shard_entries(manifest)
    if shard_extensions is not None:
        entries = entries[:shard_extensions]
    return own + [str(s) for e in entries for s in e["shards"]]


def grown_source(manifest: dict, shard_extensions: int | None = None) -> dict:
    """The source section a cache over all its shards would have: the shard specs joined with
    '::' (stages.sources.expand_shards reads that), every shard, every sample."""
    source = dict(manifest.get("source") or {})
    entries = shard_entries(manifest)
    if shard_extensions is not None:
        entries = entries[:shard_extensions]
    if not entries:
        return source
    source["path"] = "::".join([str(source.get("path"))] + [str(e["path"]) for e in entries])
    source["shards"] = manifest_shards(manifest, len(entries))
    source["num_samples"] = int(source.get("num_samples") or 0) + sum(
        int(e.get("num_samples") or 0) for e in entries)
    return source


def views_in_use(manifest: dict, views: int | None = None) -> int:
    """The views a reader opened with ``views`` shows (CacheReader): every view of the cache's
    view layers when None, else ``views`` capped to them and never fewer than it was built with."""
    base = int(manifest["spec"]["views"])
    total = base
    for entry in manifest.get(EXTENSIONS_KEY) or []:
        if isinstance(entry, dict) and entry.get("kind") == VIEWS_KIND:
            try:
                total = max(total, int(entry["views"][1]))
            except (KeyError, TypeError, ValueError, IndexError):
                continue
    return total if views is None else max(base, min(int(views), total))


def add_shard_extension(path, entry: dict) -> dict:
    """Append the pending shard extension ``entry`` to the manifest at ``path`` (one atomic
    write; nothing else changes). An equal one already there (a resumed extension) is kept.
    Returns the manifest's entry."""
    root = as_root(path)
    mpath = layout.manifest_path(root)
    manifest = layout.read_json(mpath, "manifest")
    check_manifest_readable(manifest, str(mpath))
    wanted = shard_entry_identity(entry)
    for have in shard_entries(manifest, pending=True):
        if shard_entry_identity(have) == wanted:
            return have
        if have.get("status") != "complete":
            raise CacheError(f"cache {root} has an unfinished `tec cache extend --shards "
                             f"{have.get('path')}`; rerun it to finish it first")
    taken = {p["name"] for p in manifest_parts(manifest, pending=True)}
    for part in entry["parts"]:
        check_part_name(part["name"])
        if part["name"] in taken:
            raise CacheError(f"part {part['name']!r} of the new shards is a part of cache {root} "
                             f"already")
        taken.add(part["name"])
    entry = jsonable({**{k: v for k, v in entry.items() if k != "completed"},
                      "kind": SHARDS_KIND, "status": "pending"})
    manifest[EXTENSIONS_KEY] = list(manifest.get(EXTENSIONS_KEY) or []) + [entry]
    layout.write_json_atomic(mpath, manifest)
    return entry


def _layers_complete(root, manifest: dict, entry: dict) -> bool:
    """Whether every view layer of the cache holds the shard extension ``entry`` complete."""
    wanted = shard_entry_identity(entry)
    for view in manifest.get(EXTENSIONS_KEY) or []:
        if not isinstance(view, dict) or view.get("kind") != VIEWS_KIND:
            continue
        try:
            layer = layout.read_json(layout.manifest_path(root / str(view["path"])), "manifest")
        except (FileNotFoundError, CacheError, KeyError):
            return False
        if not any(shard_entry_identity(e) == wanted for e in shard_entries(layer)):
            return False
    return True


def view_layer_mismatch(manifest: dict, layer: dict, start: int, stop: int,
                        entry: dict) -> str | None:
    """Why the cache ``layer`` (a manifest) is not the view layer [start, stop) of the cache
    ``manifest`` that ``entry`` records, or None when it is."""
    if manifest_identity(layer) != entry.get("identity"):
        return "its manifest is not the one the extension recorded"
    spec, other = dict(manifest["spec"]), dict(layer["spec"])
    if other.pop("views", None) != stop - start:
        return f"it holds {layer['spec'].get('views')} views, not {stop - start}"
    spec.pop("views", None)
    if spec != other:
        return "another spec"
    for key in ("base_model", "source", "parts", "targets"):
        if manifest.get(key) != layer.get(key):
            return f"another {key.replace('_', ' ')}"
    mine = {k: v for k, v in manifest["view_policy"].items() if k not in ("views", "first_view")}
    theirs = dict(layer["view_policy"])
    if theirs.pop("first_view", 0) != start or theirs.pop("views", None) != stop - start \
            or mine != theirs:
        return "another view policy"
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# =============================================================================================
# writing

def create_cache(path: str | Path, spec: CacheSpec, *, base_model: dict, view_policy: dict,
                 source: dict, parts: list[tuple[str, int]], targets: dict | None = None,
                 extra: dict | None = None) -> CacheWriter:
    """Create a cache at `path` (manifest.json written atomically), or reopen the same one.

    parts: (part name, number of sample slots) per input shard, in source order.
    If `path` already holds a cache whose identity (format, schema, spec, base_model,
    view_policy, source, parts) equals the requested one, it is reopened so committed parts are
    kept (resume). A different cache there is refused with a CacheError naming the fields.
    Safe to call from several processes at once with the same arguments.
    targets: stage-1 settings that shape the targets (``{'precision': ...}``), part of the
    identity. extra: sections recorded in a new manifest that are not part of the identity
    (``target_error`` measured by stage 1, ``transcode`` history); a reopened cache keeps its own.
    """
    root = as_root(path)
    if not isinstance(spec, CacheSpec):
        raise CacheError(f"create_cache: spec must be a CacheSpec, got {type(spec).__name__}")
    wanted = build_manifest(spec, base_model=base_model, view_policy=view_policy, source=source,
                            parts=parts, codec_config=codec_config(spec), targets=targets)
    if spec.pixels != "none":
        from .pixels import pixel_config

        wanted["codec"]["pixels"] = pixel_config(spec.pixels, spec.pixels_quality)
    mpath = layout.manifest_path(root)
    if mpath.exists():
        existing = layout.read_json(mpath, "manifest")
        check_manifest_readable(existing, str(mpath))
        diffs = identity_mismatch(existing, wanted)
        if diffs:
            shown = ", ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
            raise CacheError(f"{root} already holds a different target cache "
                             f"(differs in: {shown}); choose another output path or delete it")
        log.info("resuming cache %s: %d/%d parts committed", root,
                 len(_committed(root, existing)), len(existing["parts"]))
        return CacheWriter(root, existing)
    if root.exists() and (not root.is_dir()
                          or not all(_is_cache_entry(p.name) for p in root.iterdir())):
        raise CacheError(f"{root} exists and is not a target cache (no {layout.MANIFEST}); "
                         f"choose an empty or new output path")
    root.mkdir(parents=True, exist_ok=True)
    for key, value in (extra or {}).items():
        if key in wanted:
            raise CacheError(
                f"create_cache: extra section {key!r} would replace a manifest section")
        wanted[key] = jsonable(value)
    wanted["created"] = _now()
    layout.write_json_atomic(mpath, wanted)
    # another process may have created it at the same moment: what is there now must match
    existing = layout.read_json(mpath, "manifest")
    diffs = identity_mismatch(existing, wanted)
    if diffs:
        raise CacheError(f"{root} was just created by another process with different settings "
                         f"(differs in: {', '.join(diffs[:8])})")
    log.info("created cache %s (%s, %s, %d parts)", root, spec.backend, spec.codec, len(parts))
    return CacheWriter(root, existing)


def _is_cache_entry(name: str) -> bool:
    """Names a cache root may hold before its manifest is in place (a concurrent create)."""
    return name in (layout.PARTS_DIR, layout.STATUS_DIR, layout.TMP_DIR) or \
        (name.startswith(f".{layout.MANIFEST}.") and name.endswith(".tmp"))


def open_writer(path: str | Path) -> CacheWriter:
    """Reopen an existing cache for writing parts (e.g. in a worker process) without its
    arguments."""
    root = as_root(path)
    mpath = layout.manifest_path(root)
    if not mpath.exists():
        raise CacheError(f"no target cache at {root} ({layout.MANIFEST} missing); create it first")
    manifest = layout.read_json(mpath, "manifest")
    check_manifest_readable(manifest, str(mpath))
    return CacheWriter(root, manifest)


def _read_marker(root: Path, part: str) -> dict | None:
    path = layout.marker_path(root, part)
    try:
        marker = layout.read_json(path, "commit marker")
    except FileNotFoundError:
        return None
    if (not isinstance(marker, dict) or marker.get("status") != "committed"
            or marker.get("part") != part):
        raise CacheError(f"commit marker {path} is not a valid marker for part {part}; "
                         f"rewrite the part with `tec cache repair {root}`")
    return marker


def _committed(root: Path, manifest: dict, parts: list[dict] | None = None) -> dict[str, dict]:
    """part -> marker, for the manifest's parts (or ``parts``) that are committed.

    The marker files are the commit points and the truth; the manifest's part_status (written by
    finalize) is a summary that verify_cache checks against them.
    """
    out = {}
    for p in manifest["parts"] if parts is None else parts:
        marker = _read_marker(root, p["name"])
        if marker is not None:
            out[p["name"]] = marker
    return out


def part_checksum(files: dict) -> str:
    """One sha256 for a whole part: over the sorted 'path bytes sha256' lines of its files."""
    lines = "".join(f"{rel} {info.get('bytes')} {info.get('sha256')}\n"
                    for rel, info in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def manifest_edits(manifest: dict, markers: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(parts, sections): the committed parts whose marker records another manifest identity than
    `manifest` has now, and the identity sections found to differ (when the markers say).

    ([], []) means the manifest is the one every part was committed under. Markers written before
    markers recorded the identity (no ``manifest_identity``) are skipped.
    """
    current = manifest_identity(manifest)
    parts = [p for p, m in markers.items()
             if m.get("manifest_identity") is not None and m.get("manifest_identity") != current]
    sections: list[str] = []
    if parts:
        now = manifest_section_digests(manifest)
        for p in parts:
            recorded = markers[p].get("manifest_sections")
            if not isinstance(recorded, dict):
                continue
            sections.extend(k for k in identity_keys(manifest)
                            if k in recorded and recorded[k] != now[k] and k not in sections)
    return parts, sections


def slot_count_edits(manifest: dict, markers: dict[str, dict],
                     parts: list[dict] | None = None) -> list[tuple[str, int, object]]:
    """(part, slots in the manifest, slots in its commit marker) for each committed part (of the
    manifest's, or ``parts``) whose slot count in the manifest differs from the one it was
    committed with."""
    out = []
    for entry in manifest["parts"] if parts is None else parts:
        marker = markers.get(entry["name"])
        if marker is not None and "slots" in marker and marker["slots"] != entry["slots"]:
            out.append((entry["name"], entry["slots"], marker["slots"]))
    return out


def extension_edits(manifest: dict, markers: dict[str, dict]) -> list[str]:
    """The committed parts of shard extensions whose marker records another checksum of their
    extension entry than the manifest holds now (the entry was edited after the commit)."""
    out = []
    for entry in shard_entries(manifest, pending=True):
        digest = shard_entry_identity(entry)
        out.extend(p["name"] for p in entry["parts"] if p["name"] in markers
                   and markers[p["name"]].get("extension", digest) != digest)
    return out


def _shown(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def part_summary(marker: dict) -> dict:
    """What the manifest keeps of a part's commit marker (per-file checksums stay in the marker)."""
    out = {k: marker[k]
           for k in ("status", "slots", "samples", "bad_samples", "bytes", "committed_at")
           if k in marker}
    out["files"] = len(marker.get("files", {}))
    out["checksum"] = part_checksum(marker.get("files", {}))
    return out


class CacheWriter:
    """Handle on a cache being written. Picklable (it holds only the path and the manifest)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = as_root(root)
        self.manifest = manifest
        self.spec = CacheSpec.from_dict(manifest["spec"])
        # the cache's parts and those of its shard extensions, the unfinished one included
        self._slots = {p["name"]: int(p["slots"])
                       for p in manifest_parts(manifest, pending=True)}
        self._extension = {p["name"]: shard_entry_identity(e)
                           for e in shard_entries(manifest, pending=True) for p in e["parts"]}

    @property
    def parts(self) -> list[str]:
        return list(self._slots)

    def slots_of(self, part: str) -> int:
        self._check_part(part)
        return self._slots[part]

    def _check_part(self, part: str) -> None:
        if part not in self._slots:
            raise CacheError(f"part {part!r} is not one of the {len(self._slots)} parts in "
                             f"{layout.manifest_path(self.root)}")

    def is_committed(self, part: str) -> bool:
        self._check_part(part)
        return _read_marker(self.root, part) is not None

    def committed_parts(self) -> set[str]:
        return {p for p in self._slots if _read_marker(self.root, p) is not None}

    def part_marker(self, part: str) -> dict | None:
        """A committed part's marker (samples, bad_samples, 'report', files with sha256), else
        None."""
        self._check_part(part)
        return _read_marker(self.root, part)

    def open_part(self, part: str, *, overwrite: bool = False) -> PartWriter:
        """Start writing a part; leftovers of an earlier unfinished attempt are discarded.

        A committed part is refused (PartCommittedError) unless overwrite=True (then it stops
        being visible now and becomes visible again at commit).
        """
        self._check_part(part)
        if _read_marker(self.root, part) is not None:
            if not overwrite:
                raise PartCommittedError(f"part {part} of {self.root} is already committed; skip "
                                         f"it or pass overwrite=True", part)
            layout.marker_path(self.root, part).unlink()
            layout.fsync_dir(layout.marker_path(self.root, part).parent)
        layout.remove_tree(layout.part_tmp_root(self.root, part))
        if isinstance(self.root, Url):
            # objects of an attempt that died before its marker (never visible) go now
            layout.remove_tree(layout.part_dir(self.root, part))
        return PartWriter(self, part)

    def finalize(self) -> dict:
        """Record committed parts' status and checksums in the manifest; returns the manifest.

        manifest['complete'] is true when every part is committed. Per part the manifest keeps
        counts, bytes and one checksum over the part's file checksums (`part_checksum`); the
        per-file checksums and the bad-sample report stay in status/<part>.json.
        """
        manifest = layout.read_json(layout.manifest_path(self.root), "manifest")
        check_manifest_readable(manifest, str(layout.manifest_path(self.root)))
        status = {}
        for p in manifest_parts(manifest, pending=True):
            marker = _read_marker(self.root, p["name"])
            if marker is None:
                continue
            status[p["name"]] = part_summary(marker)
        manifest["part_status"] = status
        # an unfinished shard extension becomes visible (complete) once each of its parts is
        # committed here and every view layer holds it complete (`tec cache extend --shards`)
        for entry in shard_entries(manifest, pending=True):
            if entry.get("status") != "complete" and all(
                    p["name"] in status for p in entry["parts"]) and \
                    _layers_complete(self.root, manifest, entry):
                entry["status"], entry["completed"] = "complete", _now()
                log.info("shard extension %s of %s complete: %d parts", entry.get("id"),
                         self.root, len(entry["parts"]))
        visible = manifest_parts(manifest)
        manifest["complete"] = all(p["name"] in status for p in visible)
        manifest["finalized"] = _now()
        layout.write_json_atomic(layout.manifest_path(self.root), manifest)
        self.manifest = manifest
        log.info("finalized cache %s: %d/%d parts committed", self.root,
                 sum(p["name"] in status for p in visible), len(visible))
        return manifest


def _check_pixels(spec: CacheSpec, key: str, pixels) -> list[bytes]:
    """K encoded view images (bytes) of a cache with pixels, checked for count and format."""
    from .pixels import looks_like

    if pixels is None:
        raise CacheError(f"record {key!r}: the cache stores view pixels ({spec.pixels}) but the "
                         f"record has no 'pixels' (K encoded images, storage.pixels.encode_pixels)")
    out = [bytes(p) for p in pixels]
    if len(out) != spec.views:
        raise CacheError(f"record {key!r}: {len(out)} encoded view images, expected {spec.views}")
    for v, data in enumerate(out):
        if not looks_like(spec.pixels, data):
            raise CacheError(f"record {key!r}: view {v} pixels are not {spec.pixels} data")
    return out


class PartWriter:
    """Writes one part (one input shard) into a temp directory; visible only after commit().

    Records may be written in any slot order; slots never written stay invalid (bad samples).
    Memory is O(slots) (shard indexes), not O(part bytes): records go to disk as they come.
    Use as a context manager to abort on an exception.
    """

    def __init__(self, cache: CacheWriter, part: str):
        self.cache, self.part, self.spec = cache, part, cache.spec
        self.slots = cache.slots_of(part)
        self._tmp = layout.new_part_tmp(cache.root, part)
        backend = ZarrPartWriter if self.spec.backend == "zarr" else WdsPartWriter
        self._backend = backend(self._tmp, self.spec, part, self.slots)
        self._written = np.zeros(self.slots, dtype=bool)
        self._keys: dict[int, str] = {}
        self._meta: dict[int, dict] = {}
        self._seen_keys: set[str] = set()
        self._state = "open"
        # the view index of this cache's first view (a view layer starts at K): the lowrank
        # codec seeds its dither with each record's own view index
        self._first_view = int((cache.manifest.get("view_policy") or {}).get("first_view", 0))
        self._encoder: str | None = None  # lowrank: which encoder wrote this part's records

    @property
    def num_written(self) -> int:
        return int(self._written.sum())

    def write(self, slot: int, key: str, view_records: dict) -> None:
        """Write sample `key` into `slot` with all K views.

        view_records: features [K,L,C] (float), feature_mean [K,C], feature_std [K,C],
        attn_logits [K,H,k_max+1,L], attn_index [K,k_max] (int), crop [K,4] int (top, left,
        height, width in source pixels), flip [K] bool, source_size (h, w), label int (-1 none).
        A lowrank cache also takes records already encoded on the base model's device (see
        ``codecs.prepare_views``); one part holds the records of one encoder only (its commit
        marker names it), so a part never mixes the two encoders' bytes.
        """
        slot = self._check_new(slot, key)
        encoder = encoder_of(view_records) if self.spec.codec == compact.NAME else None
        if encoder is not None and self._encoder not in (None, encoder):
            raise CacheError(f"part {self.part}: record {key!r} was encoded by {encoder}, the "
                             f"part's earlier records by {self._encoder}; a part is written by "
                             "one encoder (targets.encode_on)")
        stored, sample = prepare_views(self.spec, key, view_records, first_view=self._first_view)
        if self.spec.pixels != "none":
            stored["pixels"] = _check_pixels(self.spec, key, view_records.get("pixels"))
        self._put(slot, key, stored, sample)
        self._encoder = encoder

    def write_stored(self, slot: int, key: str, stored: dict, label: int,
                     source_size: tuple[int, int]) -> None:
        """Write sample ``key`` from arrays already in this cache's stored form, bit for bit.

        stored: every field of ``stored_fields(spec)`` as [K, ...] arrays of its dtype (what
        ``CacheReader.read(..., decode=False)`` gives per view, stacked), plus 'pixels' (K encoded
        images) when the cache keeps them. For copies between caches of one codec (``tec cache
        subset``): nothing is decoded or encoded again.
        """
        slot = self._check_new(slot, key)
        K = self.spec.views
        arrays = {}
        for name, (shape, dtype) in stored_fields(self.spec).items():
            a = stored.get(name)
            if a is None or np.shape(a) != (K, *shape) or np.asarray(a).dtype != dtype:
                got = "missing" if a is None else f"{list(np.shape(a))} {np.asarray(a).dtype}"
                raise CacheError(f"record {key!r}: stored {name} is {got}, expected "
                                 f"{[K, *shape]} {dtype} (codec {self.spec.codec})")
            arrays[name] = np.ascontiguousarray(a)
        if self.spec.pixels != "none":
            arrays["pixels"] = _check_pixels(self.spec, key, stored.get("pixels"))
        h, w = (int(v) for v in source_size)
        self._put(slot, key, arrays, {"label": int(label), "source_size": [h, w]})

    def _check_new(self, slot, key) -> int:
        """The slot as an int, after checking that the part is open and slot and key are new."""
        if self._state != "open":
            raise CacheError(f"part {self.part}: write after {self._state}")
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.slots:
            raise CacheError(f"part {self.part}: slot {slot!r} is outside [0, {self.slots})")
        slot = int(slot)
        if self._written[slot]:
            raise CacheError(f"part {self.part}: slot {slot} is written twice (key {key!r})")
        if not isinstance(key, str) or not key:
            raise CacheError(f"part {self.part}: slot {slot} has no usable key ({key!r})")
        if key in self._seen_keys:
            raise CacheError(f"part {self.part}: key {key!r} is written twice")
        return slot

    def _put(self, slot: int, key: str, stored: dict, sample: dict) -> None:
        """Hand encoded arrays and sample metadata to the backend; mark the slot written."""
        try:
            if self.spec.backend == "zarr":
                self._backend.write(slot, stored)
            else:
                self._backend.write(slot, key, stored, sample)
        except BaseException:
            self.abort()
            raise
        self._written[slot] = True
        self._keys[slot] = key
        self._meta[slot] = sample
        self._seen_keys.add(key)

    def commit(self, report: list[dict] | None = None) -> None:
        """Finish the part and make it visible atomically (marker written last).

        report: bad samples of this part, e.g. [{'key': ..., 'reason': ...}], kept in the marker.
        If another writer committed the part meanwhile, this copy is dropped and
        PartCommittedError is raised (the committed part is left as it is).
        """
        if self._state != "open":
            raise CacheError(f"part {self.part}: commit after {self._state}")
        try:
            slots = np.flatnonzero(self._written)
            labels = np.array([self._meta[int(s)]["label"] for s in slots], dtype=np.int64)
            sizes = np.array([self._meta[int(s)]["source_size"] for s in slots],
                             dtype=np.int64).reshape(-1, 2)
            samples = {"part": self.part, "slots": slots.tolist(),
                       "keys": [self._keys[int(s)] for s in slots], "labels": labels.tolist(),
                       "source_sizes": sizes.tolist()}
            hashed = self._backend.finish(slots, labels, sizes, samples)
            files = {}
            for rel in layout.list_files(self._tmp):
                if rel in hashed:
                    files[rel] = hashed[rel]
                else:
                    p = self._tmp / rel
                    files[rel] = {"bytes": p.stat().st_size, "sha256": layout.file_sha256(p)}
            report = jsonable(list(report or []))
            marker = {
                "marker_version": layout.MARKER_VERSION, "part": self.part, "status": "committed",
                "backend": self.spec.backend, "slots": self.slots, "samples": int(len(slots)),
                "views": self.spec.views, "bad_samples": len(report),
                "bytes": int(sum(f["bytes"] for f in files.values())),
                "committed_at": _now(),
                "writer": {"host": socket.gethostname(), "pid": os.getpid()},
                # the manifest identity this part was written for: an edit of manifest.json
                # after the commit (view policy, base model, ...) no longer matches it
                "manifest_identity": manifest_identity(self.cache.manifest),
                "manifest_sections": manifest_section_digests(self.cache.manifest),
                "files": files, "report": report,
            }
            if self._encoder is not None:  # lowrank: numpy (the writer) or torch (the actor)
                marker["encoder"] = self._encoder
            if self.part in self.cache._extension:  # a part added by `tec cache extend --shards`
                marker["extension"] = self.cache._extension[self.part]
            if _read_marker(self.cache.root, self.part) is not None:
                raise PartCommittedError(
                    f"part {self.part} of {self.cache.root} was committed by another writer while "
                    f"this one was writing it; this copy is dropped", self.part)
            layout.commit_part_dir(self.cache.root, self.part, self._tmp, marker)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        log.debug("committed part %s: %d samples, %d bad", self.part, len(slots), len(report))

    def abort(self) -> None:
        """Drop everything written to this part (it stays absent)."""
        if self._state == "open":
            self._state = "aborted"
            self._backend.abort()
            layout.remove_tree(self._tmp)
            try:
                self._tmp.parent.rmdir()
            except OSError:
                pass

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# =============================================================================================
# reading

def _close_handle(entry: tuple) -> None:
    handle, _ = entry
    if not isinstance(handle, Url):
        os.close(handle)


class _FdCache:
    """Open read-only descriptors by path (an LruCache); size checked against the commit marker
    once. An object's entry is its Url (ranged reads, nothing to close)."""

    def __init__(self, limit: int):
        self._open: LruCache[Path, tuple] = LruCache(limit, _close_handle)

    def get(self, path: Path, expected: int | None, fail, rel: str) -> tuple[int, int]:
        hit = self._open.get(path)
        if hit is not None:
            return hit
        if is_url(path):  # an object: no descriptor, ranged reads of the Url (layout.pread)
            url = Url(path)
            if expected is None:
                raise fail(f"{rel} is not listed in the part's commit marker")
            try:
                size = url.stat().st_size
            except FileNotFoundError:
                raise fail(f"{rel} cannot be opened (no such object)") from None
            if size != expected:
                raise fail(f"{rel} is {size} bytes, expected {expected} (truncated or replaced)")
            return self._open.put(path, (url, size))
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise fail(f"{rel} cannot be opened ({e.strerror})") from None
        size = os.fstat(fd).st_size
        if expected is None:
            os.close(fd)
            raise fail(f"{rel} is not listed in the part's commit marker")
        if size != expected:
            os.close(fd)
            raise fail(f"{rel} is {size} bytes, expected {expected} (truncated or replaced)")
        return self._open.put(path, (fd, size))

    def close(self) -> None:
        self._open.clear()


def open_cache(path: str | Path, *, require_complete: bool = True,
               check_identity: bool = True, views: int | None = None,
               shard_extensions: int | None = None) -> CacheReader:
    """Open a cache for reading.

    Refuses (CacheError, one line) a path without a cache, another format, an unknown schema
    version, and - unless require_complete=False - a cache with parts not yet committed (the
    message lists them). With require_complete=False only committed parts are visible.
    Also refuses a manifest that disagrees with the commit markers of its committed parts: a
    part's slot count or part-status checksum, or identity sections (spec, base model, view
    policy, source, parts) edited after the part was committed. check_identity=False defers the
    last check to `CacheReader.check_manifest_identity()` (e.g. to compare the base model first,
    for a more specific message). No part file is read beyond the sample lists.
    views: of a cache grown with `tec cache extend --views`, read the first ``views`` views
    (never fewer than the K it was built with); None reads all (see CacheReader).
    shard_extensions: of a cache grown with `tec cache extend --shards`, read its own parts and
    those of its first ``shard_extensions`` shard extensions (0: the samples it was built with);
    None reads all.
    """
    root = as_root(path)
    mpath = layout.manifest_path(root)
    if not mpath.exists():
        raise CacheError(f"no target cache at {root} ({layout.MANIFEST} missing); run stage 1 "
                         f"(precompute) first or check the path")
    manifest = layout.read_json(mpath, "manifest")
    check_manifest_readable(manifest, str(mpath))
    return CacheReader(root, manifest, require_complete=require_complete,
                       check_identity=check_identity, views=views,
                       shard_extensions=shard_extensions)


class CacheReader:
    """Read access to the committed parts of a cache, same interface for both backends.

    Samples are numbered 0..num_samples-1 over the valid samples of the committed parts, in part
    order then slot order. Picklable: open files are per process and reopened lazily.

    A cache grown by `tec cache extend --views K2` keeps its K views untouched and holds views
    [K, K2) in a view layer: a complete cache of the same samples under extensions/ (manifest
    section ``extensions``). ``spec.views`` is then K2 (or the ``views`` asked for, at least
    K) and a record of view v >= K is read from the layer holding v; views < K read exactly the
    records they read before the extension.

    A cache grown by `tec cache extend --shards` holds the parts of the added shards after its
    own (manifest section ``extensions``, kind ``shards``): samples are numbered over the cache's
    own parts first, so ``shard_extensions=0`` reads exactly what it read before; ``parts``,
    ``part_entries`` and ``shards`` list the parts shown and the source shard of each.
    """

    def __init__(self, root: Path, manifest: dict, *, require_complete: bool = True,
                 max_open_files: int = DEFAULT_MAX_OPEN_FILES,
                 max_open_parts: int = DEFAULT_MAX_OPEN_PARTS, check_identity: bool = True,
                 views: int | None = None, shard_extensions: int | None = None):
        self.root = as_root(root)
        self.manifest = manifest
        self.spec = CacheSpec.from_dict(manifest["spec"])
        self._limits = (max_open_files, max_open_parts)
        try:
            entries = shard_entries(manifest)
        except CacheError as e:
            raise CacheError(f"cache {self.root}: {e}; run `tec cache verify`") from None
        if shard_extensions is not None:
            if isinstance(shard_extensions, bool) or not 0 <= int(shard_extensions) \
                    <= len(entries):
                raise CacheError(f"cache {self.root} has {len(entries)} shard extension(s), "
                                 f"not {shard_extensions}")
            entries = entries[:int(shard_extensions)]
        self.shard_extensions = len(entries)
        self.part_entries = manifest_parts(manifest, self.shard_extensions)
        self.shards = manifest_shards(manifest, self.shard_extensions)
        markers = _committed(self.root, manifest, self.part_entries)
        all_parts = [p["name"] for p in self.part_entries]
        self.missing_parts = [p for p in all_parts if p not in markers]
        if self.missing_parts and require_complete:
            shown = (", ".join(self.missing_parts[:10])
                     + (" ..." if len(self.missing_parts) > 10 else ""))
            raise CacheError(
                f"cache {self.root} is incomplete: {len(self.missing_parts)} of {len(all_parts)} "
                f"parts not committed ({shown}); rerun stage 1 to finish it, or open with "
                f"require_complete=False")
        self.parts = [p for p in all_parts if p in markers]
        self._markers = {p: markers[p] for p in self.parts}
        self._check_against_markers()
        if check_identity:
            self.check_manifest_identity()
        slots_of = {p["name"]: int(p["slots"]) for p in self.part_entries}
        self._slots_total = {p: slots_of[p] for p in self.parts}
        keys: list[str] = []
        labels, sizes, slots, starts = [], [], [], [0]
        for part in self.parts:
            s = self._load_samples(part)
            keys.extend(s["keys"])
            labels.append(np.asarray(s["labels"], dtype=np.int64))
            sizes.append(np.asarray(s["source_sizes"], dtype=np.int64).reshape(-1, 2))
            slots.append(np.asarray(s["slots"], dtype=np.int64))
            starts.append(starts[-1] + len(s["keys"]))
        self.keys = keys
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self._sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int64)
        self._part_slots = slots
        self._starts = starts
        self._key_index: dict[str, int] | None = None
        self._reset_handles()
        self._base_spec = self.spec  # the part files' own geometry (K views)
        self._layers: list[tuple[int, int, CacheReader]] = []  # (first view, stop, reader)
        if not self.missing_parts:
            self._open_view_layers(views)

    def _open_view_layers(self, views: int | None) -> None:
        """Open the view layers recorded in the manifest, up to ``views`` views (None: all)."""
        total = self.spec.views
        for entry in self.manifest.get(EXTENSIONS_KEY) or []:
            if not isinstance(entry, dict) or entry.get("kind") != "views":
                continue
            if views is not None and total >= views:
                break
            try:
                start, stop = (int(v) for v in entry["views"])
                layer_root = self.root / str(entry["path"])
            except (KeyError, TypeError, ValueError):
                raise CacheError(f"cache {self.root}: an entry of {EXTENSIONS_KEY!r} in "
                                 f"{layout.MANIFEST} is malformed ({entry!r:.80})") from None
            if start != total or stop <= start:
                raise CacheError(f"cache {self.root}: view layer {entry['path']} holds views "
                                 f"[{start}, {stop}), expected views from {total}")
            try:  # the layer shows the shard extensions this reader shows
                layer = open_cache(layer_root, shard_extensions=self.shard_extensions)
            except CacheError as e:
                raise CacheError(f"cache {self.root}: view layer {entry['path']}: {e}") from None
            why = view_layer_mismatch(self.manifest, layer.manifest, start, stop, entry)
            mine = [shard_entry_identity(e) for e in
                    shard_entries(self.manifest)[:self.shard_extensions]]
            if why is None and mine != [shard_entry_identity(e) for e in
                                        shard_entries(layer.manifest)[:self.shard_extensions]]:
                why = "its shard extensions differ from the cache's"
            if why is None and (layer.parts != self.parts or layer.keys != self.keys):
                why = "its samples differ from the cache's (the source changed?)"
            if why is not None:
                raise CacheError(f"cache {self.root}: view layer {entry['path']} does not belong "
                                 f"to it ({why}); run `tec cache verify`")
            self._layers.append((start, stop, layer))
            total = stop
        if views is not None:
            total = max(self._base_spec.views, min(int(views), total))
        if total != self.spec.views:
            self.spec = dataclasses.replace(self._base_spec, views=total)

    def _layer_of(self, view: int) -> tuple[int, CacheReader]:
        """(first view, reader) of the view layer holding ``view`` (>= the base K)."""
        for start, stop, layer in self._layers:
            if start <= view < stop:
                return start, layer
        raise IndexError(f"view {view} out of range [0, {self.spec.views})")

    def _check_against_markers(self) -> None:
        """The manifest's per-part facts (slot counts, part-status checksums written by finalize)
        must agree with the commit markers, which are the truth. Markers only: no file is read."""
        edits = slot_count_edits(self.manifest, self._markers, self.part_entries)
        if edits:
            part, slots, committed = edits[0]
            raise CacheError(
                f"part {part} of cache {self.root}: {layout.MANIFEST} lists {slots} sample slots "
                f"but the part was committed with {committed} (manifest edited?); run `tec cache "
                f"verify`, restore the manifest or rebuild the cache")
        status = self.manifest.get("part_status") or {}
        if not isinstance(status, dict):
            raise CacheError(f"cache {self.root}: part_status in {layout.MANIFEST} is not a "
                             f"mapping; run `tec cache verify` and rerun stage 1 to finalize again")
        for part in self.parts:
            recorded = status.get(part)
            if not isinstance(recorded, dict) or "checksum" not in recorded:
                continue  # not finalized yet (or committed after the last finalize)
            if recorded["checksum"] != part_checksum(self._markers[part].get("files", {})):
                raise CacheError(
                    f"part {part} of cache {self.root}: the manifest's part status checksum "
                    f"differs from status/{part}.json (part rewritten after finalize, or an edited "
                    f"file); run `tec cache verify`, then rerun stage 1 to finalize the cache "
                    f"again")

    def check_manifest_identity(self) -> None:
        """Raise CacheError if the manifest's identity sections (spec, base model, view policy,
        source, parts) differ from those recorded in the committed parts' markers."""
        parts, sections = manifest_edits(self.manifest, self._markers)
        if parts:
            what = f"changed: {', '.join(sections)}" if sections else "identity sections changed"
            which = f"part {parts[0]} was" if len(parts) == 1 else f"parts {_shown(parts, 3)} were"
            raise CacheError(
                f"cache {self.root}: {layout.MANIFEST} was edited after {which} committed "
                f"({what}); it no longer matches the checksum in status/{parts[0]}.json - "
                f"restore the manifest or rebuild the cache")
        edited = extension_edits(self.manifest, self._markers)
        if edited:
            raise CacheError(
                f"cache {self.root}: the shard extension of part {edited[0]} in "
                f"{layout.MANIFEST} was edited after the part was committed; it no longer matches "
                f"the checksum in status/{edited[0]}.json - restore the manifest")

    def __repr__(self) -> str:
        return (f"CacheReader({str(self.root)!r}, backend={self.spec.backend}, "
                f"codec={self.spec.codec}, samples={self.num_samples}, views={self.spec.views}, "
                f"parts={len(self.parts)})")

    # -- state that is per process ------------------------------------------------------------
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._fds = _FdCache(self._limits[0])
        self._readers: LruCache[str, object] = LruCache(self._limits[1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_fds", "_readers", "_pid"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def close(self) -> None:
        self._fds.close()
        self._readers.clear()
        for _, _, layer in getattr(self, "_layers", ()):
            layer.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- index --------------------------------------------------------------------------------
    def _load_samples(self, part: str) -> dict:
        marker = self._markers[part]
        rel = SAMPLES_RELPATH[self.spec.backend]
        path = layout.part_dir(self.root, part) / rel
        expected = marker.get("files", {}).get(rel, {}).get("bytes")
        try:
            size = path.stat().st_size
        except OSError:
            raise CacheError(f"part {part} of cache {self.root}: {rel} is missing; "
                             f"run `tec cache verify` and rewrite the part with `tec cache repair "
                             f"{self.root}`") from None
        if expected is not None and size != expected:
            raise CacheError(f"part {part} of cache {self.root}: {rel} is {size} bytes, "
                             f"expected {expected}; run `tec cache verify` and rewrite the part "
                             f"with `tec cache repair {self.root}`")
        s = layout.read_json(path, f"part {part} sample list")
        if self.spec.backend == "zarr":
            s = s.get("attributes", {}).get("samples", {}) if isinstance(s, dict) else {}
        n = len(s.get("keys", []))
        if not all(len(s.get(k, [])) == n for k in ("slots", "labels", "source_sizes")) \
                or n != marker.get("samples", n):
            raise CacheError(f"part {part} of cache {self.root}: the sample list in {rel} is "
                             f"inconsistent with its commit marker; run `tec cache verify` and "
                             f"rewrite the part with `tec cache repair {self.root}`")
        return s

    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def views_per_sample(self) -> int:
        return self.spec.views

    @property
    def base_model(self) -> dict:
        return self.manifest.get("base_model", {})

    @property
    def complete(self) -> bool:
        return not self.missing_parts

    def index_of(self, key: str) -> int:
        """Sample index of `key` (KeyError if the cache has no such valid sample)."""
        if self._key_index is None:
            self._key_index = {}
            for i, k in enumerate(self.keys):
                self._key_index.setdefault(k, i)
        try:
            return self._key_index[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in cache {self.root}") from None

    def _locate(self, sample_index: int) -> tuple[int, int]:
        i = int(sample_index)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample index {sample_index} out of range [0, {self.num_samples})")
        p = bisect.bisect_right(self._starts, i) - 1
        return p, i - self._starts[p]

    def part_of(self, sample_index: int) -> str:
        return self.parts[self._locate(sample_index)[0]]

    def part_range(self, part: str) -> tuple[int, int]:
        """Sample indices [start, stop) of a committed part."""
        p = self.parts.index(part)
        return self._starts[p], self._starts[p + 1]

    def bad_samples(self, part: str) -> list[dict]:
        """The bad samples stage 1 reported for a committed part ([{'slot', 'key', 'reason'}])."""
        return list(self._markers[part].get("report") or [])

    def slot_of(self, sample_index: int) -> int:
        p, local = self._locate(sample_index)
        return int(self._part_slots[p][local])

    def source_size(self, sample_index: int) -> tuple[int, int]:
        self._locate(sample_index)
        h, w = self._sizes[int(sample_index)]
        return int(h), int(w)

    def check_base_model(self, expected: dict) -> None:
        """Raise CacheError if the cache was built by another base model than `expected`."""
        diffs = fingerprint_mismatch(self.base_model, expected)
        if diffs:
            raise CacheError(f"cache {self.root} was built with a different base model "
                             f"({'; '.join(diffs)}); rebuild the cache for this base model or "
                             f"configure the one it was built with")

    # -- records ------------------------------------------------------------------------------
    def _part_reader(self, p: int):
        if os.getpid() != self._pid:
            self._reset_handles()
        part = self.parts[p]
        r = self._readers.get(part)
        if r is not None:
            return r
        marker = self._markers[part]
        directory = layout.part_dir(self.root, part)
        files = marker.get("files", {})
        if self.spec.backend == "zarr":
            r = ZarrPartReader(directory, self._base_spec, part, self._slots_total[part], files,
                               self._fds, str(self.root))
        else:
            r = WdsPartReader(directory, self._base_spec, part, len(self._part_slots[p]), files,
                              self._fds, str(self.root))
        return self._readers.put(part, r)

    def _check_view(self, view: int) -> int:
        if not isinstance(view, (int, np.integer)) or not 0 <= view < self.spec.views:
            raise IndexError(f"view {view!r} out of range [0, {self.spec.views})")
        return int(view)

    def _record(self, p: int, local: int, view: int, decode: bool, streaming: bool = False) -> dict:
        if view >= self._base_spec.views:  # a view added by `tec cache extend --views`
            start, layer = self._layer_of(view)
            rec = layer._record(p, local, view - start, decode, streaming)
            rec["view"] = view
            return rec
        reader = self._part_reader(p)
        try:
            if self.spec.backend == "zarr":
                stored = reader.read_view(int(self._part_slots[p][local]), view,
                                          use_index_cache=streaming)
            else:
                stored = reader.read_view(local, view)
        except CacheError:
            raise
        except Exception as e:  # I/O errors and the like: name the part, not a traceback
            raise CacheError(f"part {self.parts[p]} of cache {self.root}: reading record {local} "
                             f"view {view} failed ({type(e).__name__}: {e})") from None
        rec = decode_view(stored, decode)
        if "pixels" in stored:  # encoded view image (storage.pixels.decode_pixels)
            rec["pixels"] = stored["pixels"]
        i = self._starts[p] + local
        rec["key"] = self.keys[i]
        rec["view"] = view
        rec["label"] = np.asarray(self.labels[i], dtype=np.int64)
        rec["source_size"] = self._sizes[i].copy()
        return rec

    def stored_nbytes(self, sample_index: int, view: int, fields: Iterable[str] | None = None
                      ) -> int:
        """Bytes of record (sample_index, view) as stored on disk (compressed) that a read of
        ``fields`` (stored field names, 'pixels' for the view image; default: all) uses, without
        the container's framing (shard indexes and chunk checksums, tar headers and padding):
        zarr reads one chunk per field, webdataset the whole record whatever ``fields`` says.
        ValueError for a field the cache does not store."""
        p, local = self._locate(sample_index)
        if fields is not None:
            fields = list(fields)
            known = [*stored_fields(self.spec), *(["pixels"] if self.spec.pixels != "none" else [])]
            unknown = [name for name in fields if name not in known]
            if unknown:
                raise ValueError(f"{', '.join(map(repr, unknown))}: not stored in cache "
                                 f"{self.root} (it stores {', '.join(known)})")
        return self._stored_nbytes(p, local, self._check_view(view), fields)

    def _stored_nbytes(self, p: int, local: int, view: int, fields: list[str] | None) -> int:
        if view >= self._base_spec.views:  # a view added by `tec cache extend --views`
            start, layer = self._layer_of(view)
            return layer._stored_nbytes(p, local, view - start, fields)
        reader = self._part_reader(p)
        if self.spec.backend == "zarr":
            return reader.stored_nbytes(int(self._part_slots[p][local]), view, fields)
        return reader.stored_nbytes(local, view)

    def read(self, sample_index: int, view: int, *, decode: bool = True) -> dict:
        """One (sample, view) record.

        Returns features [L,C], feature_mean [C], feature_std [C], attn_logits [H,k_max+1,L]
        (float32 when decode; stored float16/int8 plus 'features_scale' [L] and
        'attn_logits_scale' [H,k_max+1] for int8 when decode=False), attn_index [k_max] (int64
        when decode), crop [4] (top, left, height, width), flip (0-d bool), label (0-d int64),
        source_size [2] (h, w), key (str), view (int).
        """
        p, local = self._locate(sample_index)
        return self._record(p, local, self._check_view(view), decode)

    def read_batch(self, samples, views, fields: list[str] | None = None, *, pixels: bool = False,
                   out: dict | None = None) -> dict:
        """Records (samples[i], views[i]) stacked in their stored dtypes, without per-record
        dicts or float32 copies (see storage/batch.py); 'pixels': the encoded view images."""
        from .batch import read_batch

        return read_batch(self, samples, views, fields, pixels=pixels, out=out)

    def iter_records(self, views: int | Iterable[int] | None = None, *,
                     per_sample: np.ndarray | Iterable[int] | None = None,
                     parts: Iterable[str] | None = None, decode: bool = True) -> Iterator[dict]:
        """Stream records in storage order (part, slot, view), each as `read` plus 'sample'.

        views: None -> all K views of every sample; an int or a list of ints -> those views.
        per_sample: instead of views, an int array [num_samples] giving the one view to read for
        each sample (-1 skips it): an epoch that uses one view per sample.
        parts: only these committed parts (e.g. a worker's share), in the order given.
        """
        if per_sample is not None:
            if views is not None:
                raise ValueError("iter_records: pass views or per_sample, not both")
            per_sample = np.asarray(per_sample if isinstance(per_sample, np.ndarray)
                                    else list(per_sample))
            if per_sample.shape != (self.num_samples,):
                raise ValueError(f"per_sample has shape {list(per_sample.shape)}, expected "
                                 f"[{self.num_samples}] (one view per sample, -1 to skip)")
            if per_sample.size and (per_sample.min() < -1 or per_sample.max() >= self.spec.views):
                raise ValueError(f"per_sample views must lie in [-1, {self.spec.views})")
        if views is None:
            fixed = list(range(self.spec.views))
        elif isinstance(views, (int, np.integer)):
            fixed = [self._check_view(views)]
        else:
            fixed = [self._check_view(v) for v in views]
        wanted = self.parts if parts is None else list(parts)
        for part in wanted:
            if part not in self._markers:
                raise CacheError(f"part {part!r} is not committed in cache {self.root}")
            p = self.parts.index(part)
            for local in range(self._starts[p + 1] - self._starts[p]):
                i = self._starts[p] + local
                if per_sample is not None:
                    if per_sample[i] < 0:
                        continue
                    vs = [int(per_sample[i])]
                else:
                    vs = fixed
                for v in vs:
                    rec = self._record(p, local, v, decode, streaming=True)
                    rec["sample"] = i
                    yield rec
