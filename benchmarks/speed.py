"""Speed benchmark: stage-1 efficiency, stage-2 speedup, loader headroom, bytes per cached view.

    python benchmarks/speed.py                      # ~5-10 min on a 2-core CPU
    python benchmarks/speed.py --quick              # smoke test (tiny data, a minute or two)
    python benchmarks/speed.py --set targets.batch_size=64 --set runs.tec.epochs=3

Writes ``benchmarks/results/speed.json`` (``--out`` to change). Every number is a ratio of two
throughputs measured in this one process, on this machine, one after the other (DESIGN §10):

stage1_efficiency    stage-1 views/s end to end (decode, views, base model, targets, codec,
                     commit; Ray already up; steady state: a run's parts after its first) /
                     the base model's forward-only views/s on pre-decoded uint8 tensors, same
                     batch size and torch threads as the stage-1 base-model actor. A "view" is
                     one image through the base model; stage 1 runs K views per source image.
stage2_speedup       training samples/s from the cache / samples/s with online_fraction 1.0
                     (same new model, base model, data, batch, loader workers), the two modes
                     run alternately in segments (cached, online, cached, online).
loader_headroom      the cache data loader's samples/s with no training (the training run's
                     own loader) / training samples/s from the cache.
bytes_per_view_ratio_fp16 / _int8
                     bytes on disk per cached (sample, view) record / its float32 tensor bytes.

The machine these run on is shared and noisy, and other work only ever slows a measurement
down, so the headline ratios use best-of-repeats on both sides (timeit's rule: the best
steady stage-1 part / the best forward-only pass; the p90 of the per-step training rates);
the median-based ratios, the all-parts stage-1 ratio, the ratios including the driver's setup
and Ray's start-up, a serial per-view profile of stage 1, the FLOP bound of the stage-2
speedup and its resident-batch bound (the trainers' own steps on a batch already in memory,
cached and online alternately: what this machine's arithmetic allows; a CPU's backward pass
runs at fewer FLOP/s than an inference forward, so this bound sits below the FLOP bound) are
recorded under ``secondary``.

Config: ``benchmarks/configs/speed.yaml`` (pipeline.yaml schema, so ``tec plan`` reads it too).
The script writes the synthetic JPEG shards and a random-init base checkpoint the config names.
Benchmarks report, they never assert.
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    load_average,
    result_header,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.speed")

GOALS = {"stage1_efficiency": 0.90, "stage2_speedup": 1.6, "loader_headroom": 3.0}
QUICK_OVERRIDES = [
    "data.num_samples=48",
    "data.train=runs/bench/speed-quick/data/train-{000000..000001}.tar",
    "workdir=runs/bench/speed-quick",
    "base_model.checkpoint=runs/bench/speed-quick/base/vit_tiny_random.safetensors",
    "targets.cache=runs/bench/speed-quick/cache",
    "targets.batch_size=8",
    "runs.tec.batch_size=8",
    "runs.tec.epochs=1",
]


# --------------------------------------------------------------------------------- inputs
def write_jpeg_shards(pattern: str, num_images: int, size_range: tuple[int, int],
                      seed: int = 0) -> list[str]:
    """Synthetic JPEG WebDataset shards (smooth random RGB, sides in ``size_range``, quality 90).

    Reuses existing shards that hold the expected number of images.
    """
    import braceexpand

    from stages.sources import open_source
    from stages.synthetic import encode, smooth_image, write_tar

    paths = [str(REPO_ROOT / p) if not Path(p).is_absolute() else p
             for p in braceexpand.braceexpand(pattern)]
    per_shard = [num_images // len(paths) + (i < num_images % len(paths))
                 for i in range(len(paths))]
    try:
        source = open_source("webdataset", paths)
        if [source.count(s) for s in source.shards()] == per_shard:
            return paths
    except (ValueError, OSError):
        pass
    rng = np.random.default_rng(seed)
    for s, (path, count) in enumerate(zip(paths, per_shard)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        members = []
        for i in range(count):
            h, w = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
            key = f"s{s:03d}_{i:05d}"
            members.append((f"{key}.jpg", encode(smooth_image(rng, h, w), "JPEG", quality=90)))
            members.append((f"{key}.cls", str(i % 10).encode()))
        write_tar(path, members)
    log.info("wrote %d JPEG images (%d-%d px) in %d shards", num_images, *size_range, len(paths))
    return paths


def write_random_base(base_cfg, seed: int = 0) -> None:
    """A random-init timm checkpoint (.safetensors) of the configured architecture.

    Throughput does not depend on the weights; a random base model keeps the benchmark free of
    downloads (the quality benchmark uses a trained one).
    """
    import timm
    import torch
    from safetensors.torch import save_file

    path = Path(base_cfg.checkpoint)
    if path.is_file():
        return
    torch.manual_seed(seed)
    model = timm.create_model(base_cfg.arch, num_classes=0, pretrained=False,
                              **base_cfg.timm_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def render_pre_decoded(source_cfg, policy, views: int, limit: int):
    """uint8 [V,3,S,S]: the K views of the first ``limit`` images, decoded and rendered once."""
    import torch

    from stages.sources import decode_image, open_source
    from stages.views import render_views, view_params

    source = open_source(source_cfg.kind, source_cfg.path)
    out, n = [], 0
    for shard in source.shards():
        for sample in source.samples(shard):
            if n >= limit:
                break
            image = decode_image(sample.data)
            h, w = image.shape[:2]
            params = [view_params(policy, sample.key, v, h, w) for v in range(views)]
            out.append(render_views(image, params, policy.output_size, policy.interpolation))
            n += 1
    return torch.cat(out)


# --------------------------------------------------------------------------------- stage 1
def forward_only(base_cfg, views_uint8, *, batch_size: int, threads: int, last_n: int,
                 k_max: int, passes: int = 2) -> dict:
    """Base-model views/s on pre-decoded uint8 tensors with ``threads`` torch threads.

    'forward': normalize_images + forward_features (the compute bound).
    'targets': normalize_images + extract_targets (what the stage-1 actor computes).
    One warm-up batch, then ``passes`` passes over all views per mode, the modes alternating
    (forward, targets, forward, ...) so that a slow spell of a shared machine hits both. Returns
    every pass's rate and their median per mode.
    """
    import torch

    from tec.targets import extract_targets, normalize_images

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = base_cfg.load()
        batches = list(torch.split(views_uint8, batch_size))
        if len(batches) > 1 and len(batches[-1]) < batch_size:
            batches = batches[:-1]  # full batches only, as the actor sees (but for a shard tail)
        fns = {
            "forward": lambda x: model.forward_features(normalize_images(x)),
            "targets": lambda x: extract_targets(model, normalize_images(x), last_n=last_n,
                                                 k_max=k_max),
        }
        rates: dict[str, list[float]] = {name: [] for name in fns}
        views = sum(len(b) for b in batches)
        with torch.inference_mode():
            for fn in fns.values():
                fn(batches[0])  # warm-up
            for _ in range(passes):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for batch in batches:
                        fn(batch)
                    rates[name].append(views / (time.perf_counter() - start))
        out = {"threads": threads, "batch_size": batch_size, "views_per_pass": views}
        for name, values in rates.items():
            out[f"{name}_views_per_s"] = statistics.median(values)
            out[f"{name}_best_views_per_s"] = max(values)
            out[f"{name}_passes_views_per_s"] = values
        return out
    finally:
        torch.set_num_threads(previous)


class _PartLog(logging.Handler):
    """Collects stage 1's 'part %s committed: %d images, %d bad, %.1f s' records (driver side)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.parts: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("part %s committed") and len(record.args or ()) >= 4:
            part, images, bad, seconds = record.args[:4]
            self.parts.append({"part": part, "images": int(images), "seconds": float(seconds),
                               "end": record.created})


def run_stage1_timed(cfg, base_cfg, cache: Path, *, codec: str | None = None) -> dict:
    """One stage-1 run into a fresh cache; wall time, the run's summary and the part timings."""
    from stages.stage1 import run_stage1

    shutil.rmtree(cache, ignore_errors=True)
    targets = copy.deepcopy(cfg.targets)
    targets.cache = str(cache)
    if codec is not None and codec != targets.codec:
        targets.codec = codec
        targets.codec_params = {}  # the headline codec's parameters are not this codec's
    handler = _PartLog()
    stage1_log = logging.getLogger("stages.stage1")
    level = stage1_log.level
    stage1_log.addHandler(handler)
    stage1_log.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        summary = run_stage1(targets, base_cfg, progress=False)
        wall = time.perf_counter() - start
    finally:
        stage1_log.removeHandler(handler)
        stage1_log.setLevel(level)
    out = {
        "codec": targets.codec,
        "images": summary.images,
        "views": summary.views,
        "forward_passes": summary.forward_passes,
        "wall_s": wall,
        "summary_seconds": summary.seconds,
        "images_per_s_wall": summary.images / wall,
        "views_per_s_wall": summary.views / wall,
        "cache_bytes": summary.cache_bytes,
        "parts": handler.parts,
    }
    if handler.parts and len(handler.parts) == summary.parts_done:
        # Steady state: from the first part's start to the last part's commit (the parts' own
        # work: decode, views, actor calls, cache writes, commit), without the driver's setup.
        first = min(p["end"] - p["seconds"] for p in handler.parts)
        last = max(p["end"] for p in handler.parts)
        span = max(last - first, 1e-9)
        out["parts_span_s"] = span
        out["images_per_s_parts"] = summary.images / span
        out["views_per_s_parts"] = summary.views / span
        # Each part's own rate. The first part also carries one-off costs of a fresh Ray
        # worker (importing torch and the stages inside the task, the actor's first calls),
        # so the steady-state figures leave it out.
        parts = sorted(handler.parts, key=lambda p: p["end"])
        for p in parts:
            p["views_per_s"] = p["images"] * targets.views / p["seconds"]
        out["first_part_extra_s"] = parts[0]["seconds"] - statistics.median(
            p["seconds"] for p in parts[1:]) if len(parts) > 1 else None
        steady = parts[1:] or parts
        steady_span = steady[-1]["end"] - (steady[0]["end"] - steady[0]["seconds"])
        out["views_per_s_after_first_part"] = (sum(p["images"] for p in steady) * targets.views
                                               / max(steady_span, 1e-9))
        out["best_part_views_per_s"] = max(p["views_per_s"] for p in steady)
    return out


def start_local_ray(num_cpus: int | None) -> None:
    """A local Ray instance with the same settings stage 1 would start (so its startup is
    excluded from the 'warm' measurements)."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(address="local", include_dashboard=False, log_to_driver=False,
                  configure_logging=False, _node_ip_address="127.0.0.1")
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def actor_plan(cfg) -> dict:
    """How stage 1 will spread over this machine (actors, threads per actor, shard tasks)."""
    from common import usable_cores

    from stages.stage1 import plan_actors  # the plan run_stage1 itself uses

    cpus = cfg.targets.ray.num_cpus or usable_cores()
    plan = plan_actors(cfg.targets, {"CPU": cpus, "GPU": 0})
    return {"cpus": cpus, "num_actors": plan.num_actors, "threads_per_actor": plan.threads,
            "actor_options": plan.actor_options, "concurrent_shards": plan.concurrent}


class _TimedActor:
    """An in-process base-model actor that adds up the seconds spent in its calls."""

    def __init__(self, actor):
        self.actor = actor
        self.seconds = 0.0
        self.views = 0

    def __call__(self, views):
        start = time.perf_counter()
        out = self.actor(views)
        self.seconds += time.perf_counter() - start
        self.views += len(views)
        return out


def stage1_profile(cfg, base_cfg, cache: Path, out: Path, threads: int) -> dict:
    """Where one shard's stage-1 time goes, run serially in this process (no Ray, no overlap):
    decode + views, the base-model actor (normalise, forward, targets, float16 numpy), and the
    rest (cache writes, codec, commit). A cache with the given cache's manifest is created at
    ``out`` and the first shard is processed with :func:`stages.stage1.process_shard`."""
    import torch

    from stages.configs import to_dict
    from stages.sources import decode_image, open_source
    from stages.stage1 import BaseModelActor, ShardJob, process_shard
    from stages.views import render_views, view_params
    from storage import CacheSpec, create_cache, open_cache

    manifest = open_cache(cache).manifest
    shutil.rmtree(out, ignore_errors=True)
    writer = create_cache(out, CacheSpec.from_dict(manifest["spec"]),
                          base_model=manifest["base_model"], view_policy=manifest["view_policy"],
                          source=manifest["source"],
                          parts=[(p["name"], p["slots"]) for p in manifest["parts"]])
    part, shard = manifest["parts"][0], manifest["source"]["shards"][0]
    t = cfg.targets
    previous = torch.get_num_threads()
    try:
        actor = _TimedActor(BaseModelActor(to_dict(base_cfg), t.last_n, t.k_max, threads=threads,
                                           float16=t.codec == "float16"))
        size = t.view_policy.output_size
        actor(np.zeros((t.batch_size, 3, size, size), np.uint8))  # warm-up
        actor.seconds, actor.views = 0.0, 0
        job = ShardJob(shard=shard, part=part["name"], index=0, slots=part["slots"],
                       source_kind=t.source.kind, source_path=t.source.path,
                       shard_size=t.source.shard_size, cache=str(out), views=t.views,
                       policy=t.view_policy.to_dict(), batch_size=t.batch_size,
                       max_in_flight=t.max_in_flight)
        start = time.perf_counter()
        result = process_shard(job, [actor], writer=writer)
        total = time.perf_counter() - start
        # decode + views alone (the same calls process_shard makes)
        source = open_source(t.source.kind, t.source.path)
        start = time.perf_counter()
        for sample in source.samples(shard):
            image = decode_image(sample.data)
            h, w = image.shape[:2]
            params = [view_params(t.view_policy, sample.key, v, h, w) for v in range(t.views)]
            render_views(image, params, size, t.view_policy.interpolation)
        decode = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    views = result.views
    rest = max(total - actor.seconds - decode, 0.0)
    return {
        "part": part["name"], "images": result.images, "views": views, "threads": threads,
        "total_s": total, "actor_s": actor.seconds, "decode_and_views_s": decode,
        "write_codec_commit_s": rest,
        "ms_per_view": {"actor": 1000 * actor.seconds / views,
                        "decode_and_views": 1000 * decode / views,
                        "write_codec_commit": 1000 * rest / views},
        "share": {"actor": actor.seconds / total, "decode_and_views": decode / total,
                  "write_codec_commit": rest / total},
    }


def _decode_loop(shards: list[str], policy: dict, views: int, stop, counter) -> None:
    """Background process: decode + render views over and over until ``stop`` is set."""
    import torch

    from stages.sources import decode_image, open_source
    from stages.views import ViewPolicy, render_views, view_params

    torch.set_num_threads(1)
    policy = ViewPolicy.from_dict(policy)
    source = open_source("webdataset", shards)
    while not stop.is_set():
        for shard in source.shards():
            for sample in source.samples(shard):
                if stop.is_set():
                    return
                image = decode_image(sample.data)
                h, w = image.shape[:2]
                params = [view_params(policy, sample.key, v, h, w) for v in range(views)]
                render_views(image, params, policy.output_size, policy.interpolation)
                with counter.get_lock():
                    counter.value += 1


def forward_with_decode(cfg, base_cfg, views_uint8, **fwd_kwargs) -> dict:
    """forward_only while another process decodes and renders views on the other core(s),
    as a stage-1 shard task does: how much the two compete on this machine."""
    import multiprocessing as mp

    from stages.sources import open_source

    ctx = mp.get_context("spawn")
    stop, counter = ctx.Event(), ctx.Value("l", 0)
    shards = open_source(cfg.targets.source.kind, cfg.targets.source.path).shards()
    proc = ctx.Process(target=_decode_loop, daemon=True,
                       args=(shards, cfg.targets.view_policy.to_dict(), cfg.targets.views, stop,
                             counter))
    proc.start()
    try:
        while counter.value == 0 and proc.is_alive():  # the decoder is up and running
            time.sleep(0.2)
        start_count, start = counter.value, time.perf_counter()
        out = forward_only(base_cfg, views_uint8, **fwd_kwargs)
        out["background_images_per_s"] = (counter.value - start_count) / (
            time.perf_counter() - start)
    finally:
        stop.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
    return out


# --------------------------------------------------------------------------------- stage 2
def steady_rate(csv_path: Path, batch_size: int, skip: int) -> dict:
    """Samples/s over the logged steps after the first ``skip`` (log_every must be 1)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    rates = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    kept = rates[skip:] if len(rates) > skip else rates
    seconds = sum(batch_size / r for r in kept)
    return {"steps_logged": len(rates), "steps_used": len(kept),
            "samples_per_s": batch_size * len(kept) / seconds if seconds > 0 else float("nan"),
            "median_step_samples_per_s": statistics.median(kept) if kept else float("nan"),
            "step_samples_per_s": rates}


def train_timed(cfg, run, *, cache: str | None, base_cfg, out_dir: Path, skip: int) -> dict:
    from stages.train import train

    shutil.rmtree(out_dir, ignore_errors=True)  # train() resumes from an existing run folder
    start = time.perf_counter()
    summary = train(run, cache=cache, source=cfg.targets.source, base=base_cfg,
                    view_policy=cfg.targets.view_policy if cache is None else None,
                    out_dir=out_dir, progress=False)
    wall = time.perf_counter() - start
    steady = steady_rate(out_dir / "logs" / "metrics.csv", run.batch_size, skip)
    return {
        "online_fraction": run.online_fraction,
        "steps": summary.steps,
        "samples": summary.samples,
        "cached_samples": summary.cached_samples,
        "online_samples": summary.online_samples,
        "fit_seconds": summary.seconds,
        "wall_s": wall,
        "samples_per_s_fit": summary.samples_per_s,
        "samples_per_s_steady": steady["samples_per_s"],
        "median_step_samples_per_s": steady["median_step_samples_per_s"],
        "step_samples_per_s": steady["step_samples_per_s"],
        "steps_skipped_as_warmup": skip,
        "loader_capacity_in_run": summary.loader_samples_per_s,
        "data_wait_fraction": summary.data_wait_fraction,
        "final_losses": summary.losses,
    }


def _p90(rates: list[float]) -> float:
    """The p90 of step rates: on a shared machine other work only ever slows a step down, so
    the fast steps measure the code (timeit's "min of the repeats" rule)."""
    ordered = sorted(rates)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _pool(segments: list[dict], skip: int, batch_size: int) -> dict:
    """Steady-state rate of several training segments of one mode: the median of their
    per-step rates (first ``skip`` steps of each left out), plus the whole-fit and the
    mean-step-time rates."""
    steps = sorted(r for seg in segments for r in seg["step_samples_per_s"][skip:])
    fit_samples = sum(seg["samples"] for seg in segments)
    fit_seconds = sum(seg["fit_seconds"] for seg in segments)
    capacity = [seg["loader_capacity_in_run"] for seg in segments
                if seg["loader_capacity_in_run"]]
    return {
        "samples_per_s_p90_step": _p90(steps),
        "samples_per_s": statistics.median(steps),
        "samples_per_s_mean_step_time": batch_size * len(steps) / sum(batch_size / r
                                                                      for r in steps),
        "samples_per_s_fit": fit_samples / fit_seconds,
        "steps_used": len(steps),
        "loader_capacity_in_run": statistics.fmean(capacity) if capacity else None,
        "data_wait_fraction": statistics.fmean(seg["data_wait_fraction"] or 0.0
                                               for seg in segments),
    }


def resident_bound(cfg, run, online_run, *, cache: str, base_cfg, out_dir: Path,
                   repeats: int = 12) -> dict:
    """The stage-2 speedup with the data already in memory: the trainers' own ``train_step``
    (cached: decode the stored targets, new model forward/backward, optimizer step; online:
    the base model's forward and targets on top) on one resident batch each, timed alternately
    ``repeats`` times. No loader, no I/O: what this machine's arithmetic allows the input path
    to reach. Its ratio to the measured speedup is the input path's efficiency."""
    from stages.train import DistEnv, Trainer, resolve_inputs

    trainers, batches = {}, {}
    for mode, r in (("cached", run), ("online", online_run)):
        d = out_dir / mode
        shutil.rmtree(d, ignore_errors=True)
        dist = DistEnv()
        inputs = resolve_inputs(r, cache=cache if mode == "cached" else None,
                                source=cfg.targets.source, base=base_cfg,
                                view_policy=None if mode == "cached" else cfg.targets.view_policy,
                                device=dist.device, out_dir=d, dist=dist)
        trainers[mode] = Trainer(r, inputs, d, dist, progress=False)
        trainers[mode].sampler.set_position(0, 0)
        batches[mode] = next(iter(trainers[mode].loader))
        trainers[mode].loader = None  # stops the loader's workers: nothing but the step runs
    seconds: dict[str, list[float]] = {"cached": [], "online": []}
    for i in range(repeats + 1):  # the first round warms up both
        for mode in ("cached", "online"):
            t0 = time.perf_counter()
            trainers[mode].train_step([batches[mode]])
            if i:
                seconds[mode].append(time.perf_counter() - t0)
    rates = {m: [len(batches[m]) / s for s in v] for m, v in seconds.items()}
    p90 = {m: _p90(v) for m, v in rates.items()}
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {"repeats": repeats, "batch_size": len(batches["cached"]),
            "cached_samples_per_s_p90": p90["cached"], "online_samples_per_s_p90": p90["online"],
            "cached_samples_per_s_median": med["cached"],
            "online_samples_per_s_median": med["online"],
            "speedup_p90": p90["cached"] / p90["online"],
            "speedup_median": med["cached"] / med["online"]}


def loader_only(cfg, run, *, cache: str, out_dir: Path, epochs: int) -> dict:
    """Iterate the training run's own DataLoader (same dataset, sampler, workers, prefetch)
    without training. One untimed epoch starts the (persistent) workers; then ``epochs`` epochs
    are timed from ``iter()`` to the last batch, every sample counted."""
    from stages.train import DistEnv, Trainer, resolve_inputs

    shutil.rmtree(out_dir, ignore_errors=True)
    dist = DistEnv()
    inputs = resolve_inputs(run, cache=cache, source=cfg.targets.source, base=None,
                            view_policy=None, device=dist.device, out_dir=out_dir, dist=dist)
    trainer = Trainer(run, inputs, out_dir, dist, progress=False)
    samples, seconds, batches = 0, 0.0, 0
    for epoch in range(epochs + 1):
        trainer.sampler.set_position(epoch, 0)
        start = time.perf_counter()
        n = sum(len(batch) for batch in trainer.loader)
        if epoch > 0:
            seconds += time.perf_counter() - start
            samples += n
            batches += trainer.sampler.steps
    return {"workers": run.num_workers, "epochs_timed": epochs, "batches": batches,
            "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else float("nan")}


# --------------------------------------------------------------------------------- storage
def storage_sizes(cache: Path) -> dict:
    from storage import inspect_cache

    info = inspect_cache(cache)
    return {
        "codec": info["spec"].get("codec"),
        "codec_detail": info["codec"],
        "records": info["records"],
        "bytes_data": info["bytes_data"],
        "bytes_total": info["bytes_total"],
        "bytes_per_view": info["bytes_per_view"],
        "stored_tensor_bytes_per_view": info["raw_bytes_per_view"],
        "float32_bytes_per_view": info["float32_bytes_per_view"],
        "ratio_to_float32": info["bytes_per_view"] / info["float32_bytes_per_view"],
        "ratio_to_stored_tensors": info["bytes_per_view"] / info["raw_bytes_per_view"],
    }


def int8_error(fp16_cache: Path, int8_cache: Path, samples: int = 32) -> dict:
    """Relative RMS error of the int8 cache against the float16 cache (same views)."""
    from storage import open_cache

    a, b = open_cache(fp16_cache), open_cache(int8_cache)
    errors: dict[str, list[float]] = {"features": [], "attn_logits": []}
    worst: dict[str, float] = {"features": 0.0, "attn_logits": 0.0}
    for i in range(min(samples, a.num_samples)):
        j = b.index_of(a.keys[i])
        for v in range(a.views_per_sample):
            ra, rb = a.read(i, v), b.read(j, v)
            for name in errors:
                x, y = np.asarray(ra[name], np.float64), np.asarray(rb[name], np.float64)
                errors[name].append(float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))))
                worst[name] = max(worst[name], float(np.max(np.abs(x - y))))
    return {name: {"relative_rms": float(np.mean(v)), "max_abs": worst[name]}
            for name, v in errors.items()}


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIGS_DIR / "speed.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (as `tec run --set`)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test settings")
    parser.add_argument("--out", default=None, help="result file (default results/speed.json; "
                        "--quick: results/speed_quick.json)")
    parser.add_argument("--size-range", default="300,500", help="JPEG sides in px (min,max)")
    parser.add_argument("--baseline-images", type=int, default=96,
                        help="images whose K views form the forward-only baseline set")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="training steps of each segment left out of the steady state")
    parser.add_argument("--segments", type=int, default=2,
                        help="training segments per mode, run cached/online alternately")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    started = time.perf_counter()

    import yaml

    from pipeline.config import apply_overrides, parse_config

    raw = yaml.safe_load(Path(args.config).read_text())
    overrides = (QUICK_OVERRIDES if args.quick else []) + args.set
    raw = apply_overrides(raw, overrides)
    cfg = parse_config(raw, source_file=args.config)
    out_path = Path(args.out) if args.out else RESULTS_DIR / (
        "speed_quick.json" if args.quick else "speed.json")
    result = result_header("speed")
    workdir = REPO_ROOT / cfg.workdir if not Path(cfg.workdir).is_absolute() else Path(cfg.workdir)
    base_cfg = cfg.base_model
    if not Path(base_cfg.checkpoint).is_absolute():
        base_cfg.checkpoint = str(REPO_ROOT / base_cfg.checkpoint)
    if not Path(cfg.targets.source.path).is_absolute():
        cfg.targets.source.path = str(REPO_ROOT / cfg.targets.source.path)
    run = cfg.runs[0]

    lo, hi = (int(x) for x in args.size_range.split(","))
    num_images = cfg.data.num_samples or 384
    write_jpeg_shards(cfg.targets.source.path, num_images, (lo, hi))
    write_random_base(base_cfg)
    from stages.resolve import resolve_base

    base_geometry = resolve_base(base_cfg).geometry.as_dict()  # the model itself is not kept
    plan = actor_plan(cfg)
    log.info("stage-1 plan on this machine: %s", plan)
    policy = cfg.targets.view_policy
    baseline_views = render_pre_decoded(cfg.targets.source, policy, cfg.targets.views,
                                        min(args.baseline_images, num_images))
    fwd_kwargs = dict(batch_size=cfg.targets.batch_size, threads=plan["threads_per_actor"],
                      last_n=cfg.targets.last_n, k_max=cfg.targets.k_max)
    raw_out: dict = {"stage1_plan": plan, "load_average": {"start": load_average()}}

    log.info("forward-only baseline (before stage 1), %d threads", plan["threads_per_actor"])
    fwd_before = forward_only(base_cfg, baseline_views, **fwd_kwargs)
    log.info("  %s", {k: round(v, 2) for k, v in fwd_before.items() if isinstance(v, float)})

    import ray

    log.info("stage 1, Ray started by run_stage1 (cold)")
    s1_cold = run_stage1_timed(cfg, base_cfg, workdir / "cache-cold")
    log.info("  %.1f images/s wall (%.1f s)", s1_cold["images_per_s_wall"], s1_cold["wall_s"])
    start_local_ray(cfg.targets.ray.num_cpus)
    # the headline codec (targets.codec, float16 by default) twice: its steady parts give the
    # headline; in between int8 (and float16 when the headline is another codec), whose caches
    # give the storage ratios and int8's error against float16
    headline = cfg.targets.codec
    codecs = [headline, "int8", headline] if headline == "float16" else \
        [headline, "float16", "int8", headline]
    caches = {}
    s1_runs = []
    try:
        for i, codec in enumerate(codecs):
            log.info("stage 1, Ray already up (%s)", codec)
            path = workdir / f"cache-{codec}-{i}"
            caches.setdefault(codec, path)
            res = run_stage1_timed(cfg, base_cfg, path, codec=codec)
            log.info("  %.1f images/s wall, %.1f images/s over the parts",
                     res["images_per_s_wall"], res.get("images_per_s_parts", float("nan")))
            s1_runs.append(res)
    finally:
        ray.shutdown()
    s1_head = [s1_runs[0], s1_runs[-1]]  # the headline codec's two runs
    s1_int8 = s1_runs[codecs.index("int8")]
    s1_float16_extra = s1_runs[1] if headline != "float16" else None
    raw_out["load_average"]["after_stage1"] = load_average()

    log.info("profile: one shard serially in-process (decode / actor / write)")
    profile = stage1_profile(cfg, base_cfg, caches[headline], workdir / "cache-profile",
                             plan["threads_per_actor"])
    log.info("  ms per view: %s", {k: round(v, 1) for k, v in profile["ms_per_view"].items()})
    log.info("forward-only with a decoding process on the other core")
    fwd_contended = forward_with_decode(cfg, base_cfg, baseline_views, **fwd_kwargs)
    log.info("  %.1f views/s (decoder: %.1f images/s)", fwd_contended["forward_views_per_s"],
             fwd_contended["background_images_per_s"])
    log.info("forward-only baseline (after stage 1)")
    fwd_after = forward_only(base_cfg, baseline_views, **fwd_kwargs)
    log.info("  %s", {k: round(v, 2) for k, v in fwd_after.items() if isinstance(v, float)})
    # median over every pass before and after stage 1
    forward_vps = statistics.median(fwd_before["forward_passes_views_per_s"]
                                    + fwd_after["forward_passes_views_per_s"])
    targets_vps = statistics.median(fwd_before["targets_passes_views_per_s"]
                                    + fwd_after["targets_passes_views_per_s"])

    cache = str(caches[headline])  # stage 2 trains from the headline codec's cache
    online_run = copy.deepcopy(run)
    online_run.online_fraction = 1.0
    segments: dict[str, list[dict]] = {"cached": [], "online": []}
    for i in range(args.segments):  # cached, online, cached, online: a slow spell hits both
        for mode in ("cached", "online"):
            log.info("stage 2 %s (segment %d)", "from the cache" if mode == "cached" else
                     "fully online (online_fraction 1.0)", i + 1)
            res = train_timed(cfg, run if mode == "cached" else online_run,
                              cache=cache if mode == "cached" else None, base_cfg=base_cfg,
                              out_dir=workdir / f"train-{mode}-{i}", skip=args.warmup_steps)
            log.info("  %.2f samples/s (median step)", res["median_step_samples_per_s"])
            segments[mode].append(res)
    cached, online = (_pool(segments[m], args.warmup_steps, run.batch_size)
                      for m in ("cached", "online"))
    log.info("cache loader alone")
    loader = loader_only(cfg, run, cache=cache, out_dir=workdir / "loader-only",
                         epochs=run.epochs)
    log.info("  %.1f samples/s", loader["samples_per_s"])
    log.info("stage 2 on a resident batch (no loader): cached and online steps alternately")
    resident = resident_bound(cfg, run, online_run, cache=cache, base_cfg=base_cfg,
                              out_dir=workdir / "resident")
    log.info("  speedup %.3f (p90 steps)", resident["speedup_p90"])
    raw_out["load_average"]["end"] = load_average()

    sizes = {codec: storage_sizes(path) for codec, path in caches.items()}
    fp16, int8, head = sizes["float16"], sizes["int8"], sizes[headline]
    error = int8_error(caches["float16"], caches["int8"])

    def views_rate(res: dict) -> float:
        return res.get("views_per_s_parts", res["views_per_s_wall"])

    # Headline: best-of repeats on both sides (timeit's rule for a shared, noisy machine):
    # the best steady part of the two float16 runs / the best forward-only pass.
    forward_best = max(fwd_before["forward_best_views_per_s"],
                       fwd_after["forward_best_views_per_s"])
    s1_best = max(r.get("best_part_views_per_s", views_rate(r)) for r in s1_head)
    s1_views = statistics.fmean(views_rate(r) for r in s1_head)
    s1_steady = statistics.fmean(r.get("views_per_s_after_first_part", views_rate(r))
                                 for r in s1_head)
    s1_images = statistics.fmean(r.get("images_per_s_parts", r["images_per_s_wall"])
                                 for r in s1_head)
    s1_wall_views = statistics.fmean(r["views_per_s_wall"] for r in s1_head)
    from pipeline.plan import new_model_forward_flops, vit_forward_flops
    from stages.resolve import BaseGeometry, build_model_config

    g = base_geometry
    new_cfg = build_model_config(run.model, BaseGeometry(
        **{k: v for k, v in g.items() if k != "num_patches"}))
    step_flops = 3 * new_model_forward_flops(new_cfg)  # forward + backward
    base_flops = (vit_forward_flops(tokens=g["num_patches"] + 1, width=g["embed_dim"],
                                    depth=g["depth"])
                  + 2 * g["num_patches"] * 3 * g["patch_size"] ** 2 * g["embed_dim"])
    result.update({
        "device": result["device"],
        "gpu": result["machine"]["gpu"] or "not measured (no GPU on this machine)",
        "stage1_efficiency": s1_best / forward_best,
        "stage2_speedup": cached["samples_per_s_p90_step"] / online["samples_per_s_p90_step"],
        "loader_headroom": loader["samples_per_s"] / cached["samples_per_s_p90_step"],
        "estimator": ("best-of repeats (timeit's rule; other work on a shared machine only "
                      "slows a measurement down): stage 1 = best part after each run's first "
                      "/ best forward-only pass; stage 2 = p90 of the per-step rates of each "
                      "mode. The median-based ratios are under 'secondary'."),
        "headline_codec": headline,
        "bytes_per_view_ratio_fp16": fp16["ratio_to_float32"],
        "bytes_per_view_ratio_int8": int8["ratio_to_float32"],
        "goals": GOALS,
        "secondary": {
            "stage1_efficiency_median_based": s1_steady / forward_vps,
            "stage1_efficiency_all_parts_median_based": s1_views / forward_vps,
            "stage2_speedup_median_step": cached["samples_per_s"] / online["samples_per_s"],
            "loader_headroom_median_step": loader["samples_per_s"] / cached["samples_per_s"],
            "stage1_first_part_extra_s": [r.get("first_part_extra_s") for r in s1_head],
            "stage1_efficiency_each_fp16_run": [views_rate(r) / forward_vps for r in s1_head],
            "stage1_efficiency_incl_driver_setup": s1_wall_views / forward_vps,
            "stage1_efficiency_incl_ray_startup": s1_cold["views_per_s_wall"] / forward_vps,
            "stage1_efficiency_vs_forward_plus_targets": s1_views / targets_vps,
            "stage1_efficiency_int8": views_rate(s1_int8) / forward_vps,
            "stage1_efficiency_float16_once": (views_rate(s1_float16_extra) / forward_vps
                                               if s1_float16_extra else None),
            "bytes_per_view_ratio_headline": head["ratio_to_float32"],
            "targets_cost_vs_forward": forward_vps / targets_vps,
            "forward_with_decode_vs_forward_alone": (fwd_contended["forward_views_per_s"]
                                                     / forward_vps),
            "stage1_efficiency_vs_forward_with_decode": (
                s1_views / fwd_contended["forward_views_per_s"]),
            "profile_actor_share_serial": profile["share"]["actor"],
            "stage2_speedup_flops_bound": (step_flops + base_flops) / step_flops,
            # the same steps on a resident batch: this machine's arithmetic bound, and the
            # measured speedup's share of it (the input path's efficiency)
            "stage2_speedup_resident_bound": resident["speedup_p90"],
            "stage2_input_path_efficiency": (
                cached["samples_per_s_p90_step"] / online["samples_per_s_p90_step"]
                / resident["speedup_p90"]),
            "flops_per_sample": {"new_model_train_step": step_flops,
                                 "base_model_forward": base_flops},
            "stage2_speedup_whole_fit": cached["samples_per_s_fit"] / online["samples_per_s_fit"],
            "stage2_speedup_mean_step_time": (cached["samples_per_s_mean_step_time"]
                                              / online["samples_per_s_mean_step_time"]),
            "stage2_speedup_each_segment": [
                c["median_step_samples_per_s"] / o["median_step_samples_per_s"]
                for c, o in zip(segments["cached"], segments["online"])],
            "loader_headroom_in_run_estimate": (
                cached["loader_capacity_in_run"] / cached["samples_per_s"]
                if cached["loader_capacity_in_run"] else None),
            "bytes_per_view_ratio_fp16_vs_stored": fp16["ratio_to_stored_tensors"],
            "bytes_per_view_ratio_int8_vs_stored": int8["ratio_to_stored_tensors"],
            "int8_error": error,
        },
        "config": {
            "file": str(Path(args.config).resolve().relative_to(REPO_ROOT))
            if Path(args.config).resolve().is_relative_to(REPO_ROOT) else args.config,
            "overrides": overrides,
            "images": num_images,
            "image_size_range": [lo, hi],
            "base_model": {"arch": base_cfg.arch, **base_geometry},
            "targets": {k: getattr(cfg.targets, k) for k in
                        ("views", "batch_size", "max_in_flight", "codec", "backend", "k_max",
                         "last_n")},
            "new_model": new_cfg.to_dict(),
            "train": {"batch_size": run.batch_size, "epochs": run.epochs,
                      "segments_per_mode": args.segments, "num_workers": run.num_workers,
                      "warmup_steps_excluded": args.warmup_steps},
            "baseline_views": int(baseline_views.shape[0]),
            "torch_threads_main": __import__("torch").get_num_threads(),
        },
        "raw": {
            "stage1_images_per_s": s1_best / cfg.targets.views,
            "stage1_views_per_s": s1_best,
            "forward_only_views_per_s": forward_best,
            "stage1_images_per_s_median_based": s1_steady / cfg.targets.views,
            "stage1_images_per_s_all_parts": s1_images,
            "forward_only_views_per_s_median": forward_vps,
            "forward_plus_targets_views_per_s": targets_vps,
            "train_cached_samples_per_s": cached["samples_per_s_p90_step"],
            "train_online_samples_per_s": online["samples_per_s_p90_step"],
            "train_cached_samples_per_s_median": cached["samples_per_s"],
            "train_online_samples_per_s_median": online["samples_per_s"],
            "loader_samples_per_s": loader["samples_per_s"],
            "forward_only_before": fwd_before,
            "forward_only_after": fwd_after,
            "forward_only_with_decode": fwd_contended,
            "stage1_profile_serial": profile,
            "stage1_cold": s1_cold,
            "stage1_fp16_runs": s1_head,
            "stage1_int8": s1_int8,
            "train_cached": cached,
            "train_online": online,
            "train_segments": segments,
            "loader_only": loader,
            "resident_batch": resident,
            "storage_fp16": fp16,
            "storage_headline": head,
            "storage_int8": int8,
            **raw_out,
        },
    })
    result["runtime_s"] = time.perf_counter() - started
    write_result(result, out_path)
    _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    goals = result["goals"]
    rows = [
        ("stage-1 efficiency", result["stage1_efficiency"], f">= {goals['stage1_efficiency']}"),
        ("stage-2 speedup", result["stage2_speedup"], f">= {goals['stage2_speedup']}"),
        ("loader headroom", result["loader_headroom"], f">= {goals['loader_headroom']}"),
        ("bytes/view float16", result["bytes_per_view_ratio_fp16"], "report"),
        ("bytes/view int8", result["bytes_per_view_ratio_int8"], "report"),
    ]
    print(f"\nspeed on {result['device']} (GPU: {result['gpu']}), "
          f"{result['runtime_s'] / 60:.1f} min")
    for name, value, goal in rows:
        shown = "nan" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{value:.3f}"
        print(f"  {name:<20} {shown:>8}   goal {goal}")


if __name__ == "__main__":
    sys.exit(main())
