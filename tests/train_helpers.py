"""Shared builders for the stage-2 tests: tiny base model, source shards, target caches.

A cache is built in-process with stage 1's own shard task and base-model actor (no Ray), so the
tests exercise exactly the code that writes real caches. No tests live here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from image_helpers import make_shards

from stages.configs import BaseModelConfig, from_dict
from stages.train import TrainConfig

# base model: 32 px, 8 px patches (L = 16), width 48, 3 heads
BASE_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
# new model: width 48, depth 3, 3 heads, decoder 32 x 2
STUDENT = dict(embed_dim=48, depth=3, num_heads=3, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=2, k=4, tau=1.0)
K_MAX = 6
VIEWS = 2
REPO = Path(__file__).resolve().parents[1]


def save_base_model(path: Path, seed: int = 0) -> BaseModelConfig:
    """A random tiny timm ViT saved as a timm .safetensors checkpoint; returns its config."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              **BASE_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return BaseModelConfig(arch="vit_base_patch16_224", checkpoint=str(path),
                           timm_kwargs=dict(BASE_KWARGS))


def build_cache(root: Path, shards: list[str], base: BaseModelConfig, *, views: int = VIEWS,
                k_max: int = K_MAX, backend: str = "zarr", codec: str = "float16", policy=None,
                capture: list | None = None, skip_parts: tuple[str, ...] = (),
                pixels: str = "none", pixels_quality: int = 90) -> str:
    """Stage 1 without Ray: create_cache + process_shard with an in-process BaseModelActor.

    capture: list receiving every uint8 view batch [B,3,S,S] the base model was fed.
    pixels, pixels_quality: store the views' pixels (targets.pixels) as stage 1 does.
    skip_parts: parts left uncommitted (an incomplete cache).
    """
    from stages.configs import to_dict
    from stages.sources import open_source
    from stages.stage1 import BaseModelActor, ShardJob, part_names, process_shard
    from stages.views import ViewPolicy
    from storage import CacheSpec, create_cache

    policy = policy or ViewPolicy(seed=0, output_size=BASE_KWARGS["img_size"])
    model = base.load()
    fingerprint = base.fingerprint(model, last_n=2, k_max=k_max)
    source = open_source("webdataset", shards)
    shards = source.shards()
    counts = [source.count(s) for s in shards]
    names = part_names(shards)
    spec = CacheSpec(num_patches=16, channels=BASE_KWARGS["embed_dim"],
                     heads=BASE_KWARGS["num_heads"], k_max=k_max, views=views, codec=codec,
                     backend=backend, pixels=pixels, pixels_quality=pixels_quality,
                     image_size=policy.output_size if pixels != "none" else 0)
    writer = create_cache(root, spec, base_model=fingerprint,
                          view_policy={**policy.to_dict(), "views": views},
                          source={"kind": "webdataset", "path": "::".join(shards),
                                  "shards": list(shards), "num_samples": sum(counts)},
                          parts=list(zip(names, counts)))
    import inspect

    params = inspect.signature(BaseModelActor.__init__).parameters
    half = {name: codec == "float16" for name in ("float16", "features_float16") if name in params}
    actor = BaseModelActor(to_dict(base), 2, k_max, **half)
    if capture is not None:
        call = actor.__call__

        class Capturing:
            def __call__(self, views_uint8):
                capture.append(torch.from_numpy(views_uint8.copy()))
                return call(views_uint8)

        actors = [Capturing()]
    else:
        actors = [actor]
    for i, (shard, name, count) in enumerate(zip(shards, names, counts)):
        if name in skip_parts:
            continue
        job = ShardJob(shard=shard, part=name, index=i, slots=count, source_kind="webdataset",
                       source_path="::".join(shards), shard_size=1000, cache=str(root),
                       views=views, policy=policy.to_dict(), batch_size=8, max_in_flight=2)
        process_shard(job, actors, writer)
    writer.finalize()
    return str(root)


class Source:
    """A SourceConfig-like (kind, path)."""

    def __init__(self, path: str, kind: str = "webdataset"):
        self.kind, self.path = kind, path


def make_data(tmp: Path, n_shards: int = 2, per_shard: int = 8, seed: int = 0) -> list[str]:
    return make_shards(tmp / "shards", n_shards=n_shards, per_shard=per_shard,
                       size_range=(28, 56), seed=seed)


def run_config(name: str = "run", **overrides) -> TrainConfig:
    """A tiny TrainConfig (validated through from_dict, as the CLI does)."""
    values = dict(name=name, epochs=2, batch_size=8, model=dict(STUDENT), blr=0.05,
                  warmup_epochs=0.0, num_workers=0, log_every=1, device="cpu", seed=0)
    model = overrides.pop("model", None)
    if model is not None:
        values["model"] = {**STUDENT, **model}
    values.update(overrides)
    return from_dict(TrainConfig, values)


def python_env() -> dict:
    """Environment for subprocesses: the repo and tests on the path, one thread each."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


def log_sample_keys(trainer, batches) -> None:
    """Trainer ``on_batches`` callback (``train(..., on_batches=log_sample_keys)``): append the
    (step, epoch, key, view, fresh) of this step's samples to <out_dir>/debug/samples_rank<r>.tsv
    (the DDP tests check disjoint sharding with it)."""
    debug_dir = trainer.out_dir / "debug"
    debug_dir.mkdir(parents=True, exist_ok=True)
    with open(debug_dir / f"samples_rank{trainer.dist.rank}.tsv", "a") as f:
        for batch in batches:
            for key, view, fresh in zip(batch.keys, batch.views, batch.fresh.tolist()):
                f.write(f"{trainer.global_step}\t{trainer.epoch}\t{key}\t{view}\t{int(fresh)}\n")
