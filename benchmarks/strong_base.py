"""The strong miniature base model (issue #14): train it (resumable), ship it, describe it.

    python benchmarks/strong_base.py                 # train/resume, then ship + measure
    python benchmarks/strong_base.py --no-train      # only ship + measure a finished export
    python benchmarks/strong_base.py --finetune      # also fine-tune both bases (slow on a CPU)

Today's quality-benchmark bases are 3 epochs of pixel MAE: their attention target is within
0.1 nats of uniform and their features barely above the random initialisation, so the paper's
regime (a well-trained base that TEC then surpasses) cannot show. This trains one base model
for ``bootstrap.run.epochs`` of ``benchmarks/configs/strong_base.yaml`` through the library
(``pipeline.orchestrate.run_pipeline(only={"data", "bootstrap"})``; checkpoints every 200 steps,
so an interrupted run continues where it stopped, across sessions), then:

* ships the export to ``benchmarks/strong_base/`` (``model.safetensors`` + ``model.json``, a
  few MB) with the training log (``train_metrics.csv``) and the config it came from, so the
  quality benchmark, the codec rows and the view study can start from it
  (``base_model.checkpoint: benchmarks/strong_base/model.safetensors``);
* measures it beside the 3-epoch base of the quality benchmark (``--compare``): the entropy of
  its attention target (softmax(logits / tau) over the L patches, cls + top-k rows, every head;
  uniform = log L) on the same images for both, and k-NN / linear-probe top-1 with
  hyper-parameters and read-out chosen on held-out training images
  (``benchmarks/quality.py``'s evaluation, its ``quality:`` settings); with ``--finetune``
  also full fine-tuning top-1 with the quality benchmark's ``quality.finetune`` settings (the
  same protocol as its fine-tuning rows; ``--finetune-set KEY=VALUE`` overrides one).

Writes ``benchmarks/results/strong_base.json``. Benchmarks report, they never assert.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

if "--progress" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    result_header,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.strong_base")

SHIP_DIR = REPO_ROOT / "benchmarks" / "strong_base"  # --ship-dir changes it
DEFAULT_COMPARE = "runs/bench/quality/seed0/bootstrap/export/model.safetensors"


def train(config: Path, overrides: list[str]):
    """Train or resume the bootstrap base model; returns (parsed config, export path)."""
    from pipeline.config import load_config
    from pipeline.orchestrate import bootstrap_dir, find_export, run_pipeline

    cfg = load_config(config, overrides)
    start = time.perf_counter()
    summary = run_pipeline(cfg, only={"data", "bootstrap"})
    log.info("bootstrap step done in %.0f s:\n%s", time.perf_counter() - start,
             summary.format() if hasattr(summary, "format") else summary)
    export = find_export(bootstrap_dir(cfg))
    if export is None:
        raise SystemExit(f"no export under {bootstrap_dir(cfg)}: the bootstrap did not finish")
    return cfg, export


def ship(cfg, export: Path, config: Path, ship_dir: Path = SHIP_DIR) -> dict:
    """Copy the export, its metadata, the training metrics and the config to ``ship_dir``."""
    from pipeline.orchestrate import bootstrap_dir

    ship_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(export.parent.iterdir()):
        if src.name.endswith(".quality.json") or src.name.endswith(".adapters.safetensors"):
            continue  # evaluation memos; a pixel-MAE base has no adapters worth shipping
        shutil.copy2(src, ship_dir / src.name)
        copied.append(src.name)
    metrics = bootstrap_dir(cfg) / "logs" / "metrics.csv"
    if metrics.is_file():
        shutil.copy2(metrics, ship_dir / "train_metrics.csv")
        copied.append("train_metrics.csv")
    shutil.copy2(config, ship_dir / "config.yaml")
    copied.append("config.yaml")
    run_json = bootstrap_dir(cfg) / "run.json"
    info = json.loads(run_json.read_text()) if run_json.is_file() else {}
    log.info("shipped %s to %s", ", ".join(copied), ship_dir)
    where = ship_dir.relative_to(REPO_ROOT) if ship_dir.is_relative_to(REPO_ROOT) else ship_dir
    return {"dir": str(where), "files": copied,
            "bytes": sum((ship_dir / n).stat().st_size for n in copied), "run": info}


def attention_entropy(path: Path, images: torch.Tensor, *, k: int, tau: float, last_n: int,
                      k_max: int) -> dict:
    """Mean entropy (nats) of the attention target softmax(logits / tau) over the L patch
    columns: all rows (cls + top-k) and the cls row alone, every head, on ``images`` (uint8)."""
    from tec.targets import extract_targets, normalize_images
    from tec.teacher import load_base_model

    model = load_base_model("vit_tiny_patch16_224", path)
    rows, cls_rows = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], 256):
            x = normalize_images(images[start:start + 256])
            t = extract_targets(model, x, last_n=last_n, k_max=k_max)
            p = torch.softmax(t.attn_logits[:, :, :k + 1].float() / tau, dim=-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [B, H, 1 + k]
            rows.append(entropy.mean(dim=(1, 2)))
            cls_rows.append(entropy[:, :, 0].mean(dim=1))
    num_patches = int(t.attn_logits.shape[-1])
    out = {"k": k, "tau": tau, "images": int(images.shape[0]), "num_patches": num_patches,
           "uniform_entropy": math.log(num_patches),
           "entropy": float(torch.cat(rows).mean()),
           "cls_row_entropy": float(torch.cat(cls_rows).mean())}
    log.info("%s: attention target entropy %.3f nats (cls row %.3f) of a uniform %.3f",
             path, out["entropy"], out["cls_row_entropy"], out["uniform_entropy"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIGS_DIR / "strong_base.yaml"))
    parser.add_argument("--quality-config", default=str(CONFIGS_DIR / "quality.yaml"),
                        help="where the evaluation settings (its quality: section) come from")
    parser.add_argument("--compare", default=DEFAULT_COMPARE,
                        help="the short base to measure beside it (quality benchmark, seed 0)")
    parser.add_argument("--no-train", action="store_true",
                        help="do not train; the bootstrap must have finished")
    parser.add_argument("--finetune", action="store_true", help="fine-tune both bases too")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of quality.finetune's settings")
    parser.add_argument("--entropy-images", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS_DIR / "strong_base.json"))
    parser.add_argument("--ship-dir", default=str(SHIP_DIR))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    started = time.perf_counter()

    import yaml
    from quality import (
        evaluate_cached,
        finetune_row,
        lazy_eval_data,
        load_raw,
        make_paths_absolute,
    )

    config = Path(args.config)
    if args.no_train:
        from pipeline.config import load_config
        from pipeline.orchestrate import bootstrap_dir, find_export

        cfg = load_config(config, args.set)
        export = find_export(bootstrap_dir(cfg))
        if export is None:
            raise SystemExit(f"--no-train: no finished export under {bootstrap_dir(cfg)}")
    else:
        cfg, export = train(config, args.set)
    shipped = ship(cfg, export, config, Path(args.ship_dir))
    strong = export  # evaluated where it was trained (the shipped copy has the same sha256)

    raw_q, quality = load_raw(args.quality_config, [])
    make_paths_absolute(raw_q, quality)
    settings = dict(quality.get("finetune") or {})
    for item in args.finetune_set:
        key, _, text = item.partition("=")
        settings[key.strip()] = yaml.safe_load(text)
    img_size = int(raw_q["base_model"]["timm_kwargs"]["img_size"])
    tec_run = next(r for r in raw_q["runs"] if r["name"] == "tec")
    k, tau = int(tec_run["model"]["k"]), float(tec_run["model"]["tau"])
    targets = raw_q["targets"]
    data_fn = lazy_eval_data(quality, raw_q["data"]["test"], img_size)

    compare = Path(args.compare)
    if not compare.is_absolute():
        compare = REPO_ROOT / compare
    models = {"strong": strong}
    if compare.is_file():
        models = {"short": compare, **models}
    else:
        log.warning("--compare %s does not exist: measuring the strong base alone", compare)
    epochs = {"short": int(raw_q["bootstrap"]["run"]["epochs"]),
              "strong": int(cfg.bootstrap.run.epochs)}
    rows = []
    for name, path in models.items():
        row = {"name": name, "epochs": epochs[name], "file": str(path)}
        images = data_fn().train_x[:args.entropy_images]
        row["attention_target"] = attention_entropy(
            path, images, k=k, tau=tau, last_n=int(targets["last_n"]),
            k_max=int(targets["k_max"]))
        row.update({m: v for m, v in evaluate_cached(path, "vit_tiny_patch16_224", data_fn,
                                                     quality).items()
                    if m in ("knn_top1", "linear_top1", "knn_cls", "knn_mean", "linear_cls",
                             "linear_mean", "knn_readout", "linear_readout")})
        if args.finetune:
            row.update(finetune_row(path, name, "vit_tiny_patch16_224", raw_q,
                                    {**quality, "finetune": settings}, Path(cfg.workdir)))
        rows.append(row)
        log.info("%s (%d epochs): k-NN %.2f, linear %.2f, attention entropy %.3f / %.3f",
                 name, row["epochs"], row["knn_top1"], row["linear_top1"],
                 row["attention_target"]["entropy"],
                 row["attention_target"]["uniform_entropy"])

    result = result_header("strong_base")
    result.update({"rows": rows, "shipped": shipped,
                   "config": {"file": str(config), "overrides": args.set,
                              "quality_config": args.quality_config,
                              "finetune": settings if args.finetune else None,
                              "evaluation": quality},
                   "runtime_s": time.perf_counter() - started})
    write_result(result, args.out)
    for row in rows:
        print(f"{row['name']:>7} {row['epochs']:>3} ep  k-NN {row['knn_top1']:6.2f}  "
              f"linear {row['linear_top1']:6.2f}  attention entropy "
              f"{row['attention_target']['entropy']:.3f} of "
              f"{row['attention_target']['uniform_entropy']:.3f}"
              + (f"  fine-tune {row['finetune_top1']:.2f}" if "finetune_top1" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
