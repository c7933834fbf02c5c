"""Stage-1 test fixtures and builders shared by test_stage1, test_objstore and test_cache_extend.

Fixtures (``ray_session``, ``base``, ``shards``, ``folder``, ``reference``) are imported by the test
modules that use them, so each module gets its own module-scoped instances.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from image_helpers import make_shards

from stages.configs import BaseModelConfig, from_dict, to_dict
from stages.sources import BadSample, decode_image, open_source
from stages.stage1 import Stage1Config, run_stage1
from storage import open_cache

REPO = Path(__file__).resolve().parents[1]
ARCH = "vit_base_patch16_224"
BASE_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
VIEWS = 3
K_MAX = 4
RECORD_FIELDS = ("features", "feature_mean", "feature_std", "attn_logits", "attn_index", "crop",
                 "flip", "label", "source_size")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module; run_stage1 uses it instead of starting its own."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseModelConfig:
    """A tiny random ViT saved as an MAE-style checkpoint {'model': state_dict}."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **BASE_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.save({"model": model.state_dict()}, path)
    return from_dict(BaseModelConfig, {"arch": ARCH, "checkpoint": str(path),
                                       "timm_kwargs": dict(BASE_KWARGS)}, "base_model")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    make_shards(directory, n_shards=3, per_shard=5, size_range=(20, 56))
    return directory


@pytest.fixture(scope="module")
def folder(shards, tmp_path_factory) -> Path:
    """The same images as an ImageFolder: <root>/c<label>/<key>.png."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for key, (image, label) in source_images(shards).items():
        (root / f"c{label}").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / f"c{label}" / f"{key}.png")
    return root


def make_cfg(source: Path, cache: Path, kind: str = "webdataset", **overrides) -> Stage1Config:
    raw = {"source": {"kind": kind, "path": str(source), "shard_size": 6}, "cache": str(cache),
           "views": VIEWS, "k_max": K_MAX, "batch_size": 4,
           "view_policy": {"seed": 7, "output_size": 32}}
    raw.update(overrides)
    return from_dict(Stage1Config, raw, "targets")


@pytest.fixture(scope="module")
def reference(ray_session, base, shards, tmp_path_factory):
    """An uninterrupted zarr run: (config, summary)."""
    cfg = make_cfg(shards, tmp_path_factory.mktemp("ref") / "cache")
    return cfg, run_stage1(cfg, base, progress=False)


def all_records(path, decode=False) -> dict:
    """{(key, view): record} of a complete cache (stored dtypes unless decode)."""
    cache = open_cache(path)
    out = {}
    for i in range(cache.num_samples):
        for v in range(cache.views_per_sample):
            rec = cache.read(i, v, decode=decode)
            out[(rec["key"], v)] = {k: np.asarray(rec[k]) for k in RECORD_FIELDS}
    return out


def assert_same_records(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for name in RECORD_FIELDS:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key} {name}")


def source_images(path: Path, kind: str = "webdataset") -> dict:
    """key -> (decoded uint8 [H,W,3], label) of every decodable sample of the source."""
    source = open_source(kind, str(path), **({"shard_size": 6} if kind == "imagefolder" else {}))
    out = {}
    for shard in source.shards():
        for sample in source.samples(shard):
            if sample.error is None:
                try:
                    out.setdefault(sample.key, (decode_image(sample.data), sample.label))
                except BadSample:
                    pass
    return out


DRIVER = """
import json, sys
from stages.configs import BaseModelConfig, from_dict
from stages.stage1 import Stage1Config, run_stage1
cfg = from_dict(Stage1Config, json.loads(sys.argv[1]), "targets")
base = from_dict(BaseModelConfig, json.loads(sys.argv[2]), "base_model")
hooks = None
if len(sys.argv) > 4:  # fault injection (tests/fault_helpers.py), JSON keyword arguments
    sys.path.insert(0, TESTS_DIR)
    from fault_helpers import FaultHooks
    hooks = FaultHooks(**json.loads(sys.argv[4]))
summary = run_stage1(cfg, base, ray_address=sys.argv[3] or None, progress=False, hooks=hooks)
print("SUMMARY", json.dumps({"parts_done": summary.parts_done, "images": summary.images}))
""".replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent)))


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a subprocess started with start_new_session)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def driver_cmd(cfg: Stage1Config, base: BaseModelConfig, address: str = "",
               hooks: dict | None = None) -> list[str]:
    """The stage-1 driver subprocess; hooks: keyword arguments of fault_helpers.FaultHooks."""
    return [sys.executable, "-c", DRIVER, json.dumps(to_dict(cfg)), json.dumps(to_dict(base)),
            address] + ([json.dumps(hooks)] if hooks else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(home: Path, **extra) -> dict:
    """The environment of a Ray process on a separate 'machine': its own HOME (so no token of
    this machine's ~/.ray leaks in) and no inherited RAY_AUTH_* setting."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra}
