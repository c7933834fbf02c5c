"""End-to-end fine-tuning of a pretrained encoder: the MAE / TEC recipe from timm's components.

The paper's headline numbers are full fine-tuning top-1 (TEC Tab. 10, MAE's ``main_finetune``).
The recipe is assembled from timm, not re-implemented:

==================  ===========================================================================
model               ``timm.create_model(arch, num_classes, global_pool='avg', drop_path_rate)``
                    with the pretrained encoder loaded (any checkpoint :mod:`tec.teacher` reads);
                    global average pooling puts the final norm after the pool (``fc_norm``,
                    freshly initialised as in MAE), the head is trunc-normal(2e-5)
optimizer           ``timm.optim.create_optimizer_v2(opt='adamw', layer_decay=...)``: layer-wise lr
                    decay, no weight decay on 1-D parameters, pos_embed and cls_token
schedule            ``timm.scheduler.CosineLRScheduler`` per optimizer step: linear warm-up from 0,
                    then half-cycle cosine to ``min_lr``; lr = blr x batch / 256
augmentation        ``timm.data.create_transform``: RandomResizedCrop, flip, RandAugment
                    (``rand-m9-mstd0.5-inc1``), random erasing; eval: resize + centre crop
mixup / cutmix      ``timm.data.Mixup`` with label smoothing, loss ``SoftTargetCrossEntropy``
                    (``LabelSmoothingCrossEntropy`` without mixup)
==================  ===========================================================================

The loop reuses the stage-2 components: :class:`stages.train.DistEnv` (torchrun / DDP, gloo on
CPU, NCCL on GPU), :class:`stages.checkpoint.Checkpointer` (atomic files, exact resume),
:class:`stages.metrics.MetricsLogger` / :class:`~stages.metrics.ProgressBar`, and the
:class:`stages.data.SamplePlan` / :class:`~stages.data.PlanSampler` data order (a permutation per
epoch from the seed, disjoint ranks, resumable at any step). Randomness is a pure function of the
seed and the position: each sample's augmentation is drawn from ``(seed, epoch, sample)`` and each
step's mixup and drop-path from ``(seed, step, rank)``, so a resumed run trains exactly the same
steps as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from storage.layout import write_json_atomic

from .checkpoint import Checkpointer, load_checkpoint
from .configs import ConfigError, stable_seed, to_dict
from .data import PlanSampler, SamplePlan, SourceIndex, index_digest
from .metrics import StepLog

logger = logging.getLogger(__name__)

__all__ = [
    "FinetuneConfig",
    "FinetuneSetupError",
    "FinetuneSummary",
    "build_finetune_model",
    "finetune",
    "finetune_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation pretraining used (tec.targets)
IMAGENET_STD = (0.229, 0.224, 0.225)
# head parameters the pretrained file does not have; everything else must load
_NEW_KEYS = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


class FinetuneSetupError(ValueError):
    """Fine-tuning cannot start as configured (one line naming what and how to fix it)."""


@dataclass
class FinetuneConfig:
    """Full fine-tuning (``eval.finetune`` in pipeline.yaml, ``tec eval finetune``).

    Defaults are the paper's Tab. 10 for ViT-B (MAE's fine-tuning recipe): AdamW (0.9, 0.999),
    blr 1e-3, batch 1024, wd 0.05, layer decay 0.65, 100 epochs with 20 warm-up, min lr 1e-6,
    RandAug (9, 0.5), label smoothing 0.1, mixup 0.8, cutmix 1.0, drop path 0.1; random erasing
    0.25 and global average pooling as in MAE's ``main_finetune``. batch_size is the global batch
    per optimizer step (all ranks x accum_steps); lr = blr x batch_size / 256.
    ``enabled`` only matters inside a pipeline (``tec run`` adds a fine-tuning column).
    """

    enabled: bool = False
    epochs: int = 100
    batch_size: int = 1024
    accum_steps: int = 1
    blr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65
    drop_path: float = 0.1
    global_pool: Literal["avg", "token"] = "avg"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    reprob: float = 0.25
    eval_crop_pct: float = 0.875
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: float | None = None
    seed: int = 0
    num_workers: int = 2
    train_limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 256
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 20
    amp: Literal["auto", "bf16", "none"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = None

    def validate(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(f"{key}: {why}")

        for key in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "keep_checkpoints",
                    "log_every"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "checkpoint_every", "seed"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.accum_steps:
            fail("batch_size", f"{self.batch_size} is not divisible by accum_steps "
                 f"{self.accum_steps}")
        if not self.blr > 0:
            fail("blr", f"must be > 0, got {self.blr}")
        for key in ("min_lr", "warmup_epochs", "weight_decay", "smoothing", "mixup", "cutmix"):
            if not getattr(self, key) >= 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"{self.warmup_epochs} exceeds epochs {self.epochs}")
        if self.min_lr > self.blr * self.batch_size / 256:
            fail("min_lr", f"{self.min_lr} exceeds the peak lr blr x batch / 256 = "
                 f"{self.blr * self.batch_size / 256:.3g}")
        if not 0.0 < self.layer_decay <= 1.0:
            fail("layer_decay", f"must be in (0, 1] (1 = no decay), got {self.layer_decay}")
        for key in ("drop_path", "reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, f"must be between 0 and 1, got {getattr(self, key)}")
        if not self.smoothing < 1.0:
            fail("smoothing", f"must be < 1, got {self.smoothing}")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            fail("eval_crop_pct", f"must be in (0, 1], got {self.eval_crop_pct}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            fail("crop_scale", f"must be 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", f"each must be in [0, 1), got {list(self.betas)}")
        for key in ("max_steps", "train_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, f"must be >= 1 or null, got {value}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            fail("clip_grad", f"must be > 0 or null, got {self.clip_grad}")
        if self.auto_augment is not None and not self.auto_augment.startswith(
                ("rand", "augmix", "original", "v0", "3a")):
            fail("auto_augment", f"{self.auto_augment!r} is not a timm auto-augment spec; use e.g. "
                 "'rand-m9-mstd0.5-inc1' or null")
        if self.mixup_active and (self.batch_size // self.accum_steps) % 2:
            fail("batch_size", f"mixup/cutmix needs an even batch per step (timm.data.Mixup); "
                 f"batch_size / accum_steps = {self.batch_size // self.accum_steps}")

    @property
    def mixup_active(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def training_key(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed (not the run's length or I/O)."""
        skip = {"enabled", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every",
                "device", "max_steps", "eval_batch_size", "test_limit"}
        return {k: v for k, v in to_dict(self).items() if k not in skip}


@dataclass
class FinetuneSummary:
    """What a fine-tuning run did; ``top1`` is the test-set accuracy (percent) after training."""

    name: str
    top1: float | None = None
    test_samples: int = 0
    steps: int = 0
    total_steps: int = 0
    epochs: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    resumed_from_step: int | None = None
    loss: float | None = None
    num_classes: int = 0
    train_samples: int = 0
    world_size: int = 1
    device: str = "cpu"
    checkpoint: str | None = None
    out_dir: str | None = None

    def format(self) -> str:
        top1 = "not measured" if self.top1 is None else f"{self.top1:.2f}%"
        lines = [
            f"fine-tuned     {self.name} ({self.world_size} process(es) on {self.device})",
            f"trained        {self.steps}/{self.total_steps} steps, {self.epochs:.2f} epochs of "
            f"{self.train_samples} images, {self.num_classes} classes"
            + (f" (resumed from step {self.resumed_from_step})"
               if self.resumed_from_step is not None else ""),
            f"this run       {self.samples} samples in {self.seconds:.1f} s "
            f"({self.samples_per_s:.1f} samples/s)",
            f"final loss     {'n/a' if self.loss is None else f'{self.loss:.4f}'}",
            f"test top-1     {top1} on {self.test_samples} images",
            f"checkpoint     {self.checkpoint}",
        ]
        return "\n".join(lines)


def finetune_config(values: dict | None = None, overrides=(), **given) -> FinetuneConfig:
    """A validated :class:`FinetuneConfig` from a mapping (e.g. a pipeline's ``eval.finetune``),
    ``KEY=VALUE`` overrides (values parsed as YAML) and keyword values that are not None."""
    import yaml

    data = dict(values or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. epochs=5")
        key, text = item.split("=", 1)
        try:
            data[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            data[key.strip()] = text
    data.update({k: v for k, v in given.items() if v is not None})
    from .configs import from_dict

    return from_dict(FinetuneConfig, data, "finetune")


# ---------------------------------------------------------------------------------------------
# Model


def build_finetune_model(model_path: str | Path | None, *, arch: str, num_classes: int,
                         cfg: FinetuneConfig, timm_kwargs: dict | None = None,
                         allow_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A timm ViT classifier initialised from ``model_path`` (None: random init).

    The pretrained file is read by :func:`tec.teacher.load_base_model` (MAE, DINO/iBOT, timm,
    TEC exports; strict encoder keys), so a file that is not the configured encoder is an error,
    never a silently random start. ``timm_kwargs``: geometry of plain checkpoints (our exports
    carry theirs). With ``global_pool='avg'`` the pretrained final norm is dropped and a fresh
    ``fc_norm`` follows the pool (MAE). Returns ``(model, create_kwargs)``.
    """
    import timm
    from timm.layers import trunc_normal_

    from tec.teacher import describe_vit, load_base_model

    if model_path is None:
        encoder = load_base_model(arch, None, **(timm_kwargs or {}))
    else:
        encoder = load_base_model(arch, model_path, allow_pickle=allow_pickle,
                                  plain_kwargs=timm_kwargs)
    geometry = describe_vit(encoder)
    kwargs = dict(timm_kwargs or {})
    kwargs.update(img_size=geometry["img_size"], patch_size=geometry["patch_size"],
                  embed_dim=geometry["embed_dim"], depth=geometry["depth"],
                  num_heads=geometry["num_heads"],
                  mlp_ratio=encoder.blocks[0].mlp.fc1.out_features / geometry["embed_dim"])
    kwargs.update(num_classes=num_classes, global_pool=cfg.global_pool,
                  drop_path_rate=cfg.drop_path)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    state = encoder.state_dict()
    if not isinstance(model.norm, nn.LayerNorm):  # fc_norm after the pool replaces the norm
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in _NEW_KEYS] + list(unexpected)
    if bad:
        raise FinetuneSetupError(
            f"{model_path}: the pretrained encoder does not fit the fine-tuning model "
            f"{arch} (keys {bad[:6]}); check --arch / --timm-kwargs")
    trunc_normal_(model.head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(model.head.bias)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, kwargs


def _build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, betas=tuple(cfg.betas))


def _build_scheduler(optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    from timm.scheduler import CosineLRScheduler

    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)


def _build_mixup(cfg: FinetuneConfig, num_classes: int):
    """(timm Mixup or None, training loss): SoftTargetCrossEntropy with mixup/cutmix,
    LabelSmoothingCrossEntropy with smoothing only, else plain cross-entropy (MAE's choice)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode="batch",
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------
# Data


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, also for 0 bits: RandAugment 'inc1' maps magnitude 10 (reached with
    mstd > 0) to 0 bits, which Pillow < 12 turned into a black image and Pillow >= 12 refuses."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _zero_bit_safe(transform):
    """Give this transform's RandAugment posterize ops :func:`_posterize` (this instance only;
    timm's tables stay as they are)."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def build_transforms(cfg: FinetuneConfig, img_size: int):
    """(train, eval) torchvision transforms from ``timm.data.create_transform`` (PIL in,
    normalised float [3, S, S] out)."""
    from timm.data import create_transform

    train = create_transform(
        input_size=img_size, is_training=True, scale=tuple(cfg.crop_scale),
        auto_augment=cfg.auto_augment, interpolation=cfg.interpolation, re_prob=cfg.reprob,
        re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = _zero_bit_safe(train)
    test = create_transform(
        input_size=img_size, is_training=False, interpolation=cfg.interpolation,
        crop_pct=cfg.eval_crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train, test


class LabelledImages(torch.utils.data.Dataset):
    """Decoded, transformed, labelled source images (map-style, safe in forked workers).

    ``train``: items are :class:`stages.data.PlanItem` and the augmentation's randomness is
    seeded from ``(seed, epoch, sample)`` (and restored afterwards), so it does not depend on
    workers, ranks or resumes. Otherwise items are plain sample indices (evaluation).
    Returns ``(image float [3, S, S], label int)``.
    """

    def __init__(self, source: SourceIndex, transform, *, seed: int = 0, train: bool = False):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, index: int):
        from PIL import Image

        from .sources import BadSample, decode_image

        try:
            return Image.fromarray(decode_image(self.source.read_bytes(index)))
        except BadSample as exc:
            raise FinetuneSetupError(f"sample {self.source.keys[index]!r} cannot be decoded "
                                     f"({exc}); remove it from the fine-tuning data") from None

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        if self.train:
            index = int(item.index)
            image = self._image(index)
            seed = stable_seed("finetune-augment", self.seed, int(item.epoch), index)
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                x = self.transform(image)
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
        else:
            index = int(item)
            x = self.transform(self._image(index))
        return x, int(self.source.labels[index])


def _open_split(spec, out_dir: Path, limit: int | None, what: str, *, write: bool
                ) -> SourceIndex:
    """Index a shard spec (the first ``limit`` samples); every sample must carry a label."""
    from .sources import expand_shards

    shards = expand_shards(spec)
    cache_file = out_dir / "source_index" / f"{index_digest(shards)}.npz"
    index = SourceIndex.load_or_build("webdataset", shards, cache_file, write=write)
    if limit is not None and limit < len(index):
        index = SourceIndex(index.files, index.keys[:limit], index.file[:limit],
                            index.offsets[:limit], index.sizes[:limit], index.labels[:limit])
    if len(index) == 0:
        raise FinetuneSetupError(f"{what} {spec}: no samples")
    if int(index.labels.min()) < 0:
        raise FinetuneSetupError(f"{what} {spec}: {int((index.labels < 0).sum())} samples have no "
                                 "class label (.cls); fine-tuning needs labelled images")
    return index


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# The run


class Finetuner:
    """One fine-tuning run on one rank: model, optimizer, schedule, data, checkpoints."""

    def __init__(self, cfg: FinetuneConfig, *, model_path: str | Path | None, arch: str,
                 train_index: SourceIndex, test_index: SourceIndex | None, out_dir: Path,
                 dist, timm_kwargs: dict | None = None, allow_pickle: bool = False,
                 progress: bool = True, name: str | None = None):
        from tec.teacher import file_sha256

        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.out_dir = Path(out_dir)
        self.progress = progress and dist.is_main
        self.name = name or (Path(model_path).name if model_path else "random_init")
        self.model_sha256 = file_sha256(model_path) if model_path is not None else None
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if amp else None

        labels = train_index.labels
        self.num_classes = int(max(labels.max(), test_index.labels.max() if test_index is not None
                                   else 0)) + 1
        torch.manual_seed(cfg.seed)  # the same head init on every rank (DDP broadcasts anyway)
        self.model, self.model_kwargs = build_finetune_model(
            model_path, arch=arch, num_classes=self.num_classes, cfg=cfg,
            timm_kwargs=timm_kwargs, allow_pickle=allow_pickle)
        self.model.to(self.device)
        self.ddp = self.model
        if dist.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        img_size = int(self.model_kwargs["img_size"])
        train_tf, test_tf = build_transforms(cfg, img_size)

        # data: the stage-2 plan (a permutation per epoch, disjoint ranks, resumable position)
        self.plan = SamplePlan(len(train_index), cache_index=None, views=0, seed=cfg.seed,
                               online_fraction=0.0, needs_targets=False)
        self.sampler = PlanSampler(self.plan, batch_size=cfg.batch_size,
                                   accum_steps=cfg.accum_steps, world_size=dist.world_size,
                                   rank=dist.rank)
        if cfg.mixup_active and self.sampler.micro % 2:
            raise FinetuneSetupError(
                f"batch_size: {cfg.batch_size} gives {self.sampler.micro} images per rank and "
                "micro-step; mixup/cutmix needs an even number: change batch_size")
        workers = cfg.num_workers
        loader_args = dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                           persistent_workers=workers > 0,
                           prefetch_factor=4 if workers > 0 else None,
                           worker_init_fn=_worker_init if workers > 0 else None)
        self.train_set = LabelledImages(train_index, train_tf, seed=cfg.seed, train=True)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.sampler.micro, sampler=self.sampler, **loader_args)
        self.test_set = (LabelledImages(test_index, test_tf) if test_index is not None else None)
        self.train_samples = len(train_index)

        # optimizer, schedule, mixup, loss
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.base_lr = cfg.blr * cfg.batch_size / 256
        self.optimizer = _build_optimizer(self.model, cfg, self.base_lr)
        self.scheduler = _build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.mixup, self.criterion = _build_mixup(cfg, self.num_classes)

        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                         is_writer=dist.is_main)
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None
        self.samples = 0
        self.final_loss: float | None = None
        self.lr = 0.0

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "finetune",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "num_classes": self.num_classes,
            "model_kwargs": {k: v for k, v in self.model_kwargs.items()},
            "model_sha256": self.model_sha256,
            "finetune_config": self.cfg.training_key(),
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> None:
        self.last_checkpoint = self.checkpointer.save(self.state_dict(), self.global_step)
        self.dist.barrier()

    def maybe_resume(self) -> None:
        path = self.checkpointer.latest() if self.dist.is_main else None
        path = self.dist.broadcast(str(path) if path else None)
        if path is None:
            return
        state = load_checkpoint(path)
        if state.get("kind") != "finetune":
            raise FinetuneSetupError(f"checkpoint {path} is not a fine-tuning checkpoint; use "
                                     "another --out folder")
        if state.get("model_sha256") != self.model_sha256:
            raise FinetuneSetupError(
                f"checkpoint {path} fine-tunes a different pretrained file; use another --out "
                "folder or delete it to start over")
        if (state.get("finetune_config") != self.cfg.training_key()
                or state.get("steps_per_epoch") != self.steps_per_epoch
                or state.get("num_classes") != self.num_classes):
            raise FinetuneSetupError(
                f"checkpoint {path} was written with other fine-tuning settings or data; use "
                "another --out folder or delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.last_checkpoint = Path(path)
        self.resumed_from = self.global_step
        if self.dist.is_main:
            logger.info("resumed fine-tuning %s from %s (step %d)", self.name, path,
                        self.global_step)

    # ---- one optimizer step -------------------------------------------------------------------

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mixup, forward/backward over the micro-batches, one AdamW step; returns the mean loss."""
        import contextlib

        # mixup and drop path draw from the global RNGs: seed them from the position
        seed = stable_seed("finetune-step", self.cfg.seed, self.global_step, self.dist.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self.lr_update()
        accum = len(micro_batches)
        total = torch.zeros((), dtype=torch.float64)
        for i, (images, labels) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
            sync = i == accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    logits = self.ddp(images)
                loss = self.criterion(logits.float(), labels)
                (loss / accum).backward()
            total += loss.detach().double().cpu() / accum
            self.samples += images.shape[0]
        packed = self.dist.all_reduce_sum(total.to(self.device)).cpu()
        mean = float(packed) / self.dist.world_size
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            raise FinetuneSetupError(
                f"fine-tuning {self.name}: non-finite loss at step {self.global_step}; stopped, "
                f"last good checkpoint: {self.last_checkpoint or 'none'} (lower blr or set "
                "clip_grad)")
        if self.cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def lr_update(self) -> float:
        """Set every group's lr for the current step (timm applies the layer-decay lr_scale)."""
        self.scheduler.step_update(self.global_step)
        self.lr = max(g["lr"] for g in self.optimizer.param_groups)
        return self.lr

    # ---- loop and evaluation ------------------------------------------------------------------

    def fit(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.maybe_resume()
        log = StepLog(self, total_steps=self.stop_step, log_every=cfg.log_every,
                      checkpoint_every=cfg.checkpoint_every, progress=self.progress,
                      desc=f"finetune {self.name}")
        self.model.train()
        try:
            while self.global_step < self.stop_step:
                self.sampler.set_position(self.epoch, self.step_in_epoch)
                batches = iter(self.loader)
                while (self.step_in_epoch < self.steps_per_epoch
                       and self.global_step < self.stop_step):
                    micro = [next(batches) for _ in range(cfg.accum_steps)]
                    loss = self.train_step(micro)
                    if log.after_step({"loss": loss},
                                      sum(int(m[0].shape[0]) for m in micro) * dist.world_size):
                        break  # end of the epoch
                del batches
        finally:
            log.close()
            if log.means:
                self.final_loss = log.means.get("loss")
            self.loader = None  # shuts persistent workers down

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Test top-1 (percent) and the number of test images; ranks split the test set."""
        indices = list(range(self.dist.rank, len(self.test_set), self.dist.world_size))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.test_set, indices), batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers, worker_init_fn=_worker_init
            if self.cfg.num_workers > 0 else None)
        was_training = self.model.training
        self.model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        try:
            for images, labels in loader:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    logits = self.model(images.to(self.device, non_blocking=True))
                pred = logits.float().argmax(dim=1).cpu()
                counts += torch.tensor([float((pred == labels).sum()), float(labels.numel())],
                                       dtype=torch.float64)
        finally:
            self.model.train(was_training)
        counts = self.dist.all_reduce_sum(counts.to(self.device)).cpu()
        return 100.0 * float(counts[0]) / max(float(counts[1]), 1.0), int(counts[1])


def finetune(cfg: FinetuneConfig, *, model_path: str | Path | None, train_shards,
             test_shards=None, out_dir: str | Path, arch: str = "vit_base_patch16_224",
             timm_kwargs: dict | None = None, allow_pickle: bool = False, progress: bool = True,
             name: str | None = None) -> FinetuneSummary:
    """Fine-tune ``model_path`` on labelled ``train_shards``; top-1 on ``test_shards``.

    Every torchrun rank calls this with the same arguments. Resumes from
    ``<out_dir>/checkpoints/last``; a finished run trains nothing and re-evaluates. Writes
    ``checkpoints/``, ``logs/`` and ``result.json`` under ``out_dir``.
    """
    from .train import DistEnv

    cfg.validate()
    if model_path is not None and not Path(model_path).is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    out_dir = Path(out_dir)
    dist = DistEnv.from_env(cfg.device)
    try:
        if cfg.batch_size % (dist.world_size * cfg.accum_steps):
            raise FinetuneSetupError(
                f"batch_size: {cfg.batch_size} is not divisible by world size x accum_steps = "
                f"{dist.world_size} x {cfg.accum_steps}")
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        indexes = []
        for spec, limit, what in ((train_shards, cfg.train_limit, "--train"),
                                  (test_shards, cfg.test_limit, "--test")):
            if spec is None:
                indexes.append(None)
                continue
            if dist.is_main:
                _open_split(spec, out_dir, limit, what, write=True)
            dist.barrier()
            indexes.append(_open_split(spec, out_dir, limit, what, write=False))
        train_index, test_index = indexes
        if len(train_index) < cfg.batch_size:
            raise FinetuneSetupError(f"--train: {len(train_index)} images, fewer than batch_size "
                                     f"{cfg.batch_size}; lower batch_size")
        runner = Finetuner(cfg, model_path=model_path, arch=arch, train_index=train_index,
                           test_index=test_index, out_dir=out_dir, dist=dist,
                           timm_kwargs=timm_kwargs, allow_pickle=allow_pickle,
                           progress=progress, name=name)
        start = time.perf_counter()
        runner.fit()
        seconds = time.perf_counter() - start
        top1, tested = runner.evaluate() if runner.test_set is not None else (None, 0)
        summary = FinetuneSummary(
            name=runner.name, top1=top1, test_samples=tested, steps=runner.global_step,
            total_steps=runner.total_steps, epochs=runner.global_step / runner.steps_per_epoch,
            samples=runner.samples * dist.world_size, seconds=seconds,
            samples_per_s=runner.samples * dist.world_size / seconds if seconds > 0 else 0.0,
            resumed_from_step=runner.resumed_from, loss=runner.final_loss,
            num_classes=runner.num_classes, train_samples=runner.train_samples,
            world_size=dist.world_size, device=str(dist.device),
            checkpoint=str(runner.last_checkpoint) if runner.last_checkpoint else None,
            out_dir=str(out_dir))
        if dist.is_main:
            _write_result(out_dir, summary, cfg, model_path)
            logger.info("fine-tuning %s finished:\n%s", runner.name, summary.format())
        dist.barrier()
        return summary
    finally:
        dist.close()


def _write_result(out_dir: Path, summary: FinetuneSummary, cfg: FinetuneConfig,
                  model_path) -> None:
    info = {"summary": to_dict(summary), "config": to_dict(cfg),
            "model": str(model_path) if model_path is not None else None}
    write_json_atomic(out_dir / "result.json", info, style="sorted")
