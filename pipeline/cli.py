"""The ``tec`` command: a thin click layer over the library.

Every command that reads a pipeline file takes ``--set KEY=VALUE`` overrides. User errors (bad
config, missing files, refused caches) print one line ``error: ...`` and exit with code 2; no
traceback unless ``TEC_DEBUG=1``.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from stages.configs import EvalConfig

log = logging.getLogger("tec")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(fn):
    """Turn expected user errors into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("TEC_DEBUG"):
                raise
            from storage.util import first_line  # here: `tec --help` stays free of numpy

            click.echo(f"error: {first_line(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: committed work is kept; rerun the same command to resume",
                       err=True)
            sys.exit(130)

    return wrapper


config_arg = click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a config value, e.g. --set targets.views=4 "
                            "--set runs.tec.epochs=2 (repeatable).")
pickle_opt = click.option("--allow-pickle", is_flag=True,
                          help="Let base-model checkpoints that hold pickled Python objects load "
                               "(runs code from the file: only for files you trust).")


timm_kwargs_opt = click.option(
    "--timm-kwargs", "timm_kwargs", default=None, metavar="MAPPING",
    help="Geometry of a plain checkpoint as a YAML/JSON mapping, e.g. "
         "'{img_size: 28, patch_size: 4, embed_dim: 96, depth: 6, num_heads: 3}' "
         "(our exports carry their own).")


def _parse_timm_kwargs(text: str | None) -> dict | None:
    """--timm-kwargs: a mapping of timm.create_model keyword arguments, or a one-line error."""
    if text is None:
        return None
    import yaml

    from stages.configs import ConfigError
    from storage.util import first_line

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--timm-kwargs: not YAML/JSON ({first_line(exc)})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"--timm-kwargs: expected a mapping like '{{img_size: 28, patch_size: "
                          f"4}}', got {text!r}")
    return value


def _load(config: Path, overrides, allow_pickle: bool = False):
    from pipeline.config import load_config

    if allow_pickle:
        overrides = (*overrides, "base_model.allow_pickle=true")
    cfg = load_config(config, overrides)
    from storage.objstore import configure

    configure(cfg.targets.storage_options)  # object-store URLs of this run (cache, shards)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="tec-pipeline")
def main(verbose: bool) -> None:
    """TEC pretraining as a two-stage target-caching pipeline.

    Stage 1 (`tec targets`) runs a frozen base model once over K views of every image and writes
    a target cache; stage 2 (`tec train`) trains any number of new models from that cache.
    `tec run` does everything in a pipeline file: data, stage 1, every run, evaluation.
    """
    _setup_logging(verbose)


# --------------------------------------------------------------------------- pipeline
@main.command()
@config_arg
@set_opt
@click.option("--ray-address", default=None, help="Join this Ray cluster for stage 1 "
              "(default: $RAY_ADDRESS, else a local Ray instance).")
@click.option("--only", type=click.Choice(["data", "bootstrap", "targets", "train", "eval"]),
              multiple=True, help="Run only these steps (repeatable).")
@pickle_opt
@user_errors
def run(config, overrides, ray_address, only, allow_pickle):
    """Run the whole pipeline: data, base model, stage 1 (resumed), every run, evaluation.

    A second `tec run` reuses the cache and finished runs; the summary says what was reused.
    """
    from pipeline.orchestrate import run_pipeline

    cfg = _load(config, overrides, allow_pickle)
    summary = run_pipeline(cfg, ray_address=ray_address, only=set(only) or None)
    click.echo(summary.format())


@main.command()
@config_arg
@set_opt
@click.option("--speed-results", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/results/speed.json"), show_default=True,
              help="benchmarks/speed.py's results: measured throughput is added when they are "
                   "of the same architecture (a missing file adds nothing).")
@user_errors
def plan(config, overrides, speed_results):
    """Estimate samples, cache size and compute of both stages before renting a cluster."""
    from pipeline.plan import make_plan

    cfg = _load(config, overrides)
    click.echo(make_plan(cfg, speed_results).format())


@main.command()
@config_arg
@set_opt
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local one).")
@click.option("--strict", is_flag=True, default=None,
              help="Exit non-zero if any sample was skipped as bad (after finishing the cache).")
@pickle_opt
@user_errors
def targets(config, overrides, ray_address, strict, allow_pickle):
    """Stage 1: compute base-model targets for K views of every image into the cache.

    Resumable: committed parts are skipped on a rerun.
    """
    from pipeline.orchestrate import ensure_base_checkpoint
    from stages.stage1 import Stage1StrictError, check_storage, run_stage1

    cfg = _load(config, overrides, allow_pickle)
    check_storage(cfg.targets)  # an unusable object-store URL: one line before model work
    base = ensure_base_checkpoint(cfg, allow_bootstrap=False)
    try:
        summary = run_stage1(cfg.targets, base, ray_address=ray_address, strict=strict)
    except Stage1StrictError as exc:  # the summary goes to stdout as on success, then the error
        if exc.summary is not None:
            click.echo(exc.summary.format())
        raise
    click.echo(summary.format())


@main.command()
@config_arg
@click.argument("run_arg", metavar="RUN", required=False)
@set_opt
@click.option("--run", "run_opt", default=None, hidden=True,
              help="Same as RUN (kept for old scripts; torchrun claims --run, so use RUN).")
@click.option("--nproc-per-node", "nproc", type=click.IntRange(min=1), default=None,
              help="Launch N ranks on this machine (torchrun --standalone) and train with DDP.")
@pickle_opt
@user_errors
def train(config, run_arg, overrides, run_opt, nproc, allow_pickle):
    """Stage 2: train the run RUN of the config from the cache (resumes from its last checkpoint).

    One process: `tec train CONFIG RUN`. All GPUs of one machine: `tec train CONFIG RUN
    --nproc-per-node 8`, or under torchrun: `torchrun --nproc-per-node 8 -m pipeline.cli train
    CONFIG RUN` (multi-node: add torchrun's --nnodes/--node-rank/--rdzv-endpoint). Only rank 0
    prints the summary.
    """
    from pipeline.orchestrate import train_run
    from stages.configs import ConfigError

    run_name = _run_name(run_arg, run_opt)
    if nproc is not None:
        sys.exit(_launch_ranks(nproc, config, run_name, overrides, allow_pickle))
    cfg = _load(config, overrides, allow_pickle)
    if run_name is None:
        raise ConfigError(f"tec train: name the run to train (one of: "
                          f"{', '.join(r.name for r in cfg.runs)}), e.g. tec train CONFIG "
                          f"{cfg.runs[0].name if cfg.runs else 'NAME'}")
    summary = train_run(cfg, cfg.run_named(run_name))
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary.format())


def _run_name(run_arg: str | None, run_opt: str | None) -> str | None:
    from stages.configs import ConfigError

    if run_arg is not None and run_opt is not None and run_arg != run_opt:
        raise ConfigError(f"tec train: the run is named twice ({run_arg!r} and --run {run_opt!r})")
    return run_arg if run_arg is not None else run_opt


def _launch_ranks(nproc: int, config: Path, run_name: str | None, overrides, allow_pickle) -> int:
    """``tec train ... --nproc-per-node N``: start N ranks of this command under torchrun."""
    import subprocess

    from stages.configs import ConfigError

    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("tec train: --nproc-per-node given inside torchrun; drop one of them")
    if run_name is None:
        raise ConfigError("tec train: name the run to train, e.g. tec train CONFIG tec "
                          "--nproc-per-node 2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "pipeline.cli", "train", str(config), run_name]
    for item in overrides:
        cmd.append(f"--set={item}")
    if allow_pickle:
        cmd.append("--allow-pickle")
    log.info("launching %d ranks: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd).returncode


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output .safetensors file, or a folder: timm's pretrained layout "
                   "(timm.create_model('local-dir:FOLDER', pretrained=True)).")
@click.option("--keep-adapters", is_flag=True,
              help="Keep the input and encoder adapters (for parameter-efficient fine-tuning).")
@click.option("--push-to-hub", "repo_id", default=None, metavar="OWNER/NAME",
              help="Upload the --out folder to this Hugging Face Hub repo (token: HF_TOKEN or "
                   "`hf auth login`); then "
                   "timm.create_model('hf-hub:OWNER/NAME', pretrained=True).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@user_errors
def export(checkpoint, out, keep_adapters, repo_id, private):
    """Export a training checkpoint as a timm-loadable .safetensors file or pretrained folder."""
    from stages.train import export_checkpoint

    if repo_id is not None:
        from stages.hub import check_push_ready

        if out.suffix == ".safetensors":
            raise ValueError(f"--push-to-hub uploads a folder: give --out FOLDER, not {out}")
        token = check_push_ready(repo_id)  # before any export work
    path = export_checkpoint(checkpoint, out, keep_adapters=keep_adapters, name=repo_id)
    click.echo(f"wrote {path}")
    if repo_id is not None:
        from stages.hub import push_folder

        url = push_folder(path, repo_id, token=token, private=private)
        click.echo(f"pushed to {repo_id}: {url}")


# --------------------------------------------------------------------------- cache
@main.group()
def cache():
    """Inspect and verify target caches."""


@cache.command("inspect")
@click.argument("path")
@user_errors
def cache_inspect(path):
    """Print the manifest summary, record count, bytes per view, size and completeness.
    PATH: a folder or an fsspec URL (s3://bucket/cache; credentials from the environment)."""
    from storage import format_inspect, inspect_cache
    from storage.objstore import check_location

    check_location(path, what="cache")

    click.echo(format_inspect(inspect_cache(path)))


@cache.command("verify")
@click.argument("path")
@click.option("--deep", is_flag=True,
              help="Also decode every record and check every value is finite (reads it all).")
@user_errors
def cache_verify(path, deep):
    """Re-read every part and recompute its checksums; exit 1 naming each bad part."""
    from storage import verify_cache
    from storage.objstore import as_root, check_location

    check_location(path, what="cache")
    if not as_root(path).exists():
        raise FileNotFoundError(f"no target cache at {path} (the path does not exist)")
    problems = verify_cache(path, deep=deep)
    if problems:
        for line in problems:
            click.echo(f"BAD {line}", err=True)
        click.echo(f"{len(problems)} problem(s) in {path}; `tec cache repair {path}` recomputes "
                   "the damaged parts", err=True)
        sys.exit(1)
    click.echo(f"ok: every part of {path} matches its checksums"
               + (" and every record decodes to finite values" if deep else ""))


@cache.command("repair")
@click.argument("path")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline file whose targets/base_model to use (default: the settings the "
                   "cache recorded when it was built).")
@set_opt
@click.option("--ray-address", default=None, help="Join this Ray cluster for the recomputation.")
@pickle_opt
@user_errors
def cache_repair(path, config, overrides, ray_address, allow_pickle):
    """Recompute exactly the parts `tec cache verify --deep` finds damaged."""
    from stages.repair import repair_cache

    cfg = _load(config, overrides, allow_pickle) if config is not None else None
    click.echo(repair_cache(path, config=cfg, ray_address=ray_address).format())


@cache.command("extend")
@click.argument("path")
@click.option("--views", "views", default=None, type=int,
              help="The new number of views K2 (> the cache's K): views K..K2-1 are computed.")
@click.option("--shards", "shards", default=None, metavar="MORE",
              help="New source shards (a path, glob, brace list, folder or URL, as data.train): "
                   "one part each is computed and added.")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline file whose targets/base_model to use (default: the settings the "
                   "cache recorded when it was built).")
@set_opt
@click.option("--ray-address", default=None, help="Join this Ray cluster to compute the views.")
@pickle_opt
@user_errors
def cache_extend(path, views, shards, config, overrides, ray_address, allow_pickle):
    """Grow a cache to K2 views, or by new source shards, without touching its parts
    (resumable)."""
    from stages.extend import extend_shards, extend_views

    if (views is None) == (shards is None):
        raise click.UsageError("give either --views K2 or --shards MORE")
    cfg = _load(config, overrides, allow_pickle) if config is not None else None
    if shards is not None:
        click.echo(extend_shards(path, shards, config=cfg, ray_address=ray_address).format())
        return
    click.echo(extend_views(path, views, config=cfg, ray_address=ray_address).format())


@cache.command("subset")
@click.argument("src", metavar="CACHE")
@click.argument("dst", metavar="OUT")
@click.option("--views", "views", required=True, type=int,
              help="Keep the first K' views of every sample (1 <= K' <= the cache's K).")
@user_errors
def cache_subset(src, dst, views):
    """A smaller copy of CACHE in OUT with the first K' views, bit for bit (resumable)."""
    from storage.subset import subset_cache

    out = subset_cache(src, dst, views=views)
    step = out["manifest"]["subset"][-1]
    click.echo(f"subset {src} -> {dst} ({step['views']} of {step['source_views']} views): "
               f"{out['parts_written']} parts written, {out['parts_skipped']} already there")


@cache.command("transcode")
@click.argument("src")
@click.argument("dst")
@click.option("--codec", required=True, help="float16, int8 or lowrank.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A codec parameter (lowrank: feature_bits, rank, factor_bits, attn_bits, "
                   "attn_floor, rounding), e.g. --param feature_bits=1.2 (repeatable).")
@click.option("--backend", default=None, type=click.Choice(["zarr", "webdataset"]),
              help="Backend of DST (default: SRC's).")
@user_errors
def cache_transcode(src, dst, codec, params, backend):
    """Re-encode cache SRC into DST with another codec, without the base model (resumable)."""
    import yaml

    from storage.transcode import transcode_cache

    codec_params = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE, e.g. feature_bits=1.2")
        codec_params[key.strip()] = yaml.safe_load(value)
    out = transcode_cache(src, dst, codec=codec, codec_params=codec_params, backend=backend)
    err = out["manifest"]["transcode"][-1].get("error_vs_source") or {}
    click.echo(f"transcoded {src} -> {dst} ({codec}): {out['parts_written']} parts written, "
               f"{out['parts_skipped']} already there; feature rel. RMS vs source "
               f"{err.get('feature_rel_rms', float('nan')):.4f}")
    if out["warning"]:
        click.echo(f"warning: {out['warning']}", err=True)


# --------------------------------------------------------------------------- data
@main.group()
def data():
    """Prepare datasets as WebDataset shards."""


@data.command("fashion-mnist")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for train-*.tar and test-*.tar.")
@click.option("--idx-dir", default="/usr/share/datasets/fashion-mnist", show_default=True,
              type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--shard-size", default=10000, show_default=True, help="Samples per shard.")
@click.option("--limit", default=None, type=int, help="Use only the first N training images.")
@user_errors
def data_fashion_mnist(out, idx_dir, shard_size, limit):
    """Convert the Fashion-MNIST IDX files to WebDataset shards with .png and .cls."""
    from stages.datasets import fashion_mnist_to_shards

    result = fashion_mnist_to_shards(idx_dir, out, shard_size=shard_size, limit=limit)
    for line in (result if isinstance(result, (list, tuple)) else [result]):
        click.echo(str(line))


# --------------------------------------------------------------------------- eval
@main.group("eval")
def eval_group():
    """Evaluate frozen features: k-NN and linear probe (cls token and mean-pooled patches)."""


def _eval_options(fn):
    fn = click.option("--train", "train_shards", required=True,
                      help="Training shards (pattern) for the probe / k-NN memory.")(fn)
    fn = click.option("--test", "test_shards", required=True, help="Test shards (pattern).")(fn)
    fn = click.option("--arch", default=None, help="timm arch for a plain checkpoint "
                      "(our exports carry their own).")(fn)
    fn = timm_kwargs_opt(fn)
    fn = click.option("--train-limit", type=int, default=None, help="Use N training images.")(fn)
    fn = click.option("--test-limit", type=int, default=None, help="Use N test images.")(fn)
    fn = click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))(fn)
    fn = pickle_opt(fn)
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(fn)


def _run_eval(metric: str, model, train_shards, test_shards, arch, timm_kwargs, train_limit,
              test_limit, device, allow_pickle, **settings):
    """The body of ``tec eval knn`` / ``tec eval linear``: one metric of one model file, printed
    as a table; ``settings``: that metric's EvalConfig fields."""
    from pipeline.orchestrate import evaluate_file

    cfg = EvalConfig(train_limit=train_limit, test_limit=test_limit, device=device, **settings)
    click.echo(evaluate_file(model, train_shards, test_shards, cfg, metrics=(metric,), arch=arch,
                             timm_kwargs=_parse_timm_kwargs(timm_kwargs),
                             allow_pickle=allow_pickle))


@eval_group.command("knn")
@_eval_options
@click.option("-k", "knn_k", default=EvalConfig.knn_k, show_default=True, help="Neighbours.")
@click.option("--temperature", "knn_temperature", default=EvalConfig.knn_temperature,
              show_default=True, help="Vote temperature.")
@user_errors
def eval_knn(**options):
    """k-NN top-1 (cosine, temperature-weighted vote) of a checkpoint or export."""
    _run_eval("knn", **options)


@eval_group.command("linear")
@_eval_options
@click.option("--epochs", "linear_epochs", default=EvalConfig.linear_epochs, show_default=True)
@click.option("--lr", "linear_lr", default=EvalConfig.linear_lr, show_default=True)
@user_errors
def eval_linear(**options):
    """Linear-probe top-1 on frozen features of a checkpoint or export."""
    _run_eval("linear", **options)


@eval_group.command("finetune")
@_eval_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (checkpoints, logs, result.json; resumed when it exists). "
                   "Default: runs/finetune/<model name>.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Take the settings from this pipeline file's eval.finetune.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a fine-tuning setting, e.g. --set epochs=5 --set layer_decay=0.75.")
@user_errors
def eval_finetune(model, train_shards, test_shards, arch, timm_kwargs, train_limit, test_limit,
                  device, allow_pickle, out, config, overrides):
    """Full fine-tuning top-1 (MAE/TEC recipe: layer decay, RandAugment, mixup/cutmix, drop path).

    Defaults are the paper's Tab. 10 (ViT-B). Works under torchrun:
    `torchrun --nproc-per-node 8 -m pipeline.cli eval finetune MODEL --train ... --test ...`.
    """
    from pipeline.orchestrate import model_display_name
    from stages.configs import to_dict
    from stages.finetune import finetune, finetune_config

    base = to_dict(_load(config, ()).eval.finetune) if config is not None else None
    cfg = finetune_config(base, overrides, train_limit=train_limit, test_limit=test_limit,
                          device=None if device == "auto" else device)
    name = model_display_name(model)
    summary = finetune(cfg, model_path=model, train_shards=train_shards, test_shards=test_shards,
                       out_dir=out or Path("runs") / "finetune" / name,
                       arch=arch or "vit_base_patch16_224",
                       timm_kwargs=_parse_timm_kwargs(timm_kwargs), allow_pickle=allow_pickle,
                       name=name)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary.format())


@main.group()
def viz():
    """Pictures of what the models attend to."""


@viz.command("attention")
@click.argument("models", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--images", "shards", required=True, help="Shards to take the images from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output PNG.")
@click.option("-n", "num_images", default=8, show_default=True)
@click.option("--arch", default=None, help="timm arch for plain checkpoints.")
@timm_kwargs_opt
@pickle_opt
@user_errors
def viz_attention(models, shards, out, num_images, arch, timm_kwargs, allow_pickle):
    """PNG grid of last-block cls attention maps: one column per model (base vs new)."""
    from pipeline.orchestrate import attention_picture

    path = attention_picture(list(models), shards, out, num_images=num_images, arch=arch,
                             allow_pickle=allow_pickle,
                             timm_kwargs=_parse_timm_kwargs(timm_kwargs))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
