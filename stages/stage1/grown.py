"""Stage 1 over a cache grown by ``tec cache extend --shards``: which part each shard is.

A cache's own shards are the ``source`` section of its manifest (part of its identity); shards
added later are the ``shards`` entries of its ``extensions`` section, one part per shard. A shard
list that names the cache's shards plus those of its first j extensions (in any order, as
paths or URLs) is the source of the grown cache: stage 1 resumes it (computing the parts of an
unfinished extension), repair recomputes its parts, stage 2 trains on its samples.

The added parts must be what a stage 1 over all the shards writes, record for record, while
the parts already there stay as they are. Both depend on the whole shard list in two places,
which :func:`check_growth` checks for every earlier step of the history:

* part names (``part_names``): a file name shared by two shards gets the shard's index as a
  prefix, so a new shard named like an old one would rename the old part;
* sample keys (``stages.sources.unique_keys``, the duplicate-key policy): a key found in more
  than one shard is cached as ``<part>/<key>`` in each, so a new shard repeating a key of an old
  shard (a copy of it, or samples named alike) would change the cached key of old records.

Either is refused with one line naming the shard and the key; nothing is ever cached twice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Stage1Error

__all__ = ["Growth", "check_growth", "grown_layout", "history_steps", "norm_shard",
           "shard_prefix", "source_prefix"]


def norm_shard(path) -> str:
    """A shard as compared across configs: a URL as written, a file by its real path."""
    from storage.objstore import is_url

    return str(path) if is_url(path) else os.path.realpath(os.path.expanduser(str(path)))


def history_steps(manifest: dict, *, pending: bool = True) -> list[tuple[list[str], list[dict]]]:
    """[(shards, parts)] of the cache's own source, then of each shard extension in order (with
    ``pending``, the unfinished one too)."""
    from storage.cache import manifest_shards, shard_entries

    steps = [(manifest_shards(manifest, 0), list(manifest["parts"]))]
    for entry in shard_entries(manifest, pending=pending):
        steps.append(([str(s) for s in entry["shards"]], list(entry["parts"])))
    return steps


def shard_prefix(manifest: dict, shards: list[str], *, pending: bool = False) -> int | None:
    """j when ``shards`` are the cache's own shards plus those of its first j shard extensions
    (complete ones; with ``pending`` the unfinished one counts), else None."""
    wanted = {norm_shard(s) for s in shards}
    if len(wanted) != len(shards):
        return None
    have: set[str] = set()
    for j, (step, _) in enumerate(history_steps(manifest, pending=pending)):
        have |= {norm_shard(s) for s in step}
        if have == wanted:
            return j
        if not have <= wanted:
            return None
    return None


@dataclass
class Growth:
    """Stage 1's view of a grown cache's source, one entry per shard (source order)."""

    steps: int  # the cache's own source plus this many shard extensions
    names: list[str]  # the part of each shard
    renames: list[dict]  # each shard's stages.sources.unique_keys renames


def grown_layout(manifest: dict, shards: list[str], scans: list[tuple[int, list[str]]]) \
        -> Growth | None:
    """The parts of the grown cache that ``shards`` (with their headers-only ``scans``) are the
    source of, checked (:func:`check_growth`); None when ``shards`` are not the source of a
    grown cache (the cache's own shards, or another list: create_cache decides)."""
    j = shard_prefix(manifest, shards, pending=True)
    if not j:
        return None
    steps = history_steps(manifest, pending=True)[:j + 1]
    names, renames = check_growth(steps, shards, scans)
    return Growth(steps=j, names=names, renames=renames)


def check_growth(steps: list[tuple[list[str], list[dict]]], shards: list[str],
                 scans: list[tuple[int, list[str]]]) -> tuple[list[str], list[dict]]:
    """Check that ``shards`` (every shard of ``steps``, in source order) give each step's shards
    the parts recorded for them, and that each earlier step's sample keys stay as they were;
    returns (part names, unique_keys renames) of ``shards``. Raises Stage1Error (one line)."""
    from stages.sources import unique_keys

    from .shard import part_names

    names = part_names(shards)
    keys = [k for _, k in scans]
    renames = unique_keys(keys, names)
    index = {norm_shard(s): i for i, s in enumerate(shards)}
    for shards_of_step, parts in steps:
        for shard, part in zip(shards_of_step, parts):
            i = index.get(norm_shard(shard))
            if i is None:
                raise Stage1Error(f"shard {shard} of part {part['name']} is not among the shards "
                                  "given; give every shard of the cache")
            if names[i] != part["name"]:
                raise Stage1Error(
                    f"shard {shard}: its part would be named {names[i]!r} next to the other "
                    f"shards, but the cache holds it as part {part['name']!r} (shard file names "
                    "collide); give the new shards other file names")
            if int(scans[i][0]) != int(part["slots"]):
                raise Stage1Error(
                    f"shard {shard} holds {scans[i][0]} samples, its part {part['name']} "
                    f"{part['slots']} slots: the shard changed since it was cached; restore it")
    # each earlier step of the history reads its keys as it did before the later shards came
    seen: list[int] = []
    for shards_of_step, _ in steps[:-1]:
        seen += [index[norm_shard(s)] for s in shards_of_step]
        before = sorted(seen)  # the source lists shards in order: as that step's stage 1 did
        then = unique_keys([keys[i] for i in before], part_names([shards[i] for i in before]))
        for i, old in zip(before, then):
            if old != renames[i]:
                key = next(k for k in sorted(set(old) | set(renames[i]), key=str)
                           if old.get(k, k) != renames[i].get(k, k))
                other = next((shards[o] for o in range(len(shards))
                              if o not in before and key in keys[o]), "a later shard")
                raise Stage1Error(
                    f"sample key {key!r} of shard {shards[i]} also names a sample of {other}: "
                    "keys repeated across shards are cached as <part>/<key> (the duplicate-key "
                    "policy), so adding it would change the key of a cached record; give the "
                    "new samples other keys, or build a new cache over all the shards")
    return names, renames


def source_prefix(manifest: dict, kind: str, path: str) -> tuple[int | None, list[str] | None]:
    """Which shards of a cache grown by ``tec cache extend --shards`` a run configured with the
    source (``kind``, ``path``) uses: (j, its shards in source order) when they are the cache's
    own shards plus those of its first j shard extensions; (None, None) for a cache without
    shard extensions. A source that cannot be listed is recognised by its spec as the cache
    records it (j, None): a cache with view pixels needs no source images. Raises ValueError
    (one line) for a source that is none of these."""
    from stages.sources import open_source
    from storage.cache import shard_entries
    from storage.util import first_line

    entries = shard_entries(manifest)
    if not entries or kind != "webdataset":
        return None, None
    own = (manifest.get("source") or {}).get("path")
    specs = ["::".join([str(own)] + [str(e["path"]) for e in entries[:j]])
             for j in range(len(entries) + 1)]
    try:
        shards = [str(s) for s in open_source(kind, path).shards()]
    except (ValueError, OSError) as exc:
        if str(path) in specs:
            return specs.index(str(path)), None
        raise ValueError(f"the configured source {path} cannot be listed ({first_line(exc)}) "
                         "to tell which of the cache's shards the run uses; restore it or "
                         f"configure {own!r} (plus the specs the cache was extended with)") \
            from None
    j = shard_prefix(manifest, shards)
    if j is None:
        counts = [len(step) for step, _ in history_steps(manifest, pending=False)]
        raise ValueError(
            f"the configured source {path} names {len(shards)} shard(s), but the cache was "
            f"built from {counts[0]} shard(s) of {own!r} and extended with "
            f"{' + '.join(map(str, counts[1:]))} more (tec cache extend --shards): the source "
            "must be its shards plus those of its first extensions; use the source the cache "
            "was built from or extended with")
    return j, shards
