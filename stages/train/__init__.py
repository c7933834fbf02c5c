"""Stage 2: train a new model from the target cache (with online fallback), DDP, exact resume.

The trainer is an assembly of small components, each in its own module:

=================  ==========================================================================
data               :mod:`stages.data`: source index, sample plan, sampler, dataset, targets
optimizer          :mod:`stages.optim`: AdamW groups, lr = blr x batch / 256, warm-up + cosine
checkpointer       :mod:`stages.checkpoint`: atomic files, rotation, RNG states, resume
metrics            :mod:`stages.metrics`: CSV + TensorBoard, tqdm, loader throughput
=================  ==========================================================================

:func:`train` resolves what to train on (cache manifest, base model, view policy, source) and
refuses mismatches with a one-line message, builds the components, runs :class:`Trainer.fit`,
and writes the timm-loadable exports. Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the
process group itself (NCCL on GPU, gloo on CPU); every rank calls the same function.

Modules, one job each: :mod:`.config` (TrainConfig, ModelConfig, TrainSummary, errors), :mod:`.dist`
(DistEnv), :mod:`.inputs` (resolve_inputs, RunInputs), :mod:`.trainer` (Trainer), :mod:`.export`
(the exports) and :mod:`.run` (the entry point :func:`train`).
"""
from .config import (  # noqa: F401
    CacheMismatchError,
    ModelConfig,
    NonFiniteLossError,
    StaleRunError,
    TrainConfig,
    TrainSetupError,
    TrainSummary,
)
from .dist import DistEnv  # noqa: F401
from .export import export_checkpoint
from .inputs import RunInputs, resolve_inputs  # noqa: F401
from .run import train
from .trainer import OnBatches, StepCounters, Trainer  # noqa: F401

__all__ = [
    "CacheMismatchError",
    "ModelConfig",
    "NonFiniteLossError",
    "StaleRunError",
    "TrainConfig",
    "TrainSetupError",
    "TrainSummary",
    "Trainer",
    "export_checkpoint",
    "train",
]
