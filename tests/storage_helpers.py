"""Builders for the storage tests: small specs, realistic synthetic targets, whole caches."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import CacheSpec, create_cache
from storage.synthetic import realistic_targets

SMALL = dict(num_patches=16, channels=24, heads=3, k_max=4, views=3)
VIT_B = dict(num_patches=196, channels=768, heads=12, k_max=16)

BASE_MODEL = {"arch": "vit_tiny_test", "checkpoint_sha256": "ab" * 32, "img_size": 32,
              "patch_size": 8, "embed_dim": 24, "num_heads": 3, "depth": 3, "last_n": 2, "k_max": 4}
VIEW_POLICY = {"seed": 0, "views": 3, "scale": (0.2, 1.0), "ratio": (0.75, 4 / 3), "flip_p": 0.5,
               "interpolation": "bicubic", "output_size": 32}


def spec(**overrides) -> CacheSpec:
    return CacheSpec(**{**SMALL, **overrides})


def make_views(rng: np.random.Generator, s: CacheSpec, label: int = -1,
               realistic: bool = True) -> dict:
    """view_records for one sample: all K views (PartWriter.write input).

    realistic=False draws i.i.d. Gaussians instead (fast; for tests about sizes and I/O only)."""
    L, C, H, R = s.num_patches, s.channels, s.heads, s.k_max + 1
    if realistic:
        per_view = [realistic_targets(rng, L, C, H, s.k_max) for _ in range(s.views)]
        out = {k: np.stack([v[k] for v in per_view]) for k in per_view[0]}
    else:
        out = {"features": rng.standard_normal((s.views, L, C), dtype=np.float32),
               "feature_mean": rng.standard_normal((s.views, C), dtype=np.float32),
               "feature_std": rng.random((s.views, C), dtype=np.float32) + 0.5,
               "attn_logits": 5 * rng.standard_normal((s.views, H, R, L), dtype=np.float32),
               "attn_index": np.stack([rng.permutation(L)[: s.k_max] for _ in range(s.views)])}
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    out["crop"] = np.stack([[int(rng.integers(0, 8)), int(rng.integers(0, 8)),
                             int(rng.integers(8, h - 8)), int(rng.integers(8, w - 8))]
                            for _ in range(s.views)])
    out["flip"] = rng.random(s.views) < 0.5
    out["source_size"] = (h, w)
    out["label"] = label
    return out


def new_cache(path: Path, s: CacheSpec, parts: list[tuple[str, int]], **overrides):
    kw = dict(base_model=BASE_MODEL, view_policy={**VIEW_POLICY, "views": s.views},
              source={"kind": "webdataset", "shards": [p for p, _ in parts],
                      "num_samples": sum(n for _, n in parts)}, parts=parts)
    kw.update(overrides)
    return create_cache(path, s, **kw)


def part_records(s: CacheSpec, part: str, slots: int, seed: int, skip: tuple[int, ...] = (),
                 realistic: bool = True) -> dict:
    """slot -> (key, view_records) that write_part writes for this part and seed."""
    rng = np.random.default_rng(seed)
    out = {}
    for slot in range(slots):
        if slot not in skip:
            out[slot] = (f"{part}-{slot:04d}",
                         make_views(rng, s, label=slot % 7, realistic=realistic))
    return out


def write_part(writer, part: str, seed: int, skip: tuple[int, ...] = (),
               realistic: bool = True) -> dict[str, dict]:
    """Write every slot of `part` except `skip`, commit; returns key -> view_records written."""
    records = part_records(writer.spec, part, writer.slots_of(part), seed, skip, realistic)
    pw = writer.open_part(part)
    for slot, (key, rec) in records.items():
        pw.write(slot, key, rec)
    pw.commit(report=[{"key": f"{part}-{s:04d}", "reason": "corrupt image"} for s in skip])
    return dict(records.values())


def write_gaussian_cache(path: Path, s: CacheSpec, n: int) -> Path:
    """One committed part of `n` samples whose tensors are standard-normal draws (seed 0): the
    incompressible worst case the byte-size tests of `tec plan` measure on disk."""
    writer = create_cache(
        path, s, base_model={"arch": "test"}, view_policy={"seed": 0},
        source={"kind": "webdataset", "shards": ["s0"], "num_samples": n}, parts=[("p0", n)])
    rng = np.random.default_rng(0)
    K, L, C, H, k_max = s.views, s.num_patches, s.channels, s.heads, s.k_max
    part = writer.open_part("p0")
    for slot in range(n):
        part.write(slot, f"sample{slot:03d}", {
            "features": rng.standard_normal((K, L, C)).astype(np.float32),
            "feature_mean": rng.standard_normal((K, C)).astype(np.float32),
            "feature_std": (rng.random((K, C)) + 0.5).astype(np.float32),
            "attn_logits": rng.standard_normal((K, H, k_max + 1, L)).astype(np.float32),
            "attn_index": np.stack([rng.permutation(L)[:k_max] for _ in range(K)]),
            "crop": np.tile([0, 0, 30, 30], (K, 1)), "flip": np.zeros(K, bool),
            "source_size": (30, 30), "label": 1})
    part.commit()
    return path


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b)
                 / np.linalg.norm(np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------------------------
# fixtures and subprocess workers (importable by multiprocessing 'spawn' children)

def concurrent_writer(jobs: list[tuple[str, dict, list, str, int]]) -> None:
    """One of several processes: for each (cache path, spec, parts, part, seed) reopen the cache
    with the same arguments as its creator and write that part."""
    for path, spec_dict, parts, part, seed in jobs:
        writer = new_cache(Path(path), CacheSpec(**spec_dict), parts)
        write_part(writer, part, seed=seed)


def killed_writer(path: str, part: str, started, records: int) -> None:
    """Write `records` samples of `part`, signal `started`, then hang until killed."""
    import time

    from storage import open_writer

    writer = open_writer(path)
    rng = np.random.default_rng(0)
    pw = writer.open_part(part)
    for slot in range(records):
        pw.write(slot, f"{part}-{slot:04d}", make_views(rng, writer.spec))
    started.set()
    time.sleep(600)
