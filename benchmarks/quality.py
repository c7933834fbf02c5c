"""Quality benchmark: a miniature of the TEC paper's Tab. 4 / Tab. 6 on Fashion-MNIST.

    python benchmarks/quality.py              # full: 2 seeds, < 90 min on a 2-core CPU
    python benchmarks/quality.py --reduced    # 1 seed, 10k-image subset, < 15 min
    python benchmarks/quality.py --sweep      # choose blr / tau / k on a held-out split

Writes ``benchmarks/results/quality.json`` (``quality_reduced.json``, ``quality_sweep.json``).

Rows (``benchmarks/configs/quality.yaml``): the base model (pixel-target MAE, E_b epochs), TEC
from its cache (E_t epochs, K views), TEC fully online (``online_fraction: 1.0``, E_t epochs),
MAE for E_b + E_t epochs, and ablations from the same cache (no attention target, no adapters,
channel-dim normalisation), plus two references (raw pixels, the untrained encoder). Each seed
has its own base model, cache and runs (seed s of TEC learns from seed s of the base model).
``--config`` runs another config of the same schema (``benchmarks/configs/quality_long.yaml``,
``quality_strong_base.yaml``: investigations) and writes ``results/<config stem>.json``.

Everything is driven through the library: ``pipeline.config.parse_config`` and
``pipeline.orchestrate`` (prepare_data, ensure_base_checkpoint, train_run) and
``stages.stage1.run_stage1``; finished steps are reused, so an interrupted run resumes.

Metrics: k-NN and linear-probe top-1 (percent) on the 10k test set, on the cls token and on
mean-pooled patch tokens. For every model, k-NN's k and temperature, the probe's learning rate
and the read-out (cls or mean) of the headline numbers are chosen on a held-out part of the
training images (``stages.evaluate.split_holdout``), never on the test set. With a
``quality.finetune`` section, the rows it names are also fine-tuned end to end
(``stages.finetune``: the MAE/TEC recipe at a miniature budget) and get ``finetune_top1``.
Benchmarks report, they never assert.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

if "--progress" not in sys.argv:
    # the runs' progress bars would flood the log file; tqdm reads this when it is imported
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    mean_spread,
    result_header,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.quality")

MAIN_ROWS = ("base", "tec", "tec_online", "mae_long")
ROW_LABELS = {
    "pixels": "reference: raw pixels (784 grey values), no model",
    "random_init": "reference: the untrained encoder (the runs' initialisation), 0 epochs",
    "base": "base model: pixel MAE, E_b epochs",
    "tec": "TEC from its cache, E_t epochs",
    "tec_online": "TEC fully online (online_fraction 1.0), E_t epochs",
    "mae_long": "pixel MAE, E_b + E_t epochs",
    "tec_no_attention": "ablation: no attention target",
    "tec_no_adapters": "ablation: no input/encoder adapters",
    "tec_channel_norm": "ablation: channel-dim feature normalisation",
}


# ----------------------------------------------------------------------------- configuration
def load_raw(path: str, overrides: list[str]) -> tuple[dict, dict]:
    """(pipeline mapping, quality settings) after the --set overrides."""
    import yaml

    from pipeline.config import apply_overrides

    raw = yaml.safe_load(Path(path).read_text())
    raw = json.loads(json.dumps(raw))  # YAML anchors share dicts; overrides must not leak
    raw = apply_overrides(raw, overrides)
    quality = raw.pop("quality", {}) or {}
    return raw, quality


def seed_config(raw: dict, seed: int, *, with_ablations: bool,
                main_rows: tuple[str, ...] = MAIN_ROWS, cache_name: str = "cache"):
    """The pipeline config of one seed: its own workdir, bootstrap seed, run seeds. Seeds
    without ablations run only ``main_rows`` (``quality.main_rows`` of the config)."""
    from pipeline.config import parse_config

    raw = copy.deepcopy(raw)
    raw["workdir"] = str(Path(raw["workdir"]) / f"seed{seed}")
    raw.setdefault("targets", {})["cache"] = str(Path(raw["workdir"]) / cache_name)  # per seed
    raw["bootstrap"]["run"]["seed"] = seed
    runs = []
    for run in raw.get("runs") or []:
        if not with_ablations and run["name"] not in main_rows:
            continue
        runs.append({**run, "seed": seed})
    raw["runs"] = runs
    return parse_config(raw, source_file="benchmarks/configs/quality.yaml")


def codec_row_config(raw: dict, seed: int, name: str, targets: dict):
    """The pipeline config of a codec row (``quality.codec_rows.<name>``: targets settings) for
    one seed: the seed's own base model (the same bootstrap), a second stage-1 cache
    ``<workdir>/seed<s>/cache-<name>`` written with those targets settings, and one run named
    ``name`` with the ``tec`` run's settings. Only the cache's targets settings differ from the
    ``tec`` row, so the pair measures what the codec costs."""
    unknown = set(targets) - {"codec", "codec_params", "precision"}
    if unknown:
        raise ValueError(f"quality.codec_rows.{name}: only codec, codec_params and precision may "
                         f"differ from the tec row's cache, got {sorted(unknown)}")
    raw = copy.deepcopy(raw)
    raw["targets"] = {**raw["targets"], **copy.deepcopy(targets)}
    tec = next((r for r in raw["runs"] if r["name"] == "tec"), None)
    if tec is None:
        raise ValueError(f"quality.codec_rows.{name}: the config has no `tec` run to copy")
    raw["runs"] = [{**tec, "name": name}]
    return seed_config(raw, seed, with_ablations=True, main_rows=(name,),
                       cache_name=f"cache-{name}")


def codec_rows_seed(raw: dict, quality: dict, seed: int, *, steps: dict) -> dict:
    """Train every codec row of one seed (each with its own stage-1 cache); returns the models
    and run infos as run_seed does, the per-row steps prefixed with the row's name."""
    models, info = {}, {}
    for name, targets in (quality.get("codec_rows") or {}).items():
        row_steps: dict = {}
        trained = run_seed(codec_row_config(raw, seed, name, targets), steps=row_steps)
        models[name] = trained["models"][name]
        info[name] = trained["runs"][name]
        steps.update({k if k.startswith("train_") else f"{name}_{k}": v
                      for k, v in row_steps.items() if k != "bootstrap_s"})
    return {"models": models, "runs": info}


def row_labels(raw: dict, quality: dict) -> dict:
    """Every row's description: the built-in rows, the config's extra runs, the codec rows."""
    labels = dict(ROW_LABELS)
    for run in raw["runs"]:  # extra runs (an investigation config) become rows too
        labels.setdefault(run["name"], quality.get("descriptions", {}).get(run["name"],
                                                                         run["name"]))
    for name, targets in (quality.get("codec_rows") or {}).items():
        labels.setdefault(name, "TEC from a second cache of the same base model with targets "
                          + ", ".join(f"{k}={v}" for k, v in targets.items())
                          + " (the tec row's settings otherwise), E_t epochs")
    return labels


def derive_epochs(raw: dict, quality: dict | None = None) -> dict:
    """E_b, E_t, and runs.mae_long.epochs = E_b + E_t (the same epochs as base + TEC).

    E_b is the bootstrap's epochs, or ``quality.base_epochs`` for a given base checkpoint."""
    e_b = int((quality or {}).get("base_epochs") or raw["bootstrap"]["run"]["epochs"])
    tec = next((r for r in raw["runs"] if r["name"] == "tec"), None)
    e_t = int(tec["epochs"]) if tec is not None else None
    for run in raw["runs"]:
        if run["name"] == "mae_long" and e_t is not None:
            run["epochs"] = e_b + e_t
    return {"E_b": e_b, "E_t": e_t, "mae_long": e_b + e_t if e_t is not None else None,
            "runs": {r["name"]: int(r["epochs"]) for r in raw["runs"]}}


def absolute(path: str) -> str:
    return path if Path(path).is_absolute() else str(REPO_ROOT / path)


def make_paths_absolute(raw: dict, quality: dict) -> None:
    raw["workdir"] = absolute(raw["workdir"])
    if raw["base_model"].get("checkpoint"):
        raw["base_model"]["checkpoint"] = absolute(raw["base_model"]["checkpoint"])
    data = raw["data"]
    for key in ("train", "test", "prepare_dir"):
        if data.get(key):
            data[key] = absolute(data[key])
    quality["eval_train_shards"] = absolute(quality.get("eval_train_shards") or data["train"])


# ----------------------------------------------------------------------------- evaluation
class EvalData:
    """Decoded evaluation images (uint8 [N,3,S,S]) and labels, loaded once."""

    def __init__(self, quality: dict, test_shards: str | None, img_size: int):
        from stages.evaluate import load_eval_images

        start = time.perf_counter()
        self.train_x, self.train_y = load_eval_images(
            quality["eval_train_shards"], img_size, limit=int(quality["eval_train"]))
        self.test_x = self.test_y = None
        if test_shards is not None:  # None: held-out scores only (the sweep)
            self.test_x, self.test_y = load_eval_images(test_shards, img_size,
                                                        limit=int(quality["eval_test"]))
        self.seconds = time.perf_counter() - start
        log.info("eval images: %d train, %s test (%.0f s)", len(self.train_y),
                 len(self.test_y) if self.test_y is not None else "no", self.seconds)


def knn_grid(fit_x, fit_y, val_x, val_y, ks, temperatures, num_classes: int) -> dict:
    """Held-out k-NN top-1 for every (k, T): the neighbours are found once for the largest k.

    Same rule as stages.evaluate.knn_predict (cosine, exp(sim/T) weighted vote)."""
    fit = F.normalize(fit_x.float(), dim=1)
    kmax = min(max(ks), fit.shape[0])
    sims, labels = [], []
    for start in range(0, val_x.shape[0], 512):
        val = F.normalize(val_x[start:start + 512].float(), dim=1)
        top_sim, top_idx = (val @ fit.T).topk(kmax, dim=1)
        sims.append(top_sim)
        labels.append(fit_y[top_idx])
    sims, labels = torch.cat(sims), torch.cat(labels)
    scores = {}
    for k in ks:
        for t in temperatures:
            votes = torch.zeros(sims.shape[0], num_classes)
            weights = ((sims[:, :k] - sims[:, :1]) / t).exp()  # max-shifted: no overflow
            votes.scatter_add_(1, labels[:, :k], weights)
            scores[(k, t)] = 100.0 * (votes.argmax(1) == val_y).float().mean().item()
    return scores


def evaluate_export(path: Path, arch: str, data: EvalData, quality: dict, *,
                    test_set: bool = True) -> dict:
    """k-NN and linear probe, cls and mean; hyper-parameters and read-out chosen on held-out.

    test_set False (the sweep): held-out scores only, the test images are never touched."""
    from stages.evaluate import extract_features
    from tec.teacher import load_base_model

    start = time.perf_counter()
    model = load_base_model(arch, path)
    train = extract_features(model, data.train_x, data.train_y)
    test = extract_features(model, data.test_x, data.test_y) if test_set else None
    out = evaluate_features({r: train[r] for r in ("cls", "mean")},
                            {r: test[r] for r in ("cls", "mean")} if test_set else None,
                            data, quality)
    out["file"] = str(path)
    out["eval_seconds"] = time.perf_counter() - start
    if test_set:
        log.info("evaluated %s: knn %.2f (%s) linear %.2f (%s) in %.0f s",
                 _model_name(path), out["knn_top1"], out["knn_readout"],
                 out["linear_top1"], out["linear_readout"], out["eval_seconds"])
    return out


def _model_name(path: Path) -> str:
    """<seed>/runs/<run>/export/model.safetensors -> <run>; <seed>/<name>/model.safetensors ->
    <name> (bootstrap, random_init)."""
    return path.parent.parent.name if path.parent.name == "export" else path.parent.name


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel reference's features: the grey image (uint8 [N, 3, S, S], channels equal
    for Fashion-MNIST) flattened to [N, S*S] in [0, 1]."""
    return images.float().mean(dim=1).flatten(1) / 255.0


def evaluate_pixels(data: EvalData, quality: dict) -> dict:
    """k-NN and linear probe on raw pixels, chosen on held-out like the models' numbers."""
    start = time.perf_counter()
    out = evaluate_features({"pixels": pixel_features(data.train_x)},
                            {"pixels": pixel_features(data.test_x)}, data, quality)
    out["file"] = "raw pixels"
    out["eval_seconds"] = time.perf_counter() - start
    log.info("evaluated raw pixels: knn %.2f linear %.2f in %.0f s", out["knn_top1"],
             out["linear_top1"], out["eval_seconds"])
    return out


def evaluate_features(train: dict, test: dict | None, data: EvalData, quality: dict) -> dict:
    """The protocol on given features per read-out ({'cls': [N, D], 'mean': [N, D]} or any
    other names): per read-out k-NN (k, T) and probe lr chosen on the held-out split, then the
    headline read-out chosen on held-out; test numbers only when ``test`` is given."""
    from stages.evaluate import choose_lr, knn_classify, linear_probe, split_holdout

    test_set = test is not None
    fraction = float(quality["holdout_fraction"])
    fit_idx, val_idx = split_holdout(len(data.train_y), fraction, seed=0)
    num_classes = int(data.train_y.max()) + 1
    if test_set:
        num_classes = max(num_classes, int(data.test_y.max()) + 1)
    epochs = int(quality["linear_epochs"])
    out: dict = {"holdout": {}}
    for readout, feats in train.items():
        grid = knn_grid(feats[fit_idx], data.train_y[fit_idx], feats[val_idx],
                        data.train_y[val_idx], quality["knn_k"], quality["knn_temperature"],
                        num_classes)
        (k, t), knn_holdout = max(grid.items(), key=lambda kv: kv[1])  # ties: first listed
        lr, lr_scores = choose_lr(feats, data.train_y, quality["linear_lrs"], fraction=fraction,
                                  seed=0, epochs=epochs)
        if test_set:
            out[f"knn_{readout}"] = knn_classify(feats, data.train_y, test[readout],
                                                 data.test_y, k=k, temperature=t,
                                                 num_classes=num_classes)
            out[f"linear_{readout}"] = linear_probe(feats, data.train_y, test[readout],
                                                    data.test_y, epochs=epochs, lr=lr,
                                                    num_classes=num_classes)
        out["holdout"][readout] = {
            "knn_k": k, "knn_temperature": t, "knn_top1": knn_holdout,
            "knn_grid": {f"k={kk},T={tt}": v for (kk, tt), v in grid.items()},
            "linear_lr": lr, "linear_top1": lr_scores[lr],
            "linear_grid": {str(a): v for a, v in lr_scores.items()},
        }
    for metric in ("knn", "linear"):
        # the read-out of the headline number: the better one on held-out data
        chosen = max(train, key=lambda r: out["holdout"][r][f"{metric}_top1"])
        out[f"{metric}_readout"] = chosen
        if test_set:
            out[f"{metric}_top1"] = out[f"{metric}_{chosen}"]
    return out


def evaluate_cached(path: Path, arch: str, data_fn, quality: dict, *,
                    test_set: bool = True) -> dict:
    """evaluate_export, reusing <export>.quality.json written for the same file and settings."""
    from tec.teacher import file_sha256

    settings = {k: quality[k] for k in ("eval_train_shards", "eval_train", "eval_test",
                                         "holdout_fraction", "knn_k", "knn_temperature",
                                         "linear_lrs", "linear_epochs")}
    key = {"sha256": file_sha256(path), "settings": settings, "test_set": test_set,
           "eval_version": 2}  # 2: k-NN votes max-shifted (no float32 overflow at T = 0.01)
    memo = path.with_name(path.name + ".quality.json")
    if memo.is_file():
        saved = json.loads(memo.read_text())
        if saved.get("key") == key:
            return saved["result"]
    result = evaluate_export(path, arch, data_fn(), quality, test_set=test_set)
    memo.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def finetune_row(path: Path, row: str, arch: str, raw: dict, quality: dict, workdir: Path,
                 ) -> dict:
    """Full fine-tuning top-1 of one model (``quality.finetune``: FinetuneConfig settings).

    Trained on the first ``train_limit`` of ``eval_train_shards``, tested on the test shards;
    the run folder is named by the file's sha256 and the settings, so a rerun resumes or reuses
    it and a changed setting starts a new one."""
    import hashlib

    from stages.finetune import finetune, finetune_config
    from tec.teacher import file_sha256

    settings = {k: v for k, v in quality["finetune"].items() if k != "rows"}
    cfg = finetune_config(settings)
    tag = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(),
                          digest_size=4).hexdigest()
    out = workdir / "finetune" / f"{row}-{file_sha256(path)[:10]}-{tag}"
    result = finetune(cfg, model_path=path, train_shards=quality["eval_train_shards"],
                      test_shards=raw["data"]["test"], out_dir=out, arch=arch,
                      progress=False, name=row)
    log.info("fine-tuned %s: top-1 %.2f (%d steps, %.0f s this run)", row, result.top1,
             result.steps, result.seconds)
    return {"finetune_top1": result.top1, "finetune_dir": str(out),
            "finetune_steps": result.steps, "finetune_seconds": result.seconds}


# ----------------------------------------------------------------------------- one seed
def attention_target_entropy(cache_path, *, k: int, tau: float, samples: int = 500) -> dict:
    """How informative the cached attention target is: the mean entropy (nats) of
    softmax(logits / tau) over the L patch columns, for the cls row and the top-k rows, over the
    heads and every view of ``samples`` evenly spaced samples. A uniform map has entropy log L."""
    import math

    import numpy as np

    from storage.cache import open_cache

    reader = open_cache(cache_path)
    rows, cls_rows = [], []
    step = max(1, len(reader) // samples)
    for i in range(0, len(reader), step):
        for view in range(reader.views_per_sample):
            logits = torch.as_tensor(np.asarray(reader.read(i, view)["attn_logits"],
                                                dtype=np.float32))[:, :k + 1]  # [H, 1+k, L]
            p = torch.softmax(logits / tau, dim=-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [H, 1+k]
            cls_rows.append(entropy[:, 0].mean().item())
            rows.append(entropy.mean().item())
    reader.close()
    num_patches = int(logits.shape[-1])
    out = {"k": k, "tau": tau, "records": len(rows), "num_patches": num_patches,
           "uniform_entropy": math.log(num_patches), "entropy": float(np.mean(rows)),
           "cls_row_entropy": float(np.mean(cls_rows))}
    log.info("attention target (k=%d, tau=%g): entropy %.3f nats, cls row %.3f, uniform %.3f",
             k, tau, out["entropy"], out["cls_row_entropy"], out["uniform_entropy"])
    return out


def random_init_export(cfg) -> Path:
    """The encoder the bootstrap starts from (same seed, same initialisation), never trained:
    the reference that tells how much pretraining moved the features."""
    from pipeline.orchestrate import bootstrap_run_config, pipeline_view_policy
    from stages.resolve import BaseGeometry, build_model_config
    from tec.export import export_timm
    from tec.model import NewModel

    run = bootstrap_run_config(cfg)
    # the bootstrap's geometry: its img_size is the views' size (stages.train derives it so)
    model_cfg = build_model_config(
        run.model, BaseGeometry(img_size=pipeline_view_policy(cfg).output_size))
    path = Path(cfg.workdir) / "random_init" / "model.safetensors"
    if not path.is_file():
        torch.manual_seed(run.seed)  # what stages.train does before building the model
        export_timm(NewModel(model_cfg), path)
    return path


def run_seed(cfg, *, steps: dict, with_reference: bool = False) -> dict:
    """Bootstrap the base model, build the cache, train every run; returns model files and
    per-run training summaries (reused work shows as reused)."""
    from pipeline.orchestrate import (
        PipelineSummary,
        bootstrap_dir,
        ensure_base_checkpoint,
        find_export,
        train_run,
    )
    from stages.stage1 import run_stage1

    summary = PipelineSummary()
    t0 = time.perf_counter()
    base = ensure_base_checkpoint(cfg, summary=summary)
    steps["bootstrap_s"] = time.perf_counter() - t0
    models = {"base": Path(base.checkpoint)}
    info = {"base": _run_info(bootstrap_dir(cfg))}
    needs_cache = any(r.model.target == "tec" and r.online_fraction < 1.0 for r in cfg.runs)
    if any(r.model.target == "tec" for r in cfg.runs):  # described once: stage 1 and every run
        from stages.resolve import resolve_base

        base = resolve_base(base)
    if needs_cache:
        t0 = time.perf_counter()
        s1 = run_stage1(cfg.targets, base, progress=False)
        steps["stage1_s"] = time.perf_counter() - t0
        steps["stage1_images_rate"] = s1.images_per_s if s1.parts_done else None
        from storage import inspect_cache

        info = inspect_cache(cfg.cache_path)
        steps["cache"] = {k: info[k] for k in ("samples", "records", "bytes_total",
                                                "bytes_per_view", "raw_bytes_per_view",
                                                "float32_bytes_per_view")}
        mc = next((r.model for r in cfg.runs if r.model.target == "tec"), None)
        if mc is not None:  # the first TEC run's k and tau
            steps["attention_target"] = attention_target_entropy(cfg.cache_path, k=mc.k,
                                                                 tau=mc.tau)
    if with_reference:
        models["random_init"] = random_init_export(cfg)
    for run in cfg.runs:
        t0 = time.perf_counter()
        result = train_run(cfg, run, base)
        steps[f"train_{run.name}_s"] = time.perf_counter() - t0
        if result is not None and result.samples:
            log.info("run %s: %d steps, %.0f samples/s", run.name, result.steps,
                     result.samples_per_s)
        elif result is not None:
            log.info("run %s: reused (finished earlier, %d steps)", run.name, result.steps)
        models[run.name] = find_export(cfg.run_dir(run.name))
        info[run.name] = _run_info(cfg.run_dir(run.name))
    return {"models": models, "runs": info, "summary": summary.steps}


def _run_info(run_dir: Path) -> dict:
    """Samples/s and losses from the run's metrics.csv (present for fresh and reused runs)."""
    import csv

    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    rates = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    last = rows[-1]
    return {"steps": int(last["step"]), "final_loss": float(last["loss"]),
            "samples_per_s_mean_logged": sum(rates) / len(rates) if rates else None}


# ----------------------------------------------------------------------------- main modes
def lazy_eval_data(quality: dict, test_shards: str | None, img_size: int,
                   steps: dict | None = None):
    """A function that returns the evaluation images, loaded on its first call only (a fully
    reused run never loads them); with ``steps``, their load time as ``eval_images_s``."""
    cache: dict = {}

    def data_fn() -> EvalData:
        if "data" not in cache:
            cache["data"] = EvalData(quality, test_shards, img_size)
            if steps is not None:
                steps["eval_images_s"] = cache["data"].seconds
        return cache["data"]

    return data_fn


def run_benchmark(raw: dict, quality: dict, *, name: str) -> dict:
    from pipeline.orchestrate import prepare_data

    epochs = derive_epochs(raw, quality)
    seeds = [int(s) for s in quality["seeds"]]
    ablation_seeds = [int(s) for s in quality.get("ablation_seeds", [seeds[0]])]
    steps: dict = {}
    per_seed: dict = {}
    arch = raw["base_model"]["arch"]
    img_size = int(raw["base_model"]["timm_kwargs"]["img_size"])
    data_fn = lazy_eval_data(quality, raw["data"]["test"], img_size, steps)

    if not set(ablation_seeds) <= set(seeds):
        raise ValueError(f"quality.ablation_seeds {ablation_seeds} must be among quality.seeds "
                         f"{seeds}")
    for seed in seeds:
        cfg = seed_config(raw, seed, with_ablations=seed in ablation_seeds,
                          main_rows=tuple(quality.get("main_rows", MAIN_ROWS)))
        if not per_seed:
            t0 = time.perf_counter()
            steps["data"] = prepare_data(cfg)
            steps["data_s"] = time.perf_counter() - t0
        seed_steps: dict = {}
        references = bool(quality.get("references", True)) and seed in ablation_seeds
        trained = run_seed(cfg, steps=seed_steps, with_reference=references)
        extra = codec_rows_seed(raw, quality, seed, steps=seed_steps)
        trained["models"].update(extra["models"])
        trained["runs"].update(extra["runs"])
        evals = {}
        for row, path in trained["models"].items():
            t0 = time.perf_counter()
            evals[row] = evaluate_cached(path, arch, data_fn, quality)
            seed_steps[f"eval_{row}_s"] = time.perf_counter() - t0
        if references:
            t0 = time.perf_counter()
            evals["pixels"] = evaluate_pixels(data_fn(), quality)
            seed_steps["eval_pixels_s"] = time.perf_counter() - t0
        if quality.get("finetune"):
            for row in quality["finetune"].get("rows", [*MAIN_ROWS, "random_init"]):
                if row in trained["models"]:
                    t0 = time.perf_counter()
                    evals[row].update(finetune_row(trained["models"][row], row, arch, raw,
                                                   quality, Path(cfg.workdir)))
                    seed_steps[f"finetune_{row}_s"] = time.perf_counter() - t0
        per_seed[seed] = {"steps": seed_steps, "runs": trained["runs"], "eval": evals,
                          "pipeline": trained["summary"]}
    labels = row_labels(raw, quality)
    rows = [entry for row in labels
            if (entry := row_entry(row, labels[row], epochs, per_seed, quality)) is not None]
    return {"epochs": epochs, "rows": rows, "goals": goals(rows, per_seed),
            "per_seed": {str(s): v for s, v in per_seed.items()}, "steps": steps,
            "files": {row: [str(per_seed[s]["eval"][row]["file"]) for s in per_seed
                            if row in per_seed[s]["eval"]] for row in labels}}


def row_entry(row: str, label: str, epochs: dict, per_seed: dict, quality: dict) -> dict | None:
    """One row of the result: every metric's mean, spread and per-seed values over the seeds
    that evaluated it (None when none did)."""
    results = [(s, per_seed[s]["eval"][row]) for s in per_seed if row in per_seed[s]["eval"]]
    if not results:
        return None
    entry = {"name": row, "description": label, "epochs": _row_epochs(row, epochs),
             "seeds": [int(s) for s, _ in results]}
    codec = (quality.get("codec_rows") or {}).get(row)
    if codec is not None:  # what goals() pairs with the tec row
        entry["cache_targets"] = codec
    for metric in ("knn_top1", "linear_top1", "knn_cls", "knn_mean", "linear_cls",
                   "linear_mean", "finetune_top1"):
        if metric == "finetune_top1" and not any(r.get(metric) is not None for _, r in results):
            continue
        set_stats(entry, metric, [r[metric] for _, r in results if r.get(metric) is not None])
    entry["readouts"] = {"knn": [r["knn_readout"] for _, r in results],
                         "linear": [r["linear_readout"] for _, r in results]}
    entry["train"] = [per_seed[s]["runs"].get(row, {}) for s, _ in results]
    return entry


def set_stats(entry: dict, metric: str, values: list[float]) -> None:
    """A row's ``metric`` (mean over seeds), ``metric_std`` and ``metric_values``."""
    stats = mean_spread(values)
    entry[metric], entry[f"{metric}_std"] = stats["mean"], stats["std"]
    entry[f"{metric}_values"] = stats["values"]


def _row_epochs(row: str, epochs: dict) -> int | str:
    if row == "base":
        return epochs["E_b"]
    if row in ("random_init", "pixels"):
        return 0
    return epochs["runs"].get(row, epochs["E_t"])


def goals(rows: list[dict], per_seed: dict) -> dict:
    """The three goals, measured (means over seeds, and per seed where rows pair up)."""
    by = {r["name"]: r for r in rows}
    out = {}

    def diff(a: str, b: str, metric: str):
        if a in by and b in by and by[a].get(metric) is not None \
                and by[b].get(metric) is not None:
            paired = [per_seed[s]["eval"][a][metric] - per_seed[s]["eval"][b][metric]
                      for s in per_seed if per_seed[s]["eval"].get(a, {}).get(metric) is not None
                      and per_seed[s]["eval"].get(b, {}).get(metric) is not None]
            return round(by[a][metric] - by[b][metric], 6), [round(p, 6) for p in paired]
        return None, []

    for metric in ("knn_top1", "linear_top1"):
        d, paired = diff("tec", "base", metric)
        out[f"tec_minus_base_{metric}"] = {"mean": d, "per_seed": paired, "goal": ">= 1.0",
                                           "met": d is not None and d >= 1.0}
        d, paired = diff("tec", "mae_long", metric)
        out[f"tec_minus_mae_long_{metric}"] = {"mean": d, "per_seed": paired, "goal": "> 0",
                                               "met": d is not None and d > 0}
        d, paired = diff("tec", "tec_online", metric)
        out[f"tec_minus_online_{metric}"] = {"mean": d, "per_seed": paired,
                                             "goal": "abs(diff) <= 0.5",
                                             "met": d is not None and abs(d) <= 0.5}
        # investigation (quality_long.yaml): the new model given as many epochs as mae_long
        d, paired = diff("tec_long", "mae_long", metric)
        out[f"tec_long_minus_mae_long_{metric}"] = {"mean": d, "per_seed": paired, "goal": "> 0",
                                                    "met": d is not None and d > 0}
    # fine-tuning (quality.finetune): the paper's headline protocol
    if any(r.get("finetune_top1") is not None for r in rows):
        metric = "finetune_top1"
        d, paired = diff("tec", "base", metric)
        out[f"tec_minus_base_{metric}"] = {"mean": d, "per_seed": paired, "goal": ">= 0.5",
                                           "met": d is not None and d >= 0.5}
        d, paired = diff("tec", "mae_long", metric)
        out[f"tec_minus_mae_long_{metric}"] = {"mean": d, "per_seed": paired, "goal": ">= 0",
                                               "met": d is not None and d >= 0}
        tuned = [r for r in rows if r.get(metric) is not None]
        if "pixels" in by:
            reference = max(by["pixels"]["knn_top1"], by["pixels"]["linear_top1"])
            worst = min(tuned, key=lambda r: r[metric])
            out[f"lowest_{metric}_minus_pixels"] = {
                "mean": round(worst[metric] - reference, 6), "per_seed": [],
                "goal": "> 0 (every fine-tuned encoder above raw pixels)",
                "met": worst[metric] > reference, "row": worst["name"]}
    # codec rows (quality.codec_rows, issue #16): TEC from a compact cache within 0.3 point of
    # TEC from the float16 cache, on every measure both rows have
    for row in (r for r in rows if r.get("cache_targets") is not None):
        for metric in ("knn_top1", "linear_top1", "finetune_top1"):
            d, paired = diff(row["name"], "tec", metric)
            if d is not None:
                out[f"{row['name']}_minus_tec_{metric}"] = {
                    "mean": d, "per_seed": paired, "goal": ">= -0.3",
                    "met": d >= -0.3}
    # a config without one of the rows (an investigation) has no such goal
    return {name: g for name, g in out.items() if g["mean"] is not None}


def run_sweep(raw: dict, quality: dict) -> dict:
    """Held-out choice of the pretraining hyper-parameters (seed 0, the sweep's small setting).

    Stage A: base-model blr (pixel MAE) -> the best base by held-out k-NN (read-out chosen on
    held-out too). Stage B: TEC blr at the config's tau/k. Stage C: tau x k at the best blr.
    Scores are k-NN top-1 on the held-out split of the training images only.
    """
    from pipeline.orchestrate import prepare_data

    sweep = quality["sweep"]
    arch = raw["base_model"]["arch"]
    img_size = int(raw["base_model"]["timm_kwargs"]["img_size"])
    data_fn = lazy_eval_data(quality, None, img_size)

    def holdout_score(path: Path) -> dict:
        ev = evaluate_cached(path, arch, data_fn, quality, test_set=False)
        best = {m: max(ev["holdout"][r][f"{m}_top1"] for r in ("cls", "mean"))
                for m in ("knn", "linear")}
        return {"knn_holdout": best["knn"], "linear_holdout": best["linear"]}

    tec_run = next(r for r in raw["runs"] if r["name"] == "tec")
    stages: dict = {"A_base_blr": {}, "B_tec_blr": {}, "C_tau_k": {}}
    start = time.perf_counter()
    # A: base blr
    bases = {}
    for blr in sweep["base_blr"]:
        raw_a = copy.deepcopy(raw)
        raw_a["workdir"] = str(Path(raw["workdir"]) / f"base_blr{blr:g}")
        raw_a["bootstrap"]["run"]["blr"] = blr
        raw_a["runs"] = []
        cfg = seed_config(raw_a, 0, with_ablations=False)
        if not bases:
            prepare_data(cfg)
        trained = run_seed(cfg, steps={})
        bases[blr] = raw_a
        stages["A_base_blr"][f"{blr:g}"] = holdout_score(trained["models"]["base"])
    best_base = max(sweep["base_blr"], key=lambda b: stages["A_base_blr"][f"{b:g}"]["knn_holdout"])
    raw_b = bases[best_base]

    def tec_variant(**changes) -> dict:
        run = copy.deepcopy(tec_run)
        run["blr"] = changes.pop("blr", run["blr"])
        run["model"] = {**run["model"], **changes}
        # named by its values, so stage C reuses stage B's run with the same values
        name = f"tec_blr{run['blr']:g}_tau{run['model']['tau']:g}_k{run['model']['k']}"
        run["name"] = name
        raw_v = copy.deepcopy(raw_b)
        raw_v["runs"] = [run]
        cfg = seed_config(raw_v, 0, with_ablations=True)
        trained = run_seed(cfg, steps={})
        return holdout_score(trained["models"][name])

    for blr in sweep["tec_blr"]:
        stages["B_tec_blr"][f"{blr:g}"] = tec_variant(blr=blr)
    best_blr = max(sweep["tec_blr"], key=lambda b: stages["B_tec_blr"][f"{b:g}"]["knn_holdout"])
    for tau in sweep["tau"]:
        for k in sweep["k"]:
            stages["C_tau_k"][f"tau={tau:g},k={k}"] = tec_variant(blr=best_blr, tau=tau, k=k)
    best_tau_k = max(stages["C_tau_k"], key=lambda n: stages["C_tau_k"][n]["knn_holdout"])
    return {"stages": stages, "chosen": {"base_blr": best_base, "tec_blr": best_blr,
                                         "tau_k": best_tau_k},
            "selection_metric": "k-NN top-1 on the held-out split of the training images",
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIGS_DIR / "quality.yaml"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reduced", action="store_true", help="the < 15 min version")
    mode.add_argument("--sweep", action="store_true", help="held-out hyper-parameter sweep")
    mode.add_argument("--add-finetune", action="store_true",
                      help="fine-tune the models an existing result file (--out) evaluated and "
                      "add finetune_top1 to its rows (settings: the config's quality.finetune, "
                      "else quality.yaml's)")
    mode.add_argument("--add-rows", action="store_true",
                      help="train and evaluate the config's quality.codec_rows that an existing "
                      "result file (--out) lacks, for each of its seeds, and add them as rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (as `tec run --set`)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--progress", action="store_true", help="show the training bars")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    started = time.perf_counter()

    import yaml

    base_raw = yaml.safe_load(Path(args.config).read_text())
    q0 = base_raw.get("quality", {})
    stem = Path(args.config).stem  # results/<config stem>[_reduced|_sweep].json
    if args.reduced:
        overrides, name = list(q0.get("reduced", [])) + args.set, f"{stem}_reduced"
    elif args.sweep:
        overrides, name = list(q0.get("sweep", {}).get("overrides", [])) + args.set, \
            f"{stem}_sweep"
    else:
        overrides, name = list(args.set), stem
    raw, quality = load_raw(args.config, overrides)
    make_paths_absolute(raw, quality)
    result = result_header(name)
    config_record = {"file": str(Path(args.config)), "overrides": overrides,
                     "pipeline": copy.deepcopy(raw), "quality": quality}
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    if args.add_finetune:
        return add_finetune(out, raw, quality, config_record)
    if args.add_rows:
        return add_rows(out, raw, quality, config_record)
    if args.sweep:
        result.update(run_sweep(raw, quality))
    else:
        result.update(run_benchmark(raw, quality, name=name))
    result["config"] = config_record
    result["runtime_s"] = time.perf_counter() - started
    earlier = earlier_invocations(out, config_record)
    if earlier:
        result["earlier_invocations"] = earlier
    write_result(result, out)
    print_table(result)
    return 0


def add_finetune(out: Path, raw: dict, quality: dict, config_record: dict) -> int:
    """``--add-finetune``: fine-tune the models a finished result file evaluated (its per-seed
    ``eval.<row>.file``) and add ``finetune_top1`` (mean, spread, values) to its rows, then
    recompute its goals. For result files written before the fine-tuning protocol existed.

    The settings are the config's ``quality.finetune`` or, when it has none, quality.yaml's (the
    miniature budget every benchmark shares); its ``rows`` (default: every row with a model
    file) are fine-tuned. A model file modified after the result was written is not the model
    the result measured: that row is skipped and the reason logged and recorded.

    A file holds one fine-tuning protocol: when it has fine-tuning rows of other settings (a
    longer budget given with ``--set quality.finetune.epochs=...`` on a copy of the file), every
    earlier fine-tuning value is dropped first, so that no row keeps a number of the old budget
    beside the new ones; the replaced settings are recorded."""
    result, finished = _finished_result(out, config_record, "--add-finetune")
    settings_from = config_record["file"]
    ft = quality.get("finetune")
    if not ft:
        _, shared = load_raw(str(CONFIGS_DIR / "quality.yaml"), [])
        ft, settings_from = shared["finetune"], "benchmarks/configs/quality.yaml"
    settings = {k: v for k, v in ft.items() if k != "rows"}
    previous = _finetune_settings(result)
    replaced = None
    if previous is not None and previous != settings:
        replaced = previous
        log.warning("--add-finetune: %s has fine-tuning rows of other settings (%s); they are "
                    "dropped and replaced", out, json.dumps(previous, sort_keys=True))
        for per in result["per_seed"].values():
            for ev in per["eval"].values():
                for key in [k for k in ev if k.startswith("finetune_")]:
                    del ev[key]
        for entry in result["rows"]:
            for key in [k for k in entry if k.startswith("finetune_top1")]:
                del entry[key]
    # a row added later (--add-rows) was written by its addition, not by the first run
    ended = {row: datetime.fromisoformat(a["created"]).timestamp() + float(a["seconds"])
             for a in result.get("rows_added", []) for row in a["rows"]}
    arch = raw["base_model"]["arch"]
    wanted = ft.get("rows")
    started = time.perf_counter()
    skipped, done = {}, []
    for seed, per in result["per_seed"].items():
        for row, ev in per["eval"].items():
            path = ev.get("file")
            if not path or (wanted is not None and row not in wanted):
                continue
            if not Path(path).is_file():
                skipped[f"{row}/seed{seed}"] = f"{path} no longer exists"
            elif Path(path).stat().st_mtime > ended.get(row, finished):
                skipped[f"{row}/seed{seed}"] = (f"{path} was modified after the result was "
                                                "written: not the model it measured")
            else:
                ev.update(finetune_row(Path(path), row, arch, raw, {**quality, "finetune": ft},
                                       Path(raw["workdir"]) / f"seed{seed}"))
                done.append(f"{row}/seed{seed}")
                continue
            log.warning("--add-finetune: %s skipped: %s", f"{row}/seed{seed}",
                        skipped[f"{row}/seed{seed}"])
    for entry in result["rows"]:
        values = [result["per_seed"][str(s)]["eval"][entry["name"]].get("finetune_top1")
                  for s in entry.get("seeds", [])]
        values = [v for v in values if v is not None]
        if values:
            set_stats(entry, "finetune_top1", values)
    result["goals"] = goals(result["rows"], result["per_seed"])
    header = result_header(out.stem)
    result["finetune_added"] = {
        "created": header["created"], "git": header["git"], "command": header["command"],
        "machine": header["machine"], "settings_from": settings_from,
        "settings": settings, "fine_tuned": done,
        "skipped": skipped, "seconds": time.perf_counter() - started}
    if replaced is not None:
        result["finetune_added"]["replaced_settings"] = replaced
    # the original run's record (its load average at the end included) stays as it was
    _rewrite(result, out)
    return 0


def _finetune_settings(result: dict) -> dict | None:
    """The fine-tuning settings of a result file's finetune_top1 values (None: it has none)."""
    if not any(ev.get("finetune_top1") is not None for per in result["per_seed"].values()
               for ev in per["eval"].values()):
        return None
    if result.get("finetune_added"):
        return result["finetune_added"]["settings"]
    ft = result.get("config", {}).get("quality", {}).get("finetune") or {}
    return {k: v for k, v in ft.items() if k != "rows"}


def _finished_result(out: Path, config_record: dict, flag: str) -> tuple[dict, float]:
    """A finished result file of the same pipeline config, and the time its run ended (its
    models were all written by then)."""
    if not out.is_file():
        raise SystemExit(f"{flag}: no result file {out} (run the benchmark first)")
    result = json.loads(out.read_text())
    if result.get("config", {}).get("pipeline") != json.loads(json.dumps(
            config_record["pipeline"])):
        raise SystemExit(f"{flag}: {out} was written by another config than "
                         f"{config_record['file']} {config_record['overrides']}")
    return result, (datetime.fromisoformat(result["created"]).timestamp()
                    + float(result["runtime_s"]))


def _rewrite(result: dict, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    log.info("wrote %s", out)
    print_table(result)


def add_rows(out: Path, raw: dict, quality: dict, config_record: dict) -> int:
    """``--add-rows``: train, evaluate and (with ``quality.finetune``) fine-tune the config's
    ``quality.codec_rows`` that a finished result file lacks, for each of its seeds, and add
    them as rows; then recompute its goals. The rest of the file (its runs, timings and load
    record) stays as it was.

    A codec row trains from its seed's base model, so that model must be the one the result
    measured: a base model file modified after the result was written stops it, naming the file."""
    result, finished = _finished_result(out, config_record, "--add-rows")
    have = {r["name"] for r in result["rows"]}
    codec_rows = quality.get("codec_rows") or {}
    names = [n for n in codec_rows if n not in have]
    if not names:
        log.info("--add-rows: %s already has every codec row (%s)", out,
                 ", ".join(codec_rows) or "the config names none")
        return 0
    for seed, per in result["per_seed"].items():
        base = Path(per["eval"]["base"]["file"])
        if not base.is_file() or base.stat().st_mtime > finished:
            raise SystemExit(f"--add-rows: seed {seed}'s base model {base} is missing or was "
                             "retrained after the result was written; rerun the benchmark")
    arch = raw["base_model"]["arch"]
    data_fn = lazy_eval_data(quality, raw["data"]["test"],
                             int(raw["base_model"]["timm_kwargs"]["img_size"]))

    started = time.perf_counter()
    wanted = (quality.get("finetune") or {}).get("rows", [*MAIN_ROWS, "random_init"])
    only = {**quality, "codec_rows": {n: codec_rows[n] for n in names}}
    for seed, per in result["per_seed"].items():
        steps = per.setdefault("steps", {})
        extra = codec_rows_seed(raw, only, int(seed), steps=steps)
        for name, path in extra["models"].items():
            t0 = time.perf_counter()
            per["eval"][name] = evaluate_cached(path, arch, data_fn, quality)
            steps[f"eval_{name}_s"] = time.perf_counter() - t0
            if quality.get("finetune") and name in wanted:
                t0 = time.perf_counter()
                per["eval"][name].update(finetune_row(path, name, arch, raw, quality,
                                                      Path(raw["workdir"]) / f"seed{seed}"))
                steps[f"finetune_{name}_s"] = time.perf_counter() - t0
            per.setdefault("runs", {})[name] = extra["runs"][name]
    labels = row_labels(raw, quality)
    for name in names:
        result["rows"].append(row_entry(name, labels[name], result["epochs"], result["per_seed"],
                                        quality))
        result["files"][name] = [str(per["eval"][name]["file"])
                                 for per in result["per_seed"].values()]
    result["goals"] = goals(result["rows"], result["per_seed"])
    result["config"]["quality"] = config_record["quality"]  # the codec rows' settings
    header = result_header(out.stem)
    result.setdefault("rows_added", []).append({
        "created": header["created"], "git": header["git"], "command": header["command"],
        "machine": header["machine"], "rows": names,
        "seconds": time.perf_counter() - started})
    _rewrite(result, out)
    return 0


def earlier_invocations(out: Path, config_record: dict) -> list[dict]:
    """When ``out`` holds a result of the same config, the invocations that wrote it (and theirs):
    a rerun reuses their finished models, so their runtimes are part of the work behind the
    new file (an interrupted run resumed, or a rerun that only added a row)."""
    if not out.is_file():
        return []
    try:
        previous = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if previous.get("config") != json.loads(json.dumps(config_record)):
        return []
    mine = {k: previous.get(k) for k in ("created", "git", "command", "runtime_s")}
    mine["load_average"] = [previous.get("machine", {}).get("load_average_at_start"),
                            previous.get("machine", {}).get("load_average_at_end")]
    return list(previous.get("earlier_invocations", [])) + [mine]


def print_table(result: dict) -> None:
    print(f"\n{result['benchmark']} on {result['device']}, {result['runtime_s'] / 60:.1f} min")
    if "rows" in result:
        print(f"{'row':<18} {'epochs':>6} {'seeds':>5}  {'k-NN':>13}  {'linear':>13}")
        for r in result["rows"]:
            print(f"{r['name']:<18} {r['epochs']:>6} {len(r['seeds']):>5}  "
                  f"{r['knn_top1']:6.2f} ± {r['knn_top1_std']:4.2f}  "
                  f"{r['linear_top1']:6.2f} ± {r['linear_top1_std']:4.2f}"
                  + (f"  fine-tune {r['finetune_top1']:6.2f} ± {r['finetune_top1_std']:4.2f}"
                     if r.get("finetune_top1") is not None else ""))
        for name, g in result["goals"].items():
            print(f"  {name:<34} {g['mean']:+7.2f}  goal {g['goal']:<13} "
                  f"{'met' if g['met'] else 'not met'}")
    else:
        print(json.dumps({"chosen": result["chosen"], "stages": result["stages"]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
