"""Shared pieces of the reliability suite (``tests/test_reliability_*.py``); no tests live here.

The suite injects faults into both stages and counts, per category, how many cases were tried and
how many passed; ``benchmarks/reliability.py`` runs it (slow cases included) and writes
``benchmarks/results/reliability.json``. A test declares its category with :func:`category` and,
when it checks several sub-cases at once, reports them with :func:`record_cases`; details (kill
points, parts recomputed, ...) go through :func:`record_details`.

Builders here are tiny on purpose: base model img 32 / patch 8 / width 48 / depth 3 / 3 heads
(L = 16 patches), shards of a few generated images, K = 2 views, k_max = 4.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from image_helpers import make_shards

from stages.configs import BaseModelConfig, from_dict, to_dict

CATEGORIES = ("stage1_crashes", "bad_input", "damaged_caches", "stage2_crashes", "bad_config",
              "untrusted_files", "duplicate_keys", "missing_records", "stale_reuse",
              "deterministic_failures", "deep_damage")

ARCH = "vit_base_patch16_224"
BASE_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
STUDENT = dict(embed_dim=48, depth=3, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=2, k=4, tau=1.0)
VIEWS = 2
K_MAX = 4
RECORD_FIELDS = ("features", "feature_mean", "feature_std", "attn_logits", "attn_index", "crop",
                 "flip", "label", "source_size")


# ------------------------------------------------------------------------------ bookkeeping
def category(name: str):
    """Tag a test function with its reliability category (read by benchmarks/reliability.py)."""
    assert name in CATEGORIES, name

    def tag(fn):
        fn.reliability_category = name
        return fn

    return tag


def record_cases(record_property, results: dict[str, tuple[bool, str]]) -> None:
    """Report sub-cases {name: (ok, detail)} of one test: it counts as len(results) cases."""
    record_property("reliability_cases", {
        "tried": len(results), "passed": sum(ok for ok, _ in results.values()),
        "failed": {name: detail for name, (ok, detail) in results.items() if not ok}})


def record_details(record_property, **details) -> None:
    """Extra facts of a case (kill points, parts recomputed, ...) for the JSON report."""
    record_property("reliability_details", details)


def assert_all_ok(results: dict[str, tuple[bool, str]]) -> None:
    failed = {name: detail for name, (ok, detail) in results.items() if not ok}
    assert not failed, "\n".join(f"{name}: {detail}" for name, detail in failed.items())


@contextlib.contextmanager
def fsync_off():
    """no_fsync for module-scoped fixtures (the environment is restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEC_CACHE_FSYNC", "0")
        yield


# ------------------------------------------------------------------------------ builders
def save_base_model(path: Path, seed: int = 0) -> BaseModelConfig:
    """A random tiny timm ViT saved as .safetensors; returns its BaseModelConfig."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **BASE_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return from_dict(BaseModelConfig, {"arch": ARCH, "checkpoint": str(path),
                                       "timm_kwargs": dict(BASE_KWARGS)}, "base_model")


def make_data(directory: Path, n_shards: int = 2, per_shard: int = 4, seed: int = 0) -> list[str]:
    return make_shards(directory, n_shards=n_shards, per_shard=per_shard, size_range=(24, 48),
                       seed=seed)


def stage1_config(source: str | Path, cache: str | Path, **overrides):
    """A tiny validated Stage1Config (zarr, float16, K=2, k_max=4, batch 4, view seed 7)."""
    from stages.stage1 import Stage1Config

    raw = {"source": {"kind": "webdataset", "path": str(source)}, "cache": str(cache),
           "views": VIEWS, "k_max": K_MAX, "batch_size": 4,
           "view_policy": {"seed": 7, "output_size": 32}}
    raw.update(overrides)
    return from_dict(Stage1Config, raw, "targets")


def stage1_in_process(cfg, base: BaseModelConfig, *, actor_hook: Callable | None = None,
                      parts: tuple[str, ...] | None = None) -> dict:
    """Stage 1 without Ray: the same shard task (``process_shard``) and base-model actor class,
    run in this process one part after another. Resumes like ``run_stage1`` (committed parts
    are skipped). actor_hook(call_number) runs before every base-model call (fault injection).
    Returns {'computed': [parts], 'skipped': [parts]}.
    """
    from stages.sources import open_source
    from stages.stage1 import (
        BaseModelActor,
        ShardJob,
        _record_config,
        part_names,
        process_shard,
        resolve_precision,
    )
    from storage import CacheSpec, create_cache

    model = base.load()
    fingerprint = base.fingerprint(model, last_n=cfg.last_n, k_max=cfg.k_max)
    source = open_source("webdataset", cfg.source.path)
    from stages.sources import unique_keys

    shards = [os.path.abspath(s) for s in source.shards()]
    scans = [source.scan(s) for s in shards]
    counts = [n for n, _ in scans]
    names = part_names(shards)
    renames = unique_keys([keys for _, keys in scans], names)  # as run_stage1
    spec = CacheSpec(num_patches=16, channels=BASE_KWARGS["embed_dim"],
                     heads=BASE_KWARGS["num_heads"], k_max=cfg.k_max, views=cfg.views,
                     codec=cfg.codec, backend=cfg.backend)
    writer = create_cache(cfg.cache, spec, base_model=fingerprint,
                          view_policy={**cfg.view_policy.to_dict(), "views": cfg.views,
                                       **({"first_view": cfg.first_view} if cfg.first_view
                                          else {})},  # a view layer, as run_stage1
                          source={"kind": "webdataset", "path": cfg.source.path, "shards": shards,
                                  "num_samples": sum(counts)},
                          parts=list(zip(names, counts)),
                          targets={"precision": resolve_precision(cfg)})  # as run_stage1
    actor = BaseModelActor(to_dict(base), cfg.last_n, cfg.k_max,
                           float16=cfg.codec == "float16")
    calls = {"n": 0}

    def call(views):
        calls["n"] += 1
        if actor_hook is not None:
            actor_hook(calls["n"])
        return actor(views)

    done = {"computed": [], "skipped": []}
    for i, (shard, name, count) in enumerate(zip(shards, names, counts)):
        if (parts is not None and name not in parts) or writer.is_committed(name):
            done["skipped"].append(name)
            continue
        job = ShardJob(shard=shard, part=name, index=i, slots=count, source_kind="webdataset",
                       source_path=cfg.source.path, shard_size=1000, cache=str(cfg.cache),
                       views=cfg.views, policy=cfg.view_policy.to_dict(),
                       batch_size=cfg.batch_size, max_in_flight=cfg.max_in_flight,
                       renames=renames[i], first_view=cfg.first_view)
        process_shard(job, [call], writer)
        done["computed"].append(name)
    writer.finalize()
    _record_config(cfg, base)  # as run_stage1: what `tec cache repair` recomputes parts with
    return done


def run_config(name: str = "run", **overrides):
    """A tiny validated TrainConfig (CPU, no loader workers, deterministic)."""
    from stages.train import TrainConfig

    values = dict(name=name, epochs=2, batch_size=4, model=dict(STUDENT), blr=0.05,
                  warmup_epochs=0.0, num_workers=0, log_every=1, device="cpu", seed=0,
                  deterministic=True)
    model = overrides.pop("model", None)
    if model is not None:
        values["model"] = {**STUDENT, **model}
    values.update(overrides)
    return from_dict(TrainConfig, values, "run")


class Source:
    """A SourceConfig-like (kind, path) for stages.train.train."""

    def __init__(self, path: str, kind: str = "webdataset"):
        self.kind, self.path = kind, str(path)


def pipeline_yaml(path: Path, *, shards: str, base: BaseModelConfig, cache: str | Path,
                  workdir: str | Path, run: dict | None = None,
                  targets: dict | None = None) -> Path:
    """Write a tiny pipeline.yaml for the CLI (`tec train CONFIG --run tec`, `tec targets`)."""
    import yaml

    raw = {
        "workdir": str(workdir),
        "data": {"train": str(shards)},
        "base_model": {"arch": base.arch, "checkpoint": base.checkpoint,
                       "timm_kwargs": dict(base.timm_kwargs)},
        "targets": {"views": VIEWS, "k_max": K_MAX, "batch_size": 4, "cache": str(cache),
                    "view_policy": {"seed": 7, "output_size": 32}, "ray": {"num_cpus": 1},
                    **(targets or {})},
        "runs": [{"name": "tec", "epochs": VIEWS, "batch_size": 4, "num_workers": 0,
                  "device": "cpu", "view_selection": "round_robin", "model": dict(STUDENT),
                  **(run or {})}],
        "eval": {"enabled": False},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke_cli(argv: list[str]) -> tuple[int, str, BaseException | None]:
    """Run `tec ARGV` in-process; (exit code, stderr, uncaught exception or None)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    env = {"TEC_DEBUG": ""}
    result = CliRunner().invoke(main, [str(a) for a in argv], env=env)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return result.exit_code, result.stderr, exc


def one_line_error(exit_code: int, stderr: str, exc: BaseException | None,
                   expect: tuple[str, ...]) -> tuple[bool, str]:
    """(ok, detail): exit != 0, exactly one `error:` line naming every string of ``expect``,
    no traceback. Progress-bar lines on stderr are not part of the message."""
    if exc is not None:
        import traceback

        return False, "uncaught " + "".join(traceback.format_exception(exc))[-1500:]
    if "Traceback" in stderr:
        return False, f"traceback on stderr: {stderr[-1500:]}"
    if exit_code == 0:
        return False, "exit code 0 (not refused)"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        return False, f"expected one 'error:' line, got: {stderr[-1500:]!r}"
    missing = [e for e in expect if e not in errors[0]]
    if missing:
        return False, f"{errors[0]!r} does not name {missing}"
    return True, errors[0]


# ------------------------------------------------------------------------------ cache identity
_VOLATILE_MARKER_KEYS = ("committed_at", "writer")
_VOLATILE_MANIFEST_KEYS = ("created", "finalized")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_snapshot(path: str | Path) -> dict:
    """Everything that defines a finished cache, minus timestamps and writer host/pid:
    part file bytes (sha256), commit markers, manifest, bad-sample report and the decoded
    record of every (sample, view)."""
    from storage import open_cache

    root = Path(path)
    files = {p.relative_to(root).as_posix(): _sha(p.read_bytes())
             for p in sorted((root / "parts").rglob("*")) if p.is_file()}
    markers = {}
    for p in sorted((root / "status").glob("*.json")):
        marker = json.loads(p.read_text())
        markers[p.stem] = {k: v for k, v in marker.items() if k not in _VOLATILE_MARKER_KEYS}
    manifest = json.loads((root / "manifest.json").read_text())
    for key in _VOLATILE_MANIFEST_KEYS:
        manifest.pop(key, None)
    for status in (manifest.get("part_status") or {}).values():
        status.pop("committed_at", None)
    report = root / "reports" / "bad_samples.jsonl"
    records = {}
    with open_cache(root) as cache:
        for i in range(cache.num_samples):
            for v in range(cache.views_per_sample):
                rec = cache.read(i, v)
                digest = hashlib.sha256()
                for name in RECORD_FIELDS:
                    a = np.ascontiguousarray(np.asarray(rec[name]))
                    digest.update(f"{name}{a.dtype}{a.shape}".encode())
                    digest.update(a.tobytes())
                records[f"{rec['key']}/{v}"] = digest.hexdigest()
    leftovers = sorted(p.relative_to(root).as_posix() for p in (root / "tmp").rglob("*")
                       if p.is_file()) if (root / "tmp").is_dir() else []
    return {"files": files, "markers": markers, "manifest": manifest,
            "report": report.read_text() if report.exists() else None, "records": records,
            "tmp_leftovers": leftovers}


def snapshot_diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two cache snapshots ([] = bit-identical)."""
    diffs = []
    for section in ("files", "markers", "records"):
        keys = sorted(set(a[section]) | set(b[section]))
        for key in keys:
            if a[section].get(key) != b[section].get(key):
                diffs.append(f"{section}: {key} differs")
    if a["manifest"] != b["manifest"]:
        keys = sorted(set(a["manifest"]) | set(b["manifest"]))
        diffs += [f"manifest: {k} differs" for k in keys
                  if a["manifest"].get(k) != b["manifest"].get(k)]
    if a["report"] != b["report"]:
        diffs.append("reports/bad_samples.jsonl differs")
    if b["tmp_leftovers"]:
        diffs.append(f"temp files left behind: {b['tmp_leftovers'][:5]}")
    return diffs


# ------------------------------------------------------------------------------ processes
def child_processes(root_pid: int) -> dict[int, str]:
    """{pid: cmdline} of every live descendant of ``root_pid`` (read from /proc)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # field 4 (ppid) comes after the ')' that closes the command name
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z":
            parent[int(entry)] = int(fields[1])
            cmd[int(entry)] = cmdline
    out, frontier = {}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in out:
                out[child] = cmd[child]
                frontier.append(child)
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ untrusted files
class MarkerOnUnpickle:
    """Unpickling this object creates ``marker`` (``open(marker, 'w')`` via __reduce__): proof
    that a loader executed code from a file."""

    def __init__(self, marker: str | Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: str | Path) -> bytes:
    import pickle

    return pickle.dumps({"payload": MarkerOnUnpickle(marker)})
