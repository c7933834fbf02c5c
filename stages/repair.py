"""``tec cache repair``: recompute exactly the parts of a cache that verification finds damaged.

``verify_cache(deep=True)`` names every damaged part (files missing, truncated or changed, a part
folder replaced by a link, a commit marker lost, records that do not decode or hold NaN/inf).
Those parts are uncommitted (their marker and data removed) and stage 1 recomputes them, and
only them, with the settings and base model the cache was built with
(``<cache>/reports/stage1_config.json``, written by stage 1, or a pipeline file's ``targets``
and ``base_model``). Stage 1 is deterministic, so a repaired part is the part an undamaged run
would have written. Parts of shards added by ``tec cache extend --shards`` are recomputed the
same way (stage 1 reads the cache's shards and those it was extended with).

A view layer (``tec cache extend --views``) is repaired like the cache: its damaged parts are
recomputed, and a layer whose manifest is lost, unreadable, edited or not the one the extension
recorded is rebuilt: deleted and computed again, view for view the layer it was (its identity
checksum is the recorded one again). Damage to the cache's own manifest is not repairable this
way: it is reported.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["RepairSummary", "damaged_parts", "repair_cache"]

_PART_LINE = re.compile(r"^part (\S+): ")
_LAYER_LINE = re.compile(r"^view layer (\S+): (.*)$")
REBUILD = "rebuilt"  # a view layer whose manifest is damaged: computed anew


@dataclass
class RepairSummary:
    cache: str
    damaged: dict = field(default_factory=dict)  # part -> first problem
    recomputed: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # view layer -> {part: problem} or REBUILD
    problems_after: list = field(default_factory=list)
    stage1: object = None  # stages.stage1.Stage1Summary of the recomputation

    def format(self) -> str:
        if not self.damaged and not self.layers:
            return f"ok: no damaged part in {self.cache}; nothing to repair"
        lines = [f"repaired      {len(self.recomputed)} part(s) of {self.cache}: "
                 f"{', '.join(self.recomputed)}"] if self.damaged else []
        lines += [f"  {part}: was {why}" for part, why in self.damaged.items()]
        for rel, what in self.layers.items():
            if what == REBUILD:
                lines.append(f"rebuilt       view layer {rel} (its manifest was damaged)")
            else:
                lines.append(f"repaired      {len(what)} part(s) of view layer {rel}: "
                             f"{', '.join(sorted(what))}")
                lines += [f"  {part}: was {why}" for part, why in what.items()]
        if self.stage1 is not None:
            lines.append(f"recomputed    {self.stage1.images} images, {self.stage1.views} views, "
                         f"{self.stage1.forward_passes} base-model forward passes "
                         f"({self.stage1.parts_skipped} intact parts kept as they were)")
        lines.append("verify        " + ("ok: every part matches its checksums and decodes to "
                                         "finite values" if not self.problems_after else
                                         f"{len(self.problems_after)} problem(s) left"))
        return "\n".join(lines)


def damaged_parts(root: str | Path) -> tuple[dict[str, str], list[str]]:
    """({part: first problem} of the parts a deep verify finds damaged, [other problems])."""
    parts, layers, other = _damage(root)
    return parts, other + [f"view layer {rel}: damaged" for rel in layers]


def _damage(root) -> tuple[dict[str, str], dict[str, object], list[str]]:
    """What a (deep) verify finds: ({part: problem}, {view layer: {part: problem} or REBUILD},
    [problems that are neither: the cache's manifest])."""
    from storage import verify_cache

    parts: dict[str, str] = {}
    layers: dict[str, object] = {}
    other: list[str] = []
    problems = verify_cache(root)
    if not problems:
        problems = verify_cache(root, deep=True)
    for line in problems:
        match, layer = _PART_LINE.match(line), _LAYER_LINE.match(line)
        if match:  # damaged, or never committed (a lost marker): stage 1 writes it anew
            parts.setdefault(match.group(1), line.split(": ", 1)[1])
        elif layer:
            rel, what = layer.groups()
            part = _PART_LINE.match(what)
            if part and layers.get(rel) != REBUILD:
                layers.setdefault(rel, {}).setdefault(part.group(1), what.split(": ", 1)[1])
            elif not part:  # its manifest: lost, unreadable, edited or not the recorded one
                layers[rel] = REBUILD
        else:
            other.append(line)
    return parts, layers, other


@contextlib.contextmanager
def _cwd(path: str | None):
    old = os.getcwd()
    if path:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _stage1_settings(root: Path, config):
    """(Stage1Config, BaseModelConfig, cwd) to recompute parts of the cache at ``root`` with."""
    from stages.configs import BaseModelConfig, ConfigError, from_dict
    from stages.stage1 import CONFIG_NAME, Stage1Config

    if config is not None:  # a PipelineConfig
        import dataclasses

        targets = dataclasses.replace(config.targets, cache=str(root))
        return targets, config.base_model, None
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"cache {root} does not record the stage-1 settings it was built with "
                          f"({CONFIG_NAME} is missing: written before `tec cache repair` existed); "
                          "give the pipeline file: tec cache repair CACHE --config PIPELINE.yaml")
    saved = json.loads(path.read_text())
    targets = dict(saved["targets"])
    cwd = saved.get("cwd")
    targets["cache"] = str(root)
    return (from_dict(Stage1Config, targets, "targets"),
            from_dict(BaseModelConfig, saved["base_model"], "base_model"), cwd)


def _uncommit(root, parts: dict[str, str]) -> None:
    """Uncommit parts: the marker first (the commit point), then the data."""
    from storage import layout

    for part in parts:
        layout.marker_path(root, part).unlink(missing_ok=True)
        layout.remove_tree(layout.part_dir(root, part))
        logger.info("part %s of %s uncommitted for recomputation (%s)", part, root, parts[part])


def _repair_settings(root, config):
    """The cache's stage-1 settings, reading its own shards and every shard it was extended
    with (`tec cache extend --shards`), at the views its own parts hold."""
    import dataclasses

    from stages.extend import grown_path
    from storage import layout

    targets, base, cwd = _stage1_settings(root, config)
    manifest = layout.read_json(layout.manifest_path(root), "manifest")
    source = dataclasses.replace(targets.source, path=grown_path(manifest))
    return (dataclasses.replace(targets, source=source, views=int(manifest["spec"]["views"]),
                                first_view=0), base, cwd)


def _repair_layer(root, rel: str, what, targets, base, ray_address, progress) -> None:
    """Recompute the damaged parts of view layer ``rel``, or rebuild it (REBUILD)."""
    import dataclasses

    from stages.extend import build_view_layer
    from stages.stage1 import run_stage1
    from storage import layout
    from storage.cache import EXTENSIONS_KEY

    manifest = layout.read_json(layout.manifest_path(root), "manifest")
    entry = next(e for e in manifest.get(EXTENSIONS_KEY) or []
                 if isinstance(e, dict) and e.get("path") == rel)
    start, stop = (int(v) for v in entry["views"])
    if what == REBUILD:
        logger.info("view layer %s of %s: its manifest is damaged; rebuilding it", rel, root)
        layout.remove_tree(root / rel)
        build_view_layer(root, manifest, rel, start, stop, targets, base,
                         ray_address=ray_address, progress=progress)
        return
    _uncommit(root / rel, what)
    run_stage1(dataclasses.replace(targets, cache=str(root / rel), views=stop - start,
                                   first_view=start, strict=False),
               base, ray_address=ray_address, strict=False, progress=progress)


def repair_cache(path: str | Path, *, config=None, ray_address: str | None = None,
                 progress: bool = True) -> RepairSummary:
    """Recompute the damaged parts of the cache at ``path`` (see the module docstring).

    config: a PipelineConfig whose targets/base_model to use instead of the recorded settings.
    Raises ValueError (one line) when the damage is not in parts (an edited or unreadable
    manifest) or a part is still damaged afterwards.
    """
    from storage import layout, verify_cache
    from storage.objstore import Url, as_root
    from storage.schema import CacheError

    root = as_root(path)  # a folder or an object-store URL
    if not isinstance(root, Url):
        root = root.resolve()
    if not (root / layout.MANIFEST).is_file():
        raise FileNotFoundError(f"no target cache at {path} ({layout.MANIFEST} missing)")
    summary = RepairSummary(cache=str(root))
    settings = None
    # checksum damage hides deeper damage (records are decoded only once the files are right):
    # a second round repairs what the deep check finds after the first
    for _ in range(3):
        parts, layers, other = _damage(root)
        if other:
            if other[0].startswith("shard extension "):
                raise CacheError(f"cache {root}: {other[0]} before repairing it")
            raise CacheError(f"cache {root}: {other[0]} - this is damage to the manifest, not to "
                             "a part; `tec cache repair` recomputes parts only")
        if not parts and not layers:
            break
        summary.damaged.update({p: why for p, why in parts.items() if p not in summary.damaged})
        settings = settings or _repair_settings(root, config)
        targets, base, cwd = settings
        _uncommit(root, parts)
        from stages.stage1 import run_stage1

        with _cwd(cwd):
            if parts:
                summary.stage1 = run_stage1(targets, base, ray_address=ray_address,
                                            strict=False, progress=progress)
            for rel, what in layers.items():
                _repair_layer(root, rel, what, targets, base, ray_address, progress)
                if what == REBUILD or summary.layers.get(rel) == REBUILD:
                    summary.layers[rel] = REBUILD
                else:
                    summary.layers.setdefault(rel, {}).update(what)
        summary.recomputed = sorted(set(summary.recomputed) | set(parts))
    summary.problems_after = verify_cache(root) or verify_cache(root, deep=True)
    if summary.problems_after:
        raise CacheError(f"cache {root}: still damaged after the repair: "
                         f"{summary.problems_after[0]}")
    return summary
