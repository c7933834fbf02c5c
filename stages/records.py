"""Stage 2: which cache record each source sample trains on, and the missing-record policy.

A complete cache holds, for every sample of every shard, either its K view records or an entry
in its part's bad-sample report (stage 1 could not decode it). :func:`match_records` maps each
source sample to its record *within its own part* (keys are unique per part; stages.sources
.unique_keys makes them unique across the source too, and caches written before that are still
read right), so two samples never share a record. Samples without a record are:

* ``KNOWN_BAD``: listed as bad by stage 1, so never cached: skipped (counted);
* ``MISSING``: neither cached nor reported (a damaged part, a shard changed since stage 1):
  they fall back to online targets (or are skipped without a base model) and are counted in the
  summary and in metrics; :func:`check_missing` refuses the run when they are more than
  ``max_fallback_fraction`` of the samples, naming the part that lacks the most.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .configs import ConfigError

__all__ = ["KNOWN_BAD", "MISSING", "MissingRecordsError", "check_missing", "fallback_limit",
           "match_records", "sample_parts"]

MISSING = -1
KNOWN_BAD = -2


class MissingRecordsError(ConfigError):
    """A cache that claims completeness lacks records for samples the run needs (one line)."""


def sample_parts(reader, kind: str, source_index) -> np.ndarray | None:
    """int64 [N]: the position (in the manifest's parts) of each source sample's part, or None
    when the source no longer lines up with the manifest (then keys are matched cache-wide).

    Tar shards: the part of the sample's shard (the reader's parts, with those of the shards a
    cache was extended with, each from one shard). Image folders: consecutive runs of the
    manifest's slot counts (files in source order).
    """
    parts = reader.part_entries
    n = len(source_index)
    if kind == "webdataset":
        if len(source_index.files) != len(parts):
            return None
        if list(source_index.files) == list(reader.shards):
            return np.asarray(source_index.file, dtype=np.int64)
        from .stage1.grown import norm_shard

        position = {norm_shard(s): i for i, s in enumerate(reader.shards)}
        of_file = [position.get(norm_shard(f)) for f in source_index.files]
        if None in of_file:
            return None
        return np.asarray(of_file, dtype=np.int64)[np.asarray(source_index.file, dtype=np.int64)]
    slots = [int(p["slots"]) for p in parts]
    if sum(slots) != n:
        return None
    return np.repeat(np.arange(len(parts), dtype=np.int64), slots)


def match_records(reader, keys: list[str], part_of: np.ndarray | None) -> np.ndarray:
    """int64 [N]: the cache record of each source sample, ``KNOWN_BAD`` or ``MISSING``.

    A sample is looked up in its own part (``part_of``), by its key or, for caches written
    before keys repeated across shards were qualified (``<part>/<key>``), by the bare key.
    """
    names = [p["name"] for p in reader.part_entries]
    committed = set(reader.parts)
    records: dict[str, dict[str, int]] = {}
    bad: dict[str, set[str]] = {}
    for part in reader.parts:
        start, stop = reader.part_range(part)
        records[part] = {reader.keys[i]: i for i in range(start, stop)}
        bad[part] = {str(e.get("key")) for e in reader.bad_samples(part)}
    if part_of is None:  # cache-wide, first record of a key
        everywhere: dict[str, int] = {}
        for part in reader.parts:
            for key, i in records[part].items():
                everywhere.setdefault(key, i)
        reported = set().union(*bad.values()) if bad else set()
        return np.array([everywhere.get(k, KNOWN_BAD if k in reported else MISSING)
                         for k in keys], dtype=np.int64)
    out = np.full(len(keys), MISSING, dtype=np.int64)
    for i, (key, p) in enumerate(zip(keys, part_of.tolist())):
        part = names[p]
        if part not in committed:
            continue
        found = records[part].get(key)
        if found is None and key.startswith(part + "/"):
            found = records[part].get(key[len(part) + 1:])  # written before keys were qualified
        if found is not None:
            out[i] = found
        elif key in bad[part] or key[len(part) + 1:] in bad[part]:
            out[i] = KNOWN_BAD
    return out


def fallback_limit(run) -> float:
    """The largest share of samples that may lack their record: ``run.max_fallback_fraction``,
    by default 0 when the run reads only cached targets (online_fraction 0), else its
    online_fraction (the run computes that share of targets online anyway)."""
    limit = getattr(run, "max_fallback_fraction", None)
    if limit is None:
        limit = float(run.online_fraction)
    return float(limit)


def check_missing(cache_index: np.ndarray, part_of: np.ndarray | None, reader, keys: list[str],
                  *, run, cache) -> int:
    """Refuse (MissingRecordsError) when more than :func:`fallback_limit` of the samples lack
    their record without being reported bad; returns how many lack one. Also refuses a mapping
    that puts two samples on one record."""
    rows = cache_index[cache_index >= 0]
    if len(np.unique(rows)) != len(rows):
        raise MissingRecordsError(
            f"cache {cache}: {len(rows) - len(np.unique(rows))} records would serve two source "
            "samples; the source changed since stage 1 - rebuild the cache")
    missing = np.flatnonzero(cache_index == MISSING)
    names = [p["name"] for p in reader.part_entries]
    damaged = {names[p] for p in part_of[missing].tolist()} if part_of is not None else set()
    used = np.zeros(reader.num_samples, dtype=bool)
    used[rows] = True
    # records no sample reads: the source is another one, unless they sit in a part that also
    # lacks records of its own samples (its data belongs elsewhere: counted as missing below)
    unknown = sum(int((~used[slice(*reader.part_range(part))]).sum())
                  for part in reader.parts if part not in damaged)
    if unknown > 0:
        raise MissingRecordsError(
            f"cache {cache}: {unknown} cached samples are not in the source shards; use the "
            "source the cache was built from")
    if len(missing) == 0:
        return 0
    limit = fallback_limit(run)
    share = len(missing) / max(len(cache_index), 1)
    if part_of is not None:
        per_part = Counter(names[p] for p in part_of[missing].tolist())
        part, count = per_part.most_common(1)[0]
        first = keys[int(next(i for i in missing if names[part_of[i]] == part))]
        where = (f"part {part} has no record for {count} of its samples (first: {first!r}) and "
                 "does not report them as bad" + (f"; {len(per_part) - 1} more part(s) lack "
                                                 "records" if len(per_part) > 1 else ""))
    else:
        where = (f"{len(missing)} samples (first: {keys[int(missing[0])]!r}) have no record and "
                 "are not reported as bad")
    if share > limit:
        raise MissingRecordsError(
            f"cache {cache} claims to be complete but {where}: {share:.1%} of the samples would "
            f"fall back to online targets (allowed: {limit:.1%}); run `tec cache verify {cache}` "
            f"and `tec cache repair {cache}`, or allow it with runs.{run.name}."
            f"max_fallback_fraction")
    return len(missing)
