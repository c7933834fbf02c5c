"""The training loop (:class:`Trainer`): model, optimizer, loader, checkpoints, exact resume."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.checkpoint import (
    Checkpointer,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from stages.configs import to_dict
from stages.data import (
    Batch,
    CacheRead,
    DataError,
    PlanSampler,
    SamplePlan,
    TargetBuilder,
    TrainDataset,
)
from stages.loader import (
    BatchedTrainDataset,
    StreamingCacheDataset,
    loader_settings,
    make_loader,
)
from stages.metrics import LoaderMeter, StepLog, WindowMean
from stages.optim import LRSchedule, build_optimizer, scaled_lr

from .config import (
    NonFiniteLossError,
    StaleRunError,
    TrainConfig,
    TrainSetupError,
    TrainSummary,
)
from .dist import DistEnv
from .inputs import RunInputs

logger = logging.getLogger("stages.train")


@dataclass
class StepCounters:
    samples: int = 0
    online: int = 0
    cached: int = 0
    skipped_bad: int = 0
    fallback: int = 0  # samples that lacked their cache record (records.MISSING)


# a callback the trainer calls before each step: (trainer, the step's micro-batches)
OnBatches = Callable[["Trainer", list[Batch]], None]


class Trainer:
    """Assembles the components for one run and runs the loop (every rank builds one)."""

    def __init__(self, run: TrainConfig, inputs: RunInputs, out_dir: Path, dist: DistEnv,
                 *, progress: bool = True, on_batches: OnBatches | None = None):
        from tec.model import NewModel

        self.run = run
        self.inputs = inputs
        self.out_dir = Path(out_dir)
        self.dist = dist
        self.device = dist.device
        self.progress = progress and dist.is_main
        cfg = inputs.model_cfg
        self.needs_targets = cfg.target == "tec"

        amp = run.amp == "bf16" or (run.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if amp else None

        # data
        num_samples = (len(inputs.source_index) if inputs.source_index is not None
                       else inputs.cache_reader.num_samples)
        self.plan = SamplePlan(
            num_samples, cache_index=inputs.cache_index, views=inputs.views,
            seed=run.seed, online_fraction=run.online_fraction,
            view_selection=run.view_selection, needs_targets=self.needs_targets,
            can_compute_online=inputs.base_model is not None)
        self.sampler = PlanSampler(self.plan, batch_size=run.batch_size,
                                   accum_steps=run.accum_steps, world_size=dist.world_size,
                                   rank=dist.rank)
        base_model = inputs.base_model
        needs_online = self.needs_targets and (
            self.plan.all_fresh or run.online_fraction > 0 or bool(self.plan.missing.any()))
        if base_model is not None:
            # the base model only runs for fresh views and samples missing from the cache
            base_model = base_model.to(self.device) if needs_online else None
            inputs.base_model = base_model
        cache_read = None
        if self.needs_targets and self.plan.cache_index is not None:
            cache_read = CacheRead(path=inputs.cache_path, index=inputs.cache_index, k=cfg.k,
                                   attention=cfg.use_attention, half=inputs.codec == "float16")
        self.dataset = None
        if inputs.source_index is not None:
            self.dataset = TrainDataset(inputs.source_index, inputs.policy, seed=run.seed,
                                        num_patches=cfg.num_patches, cache=cache_read)
            if cache_read is not None:
                self.dataset.use_reader(inputs.cache_reader)  # no re-open per worker
        keys = (inputs.source_index.keys if inputs.source_index is not None
                else inputs.cache_reader.keys)
        # one micro-batch per call (__getitems__): cached views of a cache with pixels are read
        # in batches, the rest goes through the per-sample TrainDataset above
        self.batched = BatchedTrainDataset(
            reader=inputs.cache_reader if cache_read is not None else None,
            cache_index=inputs.cache_index, keys=keys, policy=inputs.policy, seed=run.seed,
            num_patches=cfg.num_patches, k=cfg.k, attention=cfg.use_attention,
            items=self.dataset)
        # read: stream - a self-contained WebDataset cache read sequentially (checked in
        # TrainConfig.validate and resolve_inputs): same steps per epoch, its own order
        self.stream = None
        if run.read == "stream":
            self.stream = StreamingCacheDataset(
                inputs.cache_reader, policy=inputs.policy, seed=run.seed,
                num_patches=cfg.num_patches, k=cfg.k, attention=cfg.use_attention,
                batch_size=self.sampler.micro, accum_steps=run.accum_steps, rank=dist.rank,
                world=dist.world_size, shuffle_buffer=run.shuffle_buffer)
            if self.stream.steps != self.sampler.steps:
                raise DataError(f"run {run.name}: the stream has {self.stream.steps} steps per "
                                f"epoch, the sample plan {self.sampler.steps}; use read: random")
        self._build_loader(run.num_workers)
        self.targets = None
        if self.needs_targets:
            self.targets = TargetBuilder(
                base_model=base_model, k=cfg.k, mode=run.feature_norm,
                attention=cfg.use_attention, last_n=inputs.last_n,
                k_max=inputs.k_max if inputs.k_max is not None else cfg.k,
                amp_dtype=self.amp_dtype)

        # model (same init on every rank; DDP also broadcasts rank 0's weights)
        torch.manual_seed(run.seed)
        self.model = NewModel(cfg).to(self.device)
        self.ddp = self.model
        if dist.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        # optimizer and schedule
        self.steps_per_epoch = self.sampler.steps
        self.schedule = LRSchedule(
            base_lr=scaled_lr(run.blr, run.batch_size), min_lr=run.min_lr,
            warmup_steps=run.warmup_epochs * self.steps_per_epoch,
            total_steps=run.epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, lr=self.schedule.base_lr,
                                         weight_decay=run.weight_decay, betas=run.betas)
        self.total_steps = run.epochs * self.steps_per_epoch
        if run.max_steps is not None:
            self.total_steps = min(self.total_steps, run.max_steps)

        # state
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=run.keep_checkpoints,
                                         is_writer=dist.is_main)
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None
        self.counters = StepCounters()
        self.loader_meter = LoaderMeter(self.loader_settings.workers)
        self.window = WindowMean()
        self.final_losses: dict[str, float] = {}
        self.lr = 0.0
        self._last_batch: Batch | None = None
        # called with (trainer, the step's micro-batches) before each step (tests observe the
        # samples each rank trains on)
        self.on_batches = on_batches

    def _build_loader(self, workers: int | None) -> None:
        """The DataLoader (and its settings) over the stream or the sample plan's batches."""
        run, dist = self.run, self.dist
        settings = loader_settings(self.device, workers=workers,
                                   prefetch_factor=run.prefetch_factor,
                                   persistent_workers=run.persistent_workers,
                                   pin_memory=run.pin_memory)
        if dist.is_main:
            logger.info("run %s data loader (read: %s): %d workers, prefetch %s, persistent %s, "
                        "pinned memory %s (%s)", run.name, run.read, settings.workers,
                        settings.prefetch_factor, settings.persistent_workers,
                        settings.pin_memory, settings.reason)
        self.loader_settings = settings
        if self.stream is not None:
            self.loader = make_loader(self.stream, settings, worker_init_fn=_worker_init)
        else:
            self.loader = make_loader(self.batched, settings, sampler=self.sampler,
                                      batch_size=self.sampler.micro, worker_init_fn=_worker_init)

    def _stream_layout(self) -> dict[str, int] | None:
        """What the order of ``read: stream`` depends on besides (seed, epoch)."""
        if self.stream is None:
            return None
        return {"ranks": self.dist.world_size, "workers": max(1, self.loader_settings.workers),
                "shuffle_buffer": self.run.shuffle_buffer}

    def _check_read_mode(self, state: dict, path) -> None:
        """Refuse a checkpoint of another read mode or stream layout (the sample order differs);
        with num_workers unset, a stream adopts the checkpoint's number of loader workers."""
        data = state.get("data") or {}
        read = data.get("read", "random")
        if read != self.run.read:
            raise TrainSetupError(
                f"read: checkpoint {path} was written with read: {read}, this run has read: "
                f"{self.run.read} (another sample order); set read: {read} to continue it, or "
                "use a new run name or delete the run folder to start over")
        mine, recorded = self._stream_layout(), data.get("stream")
        if mine is None or recorded == mine:
            return
        recorded = recorded or {}
        if (recorded.get("ranks"), recorded.get("shuffle_buffer")) == (
                mine["ranks"], mine["shuffle_buffer"]) and self.run.num_workers is None \
                and isinstance(recorded.get("workers"), int) and recorded["workers"] >= 1:
            logger.info("run %s: read: stream continues with the checkpoint's %d loader workers "
                        "per rank (the sample order depends on them)", self.run.name,
                        recorded["workers"])
            self._build_loader(recorded["workers"])
            self.loader_meter = LoaderMeter(self.loader_settings.workers)
            return
        raise TrainSetupError(
            f"read: stream: checkpoint {path} was written by {recorded.get('ranks')} rank(s) x "
            f"{recorded.get('workers')} loader worker(s) with shuffle_buffer "
            f"{recorded.get('shuffle_buffer')}, this run has {mine['ranks']} x {mine['workers']} "
            f"with {mine['shuffle_buffer']}; the stream's sample order depends on them - run "
            "with the same ranks, num_workers and shuffle_buffer, or start over")

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": self.dist.gather(capture_rng_state()),
            "world_size": self.dist.world_size,
            "new_model_config": self.inputs.model_cfg.to_dict(),
            "train_config": to_dict(self.run),
            "identity": getattr(self, "identity", None),  # stages.identity.run_identity
            "steps_per_epoch": self.steps_per_epoch,
            "data": {"cache": self.inputs.cache_path, "num_samples": len(self.plan),
                     "shards": len(self.inputs.shards), "read": self.run.read,
                     "stream": self._stream_layout()},
        }

    def save_checkpoint(self) -> Path:
        state = self.state_dict()  # collective (RNG gather): every rank
        path = self.checkpointer.save(state, self.global_step)
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def maybe_resume(self) -> None:
        """Continue from ``<out_dir>/checkpoints/last`` when it exists."""
        path = self.checkpointer.latest() if self.dist.is_main else None
        path = self.dist.broadcast(str(path) if path else None)
        if path is None:
            return
        state = load_checkpoint(path)
        if getattr(self, "identity", None) is not None:
            from stages.identity import identity_changes

            changes = identity_changes(state.get("identity"), self.identity)
            if changes:
                raise StaleRunError(
                    f"run {self.run.name}: {path} was trained from other inputs (changed: "
                    f"{'; '.join(changes)}); `tec run` trains it anew, or use a new run name or "
                    f"delete {self.out_dir} to start over", changes)
        if state.get("new_model_config") != self.inputs.model_cfg.to_dict():
            raise TrainSetupError(
                f"checkpoint {path} was written for a different model config; use a new run name "
                "or delete the run folder to start over")
        if (state.get("steps_per_epoch") != self.steps_per_epoch
                or state["train_config"].get("batch_size") != self.run.batch_size):
            raise TrainSetupError(
                f"checkpoint {path} was written with {state.get('steps_per_epoch')} steps per "
                f"epoch "
                f"and batch_size {state['train_config'].get('batch_size')}, this run has "
                f"{self.steps_per_epoch} and {self.run.batch_size} (data or batch changed); use a "
                "new run name or delete the run folder to start over")
        self._check_read_mode(state, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            logger.warning("checkpoint %s was written by %d process(es), this run has %d; RNG "
                           "states are reseeded (data order and masks are unaffected)", path,
                           len(rng), self.dist.world_size)
        self.last_checkpoint = Path(path)
        self.resumed_from = self.global_step
        if self.dist.is_main:
            logger.info("resumed run %s from %s (step %d, epoch %d + %d steps)", self.run.name,
                        path, self.global_step, self.epoch, self.step_in_epoch)

    # ---- one optimizer step -----------------------------------------------------------------

    def _forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        from tec.targets import normalize_images

        images = normalize_images(batch.images.to(self.device, non_blocking=True))
        noise = batch.noise.to(self.device, non_blocking=True)
        targets = self.targets(images, batch) if self.targets is not None else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            return self.ddp(images, targets, noise=noise)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over ``accum_steps`` micro-batches, then one optimizer step."""
        accum = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(5, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            counts += torch.tensor([len(batch), int(batch.fresh.sum()) if len(batch) else 0,
                                    len(batch) - (int(batch.fresh.sum()) if len(batch) else 0),
                                    len(batch.skipped), 0], dtype=torch.float64)
            if len(batch) and self.plan.fallback.any():
                counts[4] += int(self.plan.fallback[batch.indices.numpy()].sum())
            weight = 1.0
            if len(batch) == 0:  # every sample bad: run a zero-weight step to keep DDP in step
                if self._last_batch is None:
                    raise DataError("a whole micro-batch was unreadable at the start of the run; "
                                    "check the source shards (bad samples are listed in the logs)")
                batch, weight = self._last_batch, 0.0
            self._last_batch = batch
            sync = i == accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                out = self._forward(batch)
                (out["loss"] * (weight / accum)).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * (weight / accum)
        names = sorted(sums)
        stats = torch.stack([sums[n] for n in names]).to(torch.float64).cpu()
        packed = torch.cat([stats, counts]).to(self.device)
        packed = self.dist.all_reduce_sum(packed).cpu()
        losses = {n: float(v) / self.dist.world_size for n, v in zip(names, packed[: len(names)])}
        c = [int(round(float(x))) for x in packed[len(names):]]
        if not all(math.isfinite(v) for v in losses.values()):
            self.optimizer.zero_grad(set_to_none=True)
            bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not math.isfinite(v))
            raise NonFiniteLossError(
                f"run {self.run.name}: non-finite loss ({bad}) at step {self.global_step} "
                f"(epoch {self.epoch}); stopped, last good checkpoint: "
                f"{self.last_checkpoint or 'none'} (lower blr or set clip_grad)")
        if self.run.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.clip_grad)
        self.lr = self.schedule.apply(self.optimizer, self.global_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.samples += c[0]
        self.counters.online += c[1]
        self.counters.cached += c[2]
        self.counters.skipped_bad += c[3]
        self.counters.fallback += c[4]
        return losses

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        run, dist = self.run, self.dist
        self.maybe_resume()
        log = StepLog(self, total_steps=self.total_steps, log_every=run.log_every,
                      checkpoint_every=run.checkpoint_every, progress=self.progress,
                      desc=run.name, window=self.window)
        start = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                self.sampler.set_position(self.epoch, self.step_in_epoch)
                if self.stream is not None:
                    self.stream.set_position(self.epoch, self.step_in_epoch)
                batches = iter(self.loader)
                while (self.step_in_epoch < self.steps_per_epoch
                       and self.global_step < self.total_steps):
                    t0 = time.perf_counter()
                    try:
                        micro = [next(batches) for _ in range(run.accum_steps)]
                    except ValueError as exc:  # worker errors arrive with a traceback appended
                        raise type(exc)(_worker_error_line(exc)) from None
                    wait = time.perf_counter() - t0
                    self.loader_meter.add(sum(len(b) + len(b.skipped) for b in micro),
                                          sum(b.load_seconds for b in micro), wait)
                    if self.on_batches is not None:
                        self.on_batches(self, micro)
                    losses = self.train_step(micro)
                    if log.after_step(losses, sum(len(b) for b in micro) * dist.world_size,
                                      self._log_extra):
                        break  # end of the epoch
                del batches
        finally:
            log.close()
            if log.means:
                self.final_losses = log.means
            self.loader = None  # shuts persistent loader workers down (fit runs once)
        seconds = time.perf_counter() - start
        return self._summary(seconds)

    def _log_extra(self) -> dict[str, float]:
        """Logged beside the losses: online fallbacks (when records are missing from the cache)
        and the loader's capacity in samples/s (all ranks)."""
        values = {}
        if self.plan.fallback.any():
            values["fallback_online"] = self.counters.fallback
        capacity = self.loader_meter.capacity()
        if capacity is not None:
            values["loader_samples_per_s"] = capacity * self.dist.world_size
        return values

    def _summary(self, seconds: float) -> TrainSummary:
        dist = self.dist
        meter = torch.tensor([self.loader_meter.samples, self.loader_meter.busy_seconds,
                              self.loader_meter.wait_seconds], dtype=torch.float64)
        meter = dist.all_reduce_sum(meter.to(self.device)).cpu()
        samples = self.counters.samples
        capacity = None
        if float(meter[1]) > 0:
            capacity = (self.loader_meter.workers * float(meter[0]) / float(meter[1])
                        * dist.world_size)
        return TrainSummary(
            name=self.run.name,
            steps=self.global_step,
            epochs=self.global_step / self.steps_per_epoch,
            samples=samples,
            seconds=seconds,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            loader_samples_per_s=capacity,
            data_wait_fraction=((float(meter[2]) / dist.world_size / seconds) if seconds > 0
                                else None),
            online_samples=self.counters.online if self.needs_targets else 0,
            cached_samples=self.counters.cached if self.needs_targets else 0,
            skipped_missing=self.plan.skipped_per_epoch * max(
                0, self._epochs_started()),
            skipped_bad=self.counters.skipped_bad,
            fallback_online=self.counters.fallback if self.needs_targets else 0,
            resumed_from_step=self.resumed_from,
            losses=self.final_losses,
            lr=self.lr,
            world_size=dist.world_size,
            device=str(self.device),
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            log_dir=str(self.out_dir / "logs"),
        )

    def _epochs_started(self) -> int:
        first = (self.resumed_from or 0) // self.steps_per_epoch
        last = math.ceil(self.global_step / self.steps_per_epoch)
        return max(0, last - first)


def _worker_init(_worker_id: int) -> None:
    # decoding and resizing are per-sample; one thread per worker avoids oversubscription
    torch.set_num_threads(1)


def _worker_error_line(exc: BaseException) -> str:
    """The original one-line message of an exception re-raised from a DataLoader worker."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ": " in line and line.split(": ", 1)[0].endswith(("Error", "Exception")):
            return line.split(": ", 1)[1]
    return lines[-1] if lines else type(exc).__name__
