"""Shared helpers of the benchmarks: machine description, git commit, library versions, JSON output.

Every benchmark writes one JSON file to ``benchmarks/results/`` with the same header::

    {"benchmark": name, "created": ISO time, "git": {...}, "machine": {...},
     "versions": {...}, "command": argv, "runtime_s": seconds, ...its own fields}

Benchmarks report; they never assert. Run them from the repository root, e.g.
``python benchmarks/speed.py``; this module puts the repository root on ``sys.path`` so the
packages import without installing.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CONFIGS_DIR = REPO_ROOT / "benchmarks" / "configs"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("benchmarks")

_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "zarr", "numcodecs", "ray", "webdataset",
              "pillow", "safetensors", "pyyaml")


def setup_logging(verbose: bool = False) -> None:
    """INFO for the benchmarks, WARNING for the libraries (DEBUG for everything when verbose)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def git_info() -> dict[str, Any]:
    """Commit of the working tree and whether it has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model and cores, memory, GPU (None when absent), OS, Python, torch threads."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
    }


def device_string(machine: dict[str, Any]) -> str:
    """'cpu: AMD EPYC (2 cores)' or the GPU name."""
    if machine.get("gpu"):
        return f"{machine['gpu']} (cpu: {machine['cpu']}, {machine['cores']} cores)"
    return f"cpu: {machine['cpu']} ({machine['cores']} cores)"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def result_header(name: str) -> dict[str, Any]:
    """The common fields every result starts with (fill ``runtime_s`` at the end)."""
    machine = machine_info()
    return {
        "benchmark": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "machine": machine,
        "device": device_string(machine),
        "versions": library_versions(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented JSON atomically (the load average at the end is added)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", {})["load_average_at_end"] = load_average()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``store[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def mean_spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and min/max of a list of numbers (spread 0 for one)."""
    import statistics

    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values),
            "values": values}
