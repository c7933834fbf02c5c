"""The stage-2 entry point :func:`train`: resolve inputs, build the trainer, fit, export."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from stages.configs import BaseModelConfig, stable_seed, to_dict
from stages.resolve import ResolvedBase
from stages.views import ViewPolicy
from storage.layout import write_json_atomic

from .config import TrainConfig, TrainSetupError, TrainSummary
from .dist import DistEnv
from .export import _write_export
from .inputs import RunInputs, resolve_inputs
from .trainer import OnBatches, Trainer

logger = logging.getLogger("stages.train")


@contextlib.contextmanager
def _numerics(run: TrainConfig, device: torch.device):
    """Deterministic algorithms (``run.deterministic``) or TF32 matmuls on GPU, for the run only."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[2:]


def train(run: TrainConfig, *, cache: str | None = None, source=None,
          base: BaseModelConfig | ResolvedBase | None = None, view_policy: ViewPolicy | None = None,
          out_dir: str | Path, progress: bool = True,
          cache_views: int | None = None,
          on_batches: OnBatches | None = None) -> TrainSummary:
    """Train one new model; every torchrun rank calls this with the same arguments.

    cache: target cache folder (None: fully online or pixel mode). source: an object with
    ``kind`` and ``path`` (checked against the cache's source when both are given). base: the
    base model (online fallback; its fingerprint is checked against the cache), described once
    per command (a stages.resolve.ResolvedBase; a BaseModelConfig is resolved here). view_policy:
    only used without a cache. cache_views: of a cache grown by `tec cache extend --views`, use
    its first cache_views views (``targets.views``; never fewer than it was built with; None:
    all). Resumes from ``<out_dir>/checkpoints/last`` when present; writes
    ``checkpoints/``, ``logs/`` and ``export/`` under ``out_dir``. on_batches: called with
    (trainer, the step's micro-batches) before each step (tests observe what each rank trains
    on).
    """
    run.validate()
    out_dir = Path(out_dir)
    dist = DistEnv.from_env(run.device)
    try:
        with _numerics(run, dist.device):
            return _train(run, dist, cache=cache, source=source, base=base,
                          view_policy=view_policy, out_dir=out_dir, progress=progress,
                          cache_views=cache_views, on_batches=on_batches)
    finally:
        dist.close()


def _train(run: TrainConfig, dist: DistEnv, *, cache, source, base, view_policy, out_dir: Path,
           progress: bool, cache_views: int | None = None,
           on_batches: OnBatches | None = None) -> TrainSummary:
    """The body of :func:`train` once the process group and numerics are set up."""
    if run.batch_size % (dist.world_size * run.accum_steps):
        raise TrainSetupError(
            f"batch_size: {run.batch_size} is not divisible by world size x accum_steps = "
            f"{dist.world_size} x {run.accum_steps}; change batch_size or accum_steps")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    random.seed(stable_seed("python", run.seed, dist.rank))
    np.random.seed(stable_seed("numpy", run.seed, dist.rank) % 2**32)
    inputs = resolve_inputs(run, cache=cache, source=source, base=base,
                            view_policy=view_policy, device=dist.device, out_dir=out_dir,
                            dist=dist, cache_views=cache_views)
    init_source = inputs.base_model  # the trainer keeps it only for online targets
    trainer = Trainer(run, inputs, out_dir, dist, progress=progress, on_batches=on_batches)
    from stages.identity import run_identity

    trainer.identity = run_identity(run, cache=inputs.cache_path, base=inputs.base,
                                    needs_targets=trainer.needs_targets,
                                    # of a grown cache: the views and shards this run reads
                                    views=inputs.views or None,
                                    shard_extensions=inputs.shard_extensions)
    if run.init_from_base:
        _init_from_base(run, trainer, init_source)
    if dist.is_main:
        _write_run_info(out_dir, run, inputs, trainer)
    summary = trainer.fit()
    export_path = out_dir / "export" / "model.safetensors"
    # A finished run resumed at its last step trains nothing: keep its export byte-for-byte
    # (safetensors metadata order is not stable, so rewriting would change the file's sha256,
    # which caches built from it record as their base-model fingerprint).
    finished_before = (summary.resumed_from_step is not None
                       and summary.resumed_from_step >= trainer.global_step
                       and export_path.is_file())
    if dist.is_main and finished_before:
        summary.export = str(export_path)
        if not (export_path.parent / "config.json").is_file():  # exported before config.json
            from tec.export import write_timm_config

            write_timm_config(trainer.model.cfg, export_path.parent)
    elif dist.is_main:
        trainer.model.eval()
        paths = _write_export(trainer.model, export_path,
                              keep_adapters=True,
                              extra={"run": run.name, "step": trainer.global_step},
                              timm_folder=run.name)
        summary.export = paths["export"]
        summary.export_adapters = paths["adapters"]
        summary.export_info = paths["info"]
    dist.barrier()
    if dist.is_main:
        logger.info("run %s finished:\n%s", run.name, summary.format())
    return summary


def _init_from_base(run: TrainConfig, trainer: Trainer, base_model) -> None:
    """``init_from_base``: copy the base model's encoder into the new model before training
    (every rank copies the same weights; a resumed run then loads its checkpoint over them)."""
    from tec.model import init_from_base_model

    if base_model is None:
        raise TrainSetupError(f"run {run.name}: init_from_base needs a base_model (a pixel-target "
                              "run has none); configure base_model or set init_from_base: false")
    try:
        keys = init_from_base_model(trainer.model, base_model)
    except ValueError as exc:
        raise TrainSetupError(f"run {run.name}: {exc}") from None
    if trainer.dist.is_main:
        logger.info("run %s: new model initialised from the base model (%d tensors)", run.name,
                    len(keys))


def _write_run_info(out_dir: Path, run: TrainConfig, inputs: RunInputs, trainer: Trainer) -> None:
    info = {
        "train": to_dict(run),
        "new_model_config": inputs.model_cfg.to_dict(),
        "cache": inputs.cache_path,
        "view_policy": inputs.policy.to_dict(),
        "shards": inputs.shards,
        "samples_per_epoch": len(trainer.plan),
        "skipped_missing_per_epoch": trainer.plan.skipped_per_epoch,
        "steps_per_epoch": trainer.steps_per_epoch,
        "world_size": trainer.dist.world_size,
        "device": str(trainer.device),
        "amp": str(trainer.amp_dtype),
    }
    write_json_atomic(out_dir / "run.json", info, style="sorted")
