"""What a stage-2 run was trained from: its settings, the cache's identity and the base model.

Recorded in every checkpoint (``identity``) and compared when a run folder is reused: a finished
or half-trained run is continued only when everything it was built from is the same, so old
results are never reported for new settings. Operational settings (loader workers, logging and
checkpoint cadence, max_steps, device) do not change what is trained and are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OPERATIONAL_KEYS", "cache_use", "identity_changes", "run_identity", "set_aside",
           "stale_changes"]

OPERATIONAL_KEYS = frozenset({
    "name", "num_workers", "prefetch_factor", "persistent_workers", "pin_memory", "log_every",
    "checkpoint_every", "keep_checkpoints", "max_steps", "device", "max_fallback_fraction",
})

# settings left out of a run's identity while they have these values (a random-access run's
# identity is what it was before the streaming read mode existed)
_LEFT_OUT = {"read": "random"}


def run_identity(run, *, cache: str | None, base=None, needs_targets: bool = True,
                 views: int | None = None, shard_extensions: int | None = None) -> dict:
    """{'run': settings, 'cache': {'identity', 'sections'[, 'views'][, 'shards']} | None,
    'base_model': dict | None}.

    cache: the cache folder the run reads (its manifest identity: spec, base-model fingerprint,
    view policy, source, parts); base: the base model (a stages.resolve.ResolvedBase, or a
    BaseModelConfig resolved here; recorded by arch, geometry and checkpoint sha256 when no
    cache records it). Of a cache grown by `tec cache extend`, what the run reads of it:
    ``views`` (its targets.views; None: all) and ``shard_extensions`` (the shard extensions its
    source names; None: all). Recorded only when they reach beyond what the cache was built with
    ('views': the views read; 'shards': the checksums of the shard extensions read), so a run of
    the cache as it was built keeps the identity it had.
    """
    from .configs import to_dict

    settings = {k: v for k, v in to_dict(run).items() if k not in OPERATIONAL_KEYS}
    if settings.get("read", "random") == "random":  # random access: as before read/shuffle_buffer
        settings.pop("read", None)
        settings.pop("shuffle_buffer", None)
    cache_id, base_id = None, None
    from storage.objstore import as_root

    if cache is not None and (as_root(cache) / "manifest.json").is_file():
        from storage.schema import manifest_identity, manifest_section_digests

        manifest = json.loads((as_root(cache) / "manifest.json").read_text())
        cache_id = {"identity": manifest_identity(manifest),
                    "sections": manifest_section_digests(manifest)}
        cache_id.update(_grown_use(manifest, views, shard_extensions))
        base_id = manifest.get("base_model")
    if needs_targets and base_id is None and base is not None:
        from .resolve import as_resolved

        base_id = as_resolved(base).identity()
    return {"run": settings, "cache": cache_id, "base_model": base_id if needs_targets else None}


def _setting(settings: dict, key: str):
    return settings.get(key, _LEFT_OUT.get(key))


def _grown_use(manifest: dict, views: int | None, shard_extensions: int | None) -> dict:
    """What a run reads of a cache grown by `tec cache extend` beyond what it was built with."""
    from storage.cache import shard_entries, shard_entry_identity, views_in_use

    out = {}
    try:
        used = views_in_use(manifest, views)
        entries = shard_entries(manifest)
    except (KeyError, TypeError, ValueError):
        return out  # a malformed manifest: opening the cache names the problem
    if used != int(manifest["spec"]["views"]):
        out["views"] = used
    if shard_extensions is not None:
        entries = entries[:shard_extensions]
    if entries:
        out["shards"] = [shard_entry_identity(e) for e in entries]
    return out


def cache_use(cache: str | None, *, views: int | None, source) -> dict:
    """The ``views`` / ``shard_extensions`` keywords of :func:`run_identity` for a run configured
    with targets.views ``views`` and the source ``source`` (as stage 2 resolves them)."""
    if cache is None:
        return {}
    try:
        from stages.train.inputs import shards_in_use

        shard_extensions = shards_in_use(str(cache), source)[0]
    except ValueError:  # the run refuses that source itself, naming why
        shard_extensions = None
    return {"views": views, "shard_extensions": shard_extensions}


def _value(v) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def identity_changes(old: dict | None, new: dict) -> list[str]:
    """What differs between the recorded identity ``old`` and ``new`` ([] = the same inputs)."""
    if not isinstance(old, dict):
        return ["its checkpoint does not record the cache and base model it was trained from "
                "(written by an older version)"]
    changes = []
    a, b = old.get("run") or {}, new.get("run") or {}
    for key in sorted(set(a) | set(b)):
        if key in OPERATIONAL_KEYS or _setting(a, key) == _setting(b, key):
            continue
        if key == "shuffle_buffer" and (key not in a or key not in b):
            continue  # read changed (listed): the buffer of a random-access run does not count
        if key == "model" and isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            ma, mb = a[key], b[key]
            changes += [f"model.{k} {_value(ma.get(k))} -> {_value(mb.get(k))}"
                        for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
        else:
            changes.append(f"{key} {_value(_setting(a, key))} -> {_value(_setting(b, key))}")
    ca, cb = old.get("cache"), new.get("cache")
    if ca and cb and ca.get("identity") == cb.get("identity"):
        # the same cache, grown by `tec cache extend`: the views and shards read must match too
        if ca.get("views") != cb.get("views"):
            changes.append(f"the cache's views read ({ca.get('views') or 'as built'} -> "
                           f"{cb.get('views') or 'as built'}: tec cache extend --views)")
        if (ca.get("shards") or []) != (cb.get("shards") or []):
            changes.append(f"the cache's shards read ({len(ca.get('shards') or [])} -> "
                           f"{len(cb.get('shards') or [])} shard extensions: tec cache extend "
                           "--shards)")
    if (ca or {}).get("identity") != (cb or {}).get("identity"):
        if ca and cb:
            sa, sb = ca.get("sections") or {}, cb.get("sections") or {}
            sections = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
            changes.append("the cache (" + (", ".join(sections) or "identity") + " changed)")
        else:
            changes.append("the cache (" + ("none" if not ca else "a cache") + " -> "
                           + ("none" if not cb else "a cache") + ")")
    ba, bb = old.get("base_model"), new.get("base_model")
    if ba != bb:
        if isinstance(ba, dict) and isinstance(bb, dict):
            keys = [k for k in sorted(set(ba) | set(bb)) if ba.get(k) != bb.get(k)]
            changes.append("the base model (" + ", ".join(keys) + ")")
        else:
            changes.append("the base model")
    return changes


def stale_changes(run_dir: str | Path, run, *, cache: str | None, base=None,
                  views: int | None = None, source=None) -> list[str]:
    """What changed since the run folder's latest checkpoint was written ([] when nothing did
    or there is no checkpoint): the check `tec run` makes before reusing or resuming a run.
    views, source: the run's targets.views and source (what it reads of a grown cache)."""
    from .checkpoint import Checkpointer, load_checkpoint

    latest = Checkpointer(Path(run_dir) / "checkpoints", keep=1, is_writer=False).latest()
    if latest is None:
        return []
    needs_targets = run.model.target == "tec"
    state = load_checkpoint(latest)
    use = cache_use(cache, views=views, source=source) if needs_targets else {}
    return identity_changes(state.get("identity"),
                            run_identity(run, cache=cache, base=base, needs_targets=needs_targets,
                                         **use))


def set_aside(run_dir: str | Path) -> Path:
    """Rename a stale run folder to ``<name>.stale-<n>`` (kept, never deleted); returns it."""
    run_dir = Path(run_dir)
    n = 1
    while (run_dir.parent / f"{run_dir.name}.stale-{n}").exists():
        n += 1
    target = run_dir.parent / f"{run_dir.name}.stale-{n}"
    run_dir.rename(target)
    return target
