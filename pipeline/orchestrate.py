"""``tec run``: data -> base model -> stage 1 -> every stage-2 run -> evaluation.

Each step is skipped when its output already exists and is complete (prepared shards, a
bootstrapped base model, a committed cache, a finished run's export), so a second ``tec run``
reuses everything and the summary says what was reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.configs import BaseModelConfig, ConfigError, EvalConfig
from stages.resolve import ResolvedBase

from .config import PipelineConfig

log = logging.getLogger(__name__)

STEPS = ("data", "bootstrap", "targets", "train", "eval")


@dataclass
class PipelineSummary:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, what happened)
    eval_table: str | None = None
    seconds: float = 0.0
    results_file: str | None = None

    def add(self, step: str, text: str) -> None:
        log.info("%s: %s", step, text)
        self.steps.append((step, text))

    def format(self) -> str:
        width = max((len(s) for s, _ in self.steps), default=4)
        lines = ["", "== tec run summary =="]
        lines += [f"{step.ljust(width)}  {text}" for step, text in self.steps]
        if self.eval_table:
            lines += ["", "top-1 accuracy (%) on the test set:", self.eval_table]
        if self.results_file:
            lines.append(f"\nresults: {self.results_file}")
        lines.append(f"total time: {self.seconds / 60:.1f} min")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- data
def prepare_data(cfg: PipelineConfig) -> str:
    """Build the configured shards when ``data.prepare`` asks for it; returns what happened."""
    from stages.sources import expand_shards

    if cfg.data.prepare == "none":
        return "using existing shards"
    try:
        if expand_shards(cfg.data.train) and (cfg.data.test is None
                                              or expand_shards(cfg.data.test)):
            return f"reused shards {cfg.data.train}"
    except ValueError:
        pass  # not there yet
    from stages.datasets import fashion_mnist_to_shards

    out = cfg.data.prepare_dir or str(Path(cfg.data.train).parent)
    fashion_mnist_to_shards(cfg.data.idx_dir, out, shard_size=cfg.data.shard_size,
                            limit=cfg.data.train_limit)
    return f"wrote Fashion-MNIST shards to {out}"


# ------------------------------------------------------------------------------ base model
def find_export(run_dir: Path) -> Path | None:
    """The timm-loadable export of a finished run (``<run_dir>/export/*.safetensors``), if any."""
    exports = sorted(p for p in (Path(run_dir) / "export").glob("*.safetensors")
                     if not p.name.endswith(".adapters.safetensors"))
    return exports[0] if exports else None


def bootstrap_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.workdir) / "bootstrap"


def bootstrap_run_config(cfg: PipelineConfig):
    """The bootstrap's TrainConfig (``bootstrap.run`` with the base model's geometry, as
    :func:`pipeline.config.bootstrap_run` built it when the config was parsed)."""
    if cfg.bootstrap.run is None:
        raise ConfigError("bootstrap: not enabled; set bootstrap.enabled: true")
    return cfg.bootstrap.run


def ensure_base_checkpoint(cfg: PipelineConfig, *, allow_bootstrap: bool = True,
                           summary: PipelineSummary | None = None) -> BaseModelConfig:
    """The base-model config with a checkpoint that exists, bootstrapping one if configured."""
    base = cfg.base_model
    if base.pretrained:  # resolved now: weights not in the cache fail before any other work
        base.pretrained_weights()
        return base
    if base.checkpoint is not None:
        if not Path(base.checkpoint).is_file():
            raise FileNotFoundError(f"base_model.checkpoint: file not found: {base.checkpoint}")
        return base
    if not cfg.bootstrap.enabled:
        raise ConfigError("base_model.checkpoint: a checkpoint is required (or enable bootstrap "
                          "to train a pixel-target base model first)")
    export = find_export(bootstrap_dir(cfg))
    anew = ""
    if export is not None and allow_bootstrap:  # a bootstrap of other settings is not reused
        anew = _set_aside_if_stale(bootstrap_dir(cfg), bootstrap_run_config(cfg), cache=None,
                                   base=None)
        export = find_export(bootstrap_dir(cfg)) if not anew else None
    if export is None:  # a finished bootstrap has its export; an unfinished one resumes
        if not allow_bootstrap:
            raise ConfigError("base_model.checkpoint is not set and the bootstrap base model is "
                              "not trained yet; run `tec run CONFIG --only bootstrap` first")
        from stages.train import train

        run = bootstrap_run_config(cfg)
        result = train(run, cache=None, source=cfg.targets.source, base=None,
                       view_policy=pipeline_view_policy(cfg), out_dir=bootstrap_dir(cfg))
        export = find_export(bootstrap_dir(cfg))
        if summary is not None:
            summary.add("bootstrap", anew + f"trained pixel-target base model ({result.steps} "
                                     f"steps, {result.seconds / 60:.1f} min) -> {export}")
    elif summary is not None:
        summary.add("bootstrap", f"reused base model {export}")
    return dataclasses.replace(base, checkpoint=str(export))


def pipeline_view_policy(cfg: PipelineConfig):
    """The config's view policy (``targets.view_policy``) as a ViewPolicy."""
    from stages.views import ViewPolicy

    vp = cfg.targets.view_policy
    return vp if isinstance(vp, ViewPolicy) else ViewPolicy.from_dict(vp)


# ------------------------------------------------------------------------------ stage 2
def train_run(cfg: PipelineConfig, run, base: BaseModelConfig | ResolvedBase | None = None):
    """Train one run of the config from its cache, resuming from its last checkpoint.

    base: the base model (described once per command: pass the same ResolvedBase to every run;
    None: the config's, with a checkpoint that must exist). A finished run resumes at its last
    step, trains nothing and rewrites its export.
    """
    from stages.train import train

    if base is None:
        base = ensure_base_checkpoint(cfg, allow_bootstrap=False)
    return train(run, cache=str(cfg.cache_path), source=cfg.targets.source, base=base,
                 view_policy=None, out_dir=cfg.run_dir(run.name),
                 cache_views=cfg.targets.views)  # a grown cache: the views the config names


def _set_aside_if_stale(run_dir: Path, run, *, cache: str | None, base, views: int | None = None,
                        source=None) -> str:
    """A run folder trained from other inputs is renamed (kept) so the run trains anew; returns
    what to say about it ('' when the folder is reusable or absent). views, source: the run's
    targets.views and source, what it reads of a cache grown by `tec cache extend`."""
    from stages.identity import set_aside, stale_changes

    changes = stale_changes(run_dir, run, cache=cache, base=base, views=views,
                            source=source) if Path(run_dir).is_dir() else []
    if not changes:
        return ""
    old = set_aside(run_dir)
    log.warning("%s was trained from other inputs (changed: %s); moved to %s, training anew",
                run_dir, "; ".join(changes), old)
    return f"trained anew (changed: {'; '.join(changes)}; the old run is in {old}): "


def _already_done(result) -> bool:
    return result.resumed_from_step is not None and result.resumed_from_step >= result.steps


# ------------------------------------------------------------------------------ evaluation
def evaluate_file(path: Path, train_shards, test_shards, cfg: EvalConfig, **kwargs) -> str:
    """One model file's metrics as a table (the ``tec eval`` commands); ``kwargs``: those of
    :func:`stages.evaluate.evaluate_models` (metrics, arch, allow_pickle, timm_kwargs)."""
    from stages.evaluate import evaluate_models, format_table

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    rows = evaluate_models({model_display_name(path): Path(path)}, train_shards, test_shards, cfg,
                           **kwargs)
    return format_table(rows)


def model_display_name(path: Path) -> str:
    """A run's export ``<run>/export/model.safetensors`` is named after its run folder."""
    path = Path(path)
    if path.parent.name == "export":
        return path.parent.parent.name
    return path.name.removesuffix(".safetensors").removesuffix(".pth")


def attention_picture(models: list[Path] | dict[str, Path], shards, out: Path, *,
                      num_images: int = 8, arch: str | None = None,
                      allow_pickle: bool = False, timm_kwargs: dict | None = None,
                      loaded: dict | None = None) -> Path:
    """PNG grid of last-block cls attention maps of each model for a few images (paper Fig. 2).

    models: model files (named by :func:`model_display_name`) or a mapping name -> file.
    loaded: name -> that file's model already loaded (used instead of loading it again).
    """
    if not isinstance(models, dict):
        models = {model_display_name(p): Path(p) for p in models}
    from stages.evaluate import load_eval_images, load_model
    from stages.viz import attention_maps, save_attention_grid
    from tec.targets import normalize_images

    maps, shown = {}, None
    for name, path in models.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        model = (loaded or {}).get(name)
        if model is None:
            model = load_model(Path(path), arch, allow_pickle=allow_pickle,
                               timm_kwargs=timm_kwargs)
        size = model.patch_embed.img_size[0]
        images, _ = load_eval_images(shards, size, limit=num_images)
        if shown is None:
            shown = images
        elif shown.shape[-1] != size:
            raise ConfigError(f"{path}: image size {size} differs from the first model's "
                              f"{shown.shape[-1]}; compare models of the same input size")
        maps[name] = attention_maps(model, normalize_images(images))
    return save_attention_grid(out, shown, maps)


# ------------------------------------------------------------------------------ the pipeline
def run_pipeline(cfg: PipelineConfig, *, ray_address: str | None = None,
                 only: set[str] | None = None) -> PipelineSummary:
    """Run every step of the pipeline (or ``only`` some), reusing finished work."""
    from stages.stage1 import run_stage1

    start = time.time()
    summary = PipelineSummary()
    wanted = set(only or STEPS)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if "data" in wanted:
        summary.add("data", prepare_data(cfg))
    base = None
    if "targets" in wanted:  # an unusable object-store URL: one line before any model work
        from stages.stage1 import check_storage

        check_storage(cfg.targets)
    if wanted & {"bootstrap", "targets", "train", "eval"}:
        base = ensure_base_checkpoint(cfg, allow_bootstrap="bootstrap" in wanted,
                                      summary=summary)
    if _needs_base_model(cfg, wanted):  # described once: stage 1, every run and evaluation
        from stages.resolve import resolve_base

        base = resolve_base(base)
    if "targets" in wanted:
        s1 = run_stage1(cfg.targets, base, ray_address=ray_address)
        if s1.parts_done == 0:
            summary.add("targets", f"reused cache {cfg.cache_path} ({s1.parts_skipped} parts "
                                   "committed; 0 base-model forward passes)")
        else:
            summary.add("targets", f"cache {cfg.cache_path}: {s1.images} images x "
                                   f"{cfg.targets.views} views in {s1.seconds:.0f} s "
                                   f"({s1.images_per_s:.1f} img/s), {s1.skipped} skipped, "
                                   f"{s1.parts_skipped} parts resumed")
    if "train" in wanted:
        for run in cfg.runs:
            anew = _set_aside_if_stale(cfg.run_dir(run.name), run, cache=str(cfg.cache_path),
                                       base=base, views=cfg.targets.views,
                                       source=cfg.targets.source)
            result = train_run(cfg, run, base)
            if _already_done(result):
                summary.add(f"run {run.name}", f"reused finished run ({result.steps} steps; "
                                               "same settings, cache and base model)")
            else:
                fallback = getattr(result, "fallback_online", 0)
                summary.add(f"run {run.name}",
                            anew + f"{result.steps} steps in {result.seconds / 60:.1f} min "
                            f"({result.samples_per_s:.1f} samples/s; cached "
                            f"{result.cached_samples}, online {result.online_samples}"
                            + (f", {fallback} of them for missing cache records" if fallback
                               else "") + ")")
    if "eval" in wanted and cfg.eval.enabled:
        _evaluate(cfg, base, summary)
    summary.seconds = time.time() - start
    return summary


def _needs_base_model(cfg: PipelineConfig, wanted: set[str]) -> bool:
    """Whether a wanted step loads the base model: stage 1, a run with base-model targets,
    evaluation (which evaluates it)."""
    return ("targets" in wanted
            or ("train" in wanted and any(r.model.target == "tec" for r in cfg.runs))
            or ("eval" in wanted and cfg.eval.enabled and cfg.data.test is not None))


def finetune_rows(cfg: PipelineConfig, models: dict[str, Path], rows: list[dict],
                  summary: PipelineSummary, known_sha256: dict | None = None) -> None:
    """Add ``finetune_top1`` to each row: every model fine-tuned end to end (``eval.finetune``).

    Each model gets ``<workdir>/finetune/<name>-<sha256[:12]>`` (a retrained export gets a new
    folder; an interrupted fine-tuning resumes, a finished one is re-evaluated only).
    known_sha256: name -> its file's sha256 where already computed (the base model's).
    """
    from stages.finetune import finetune
    from tec.teacher import file_sha256

    ev = cfg.eval
    # its own train_limit / test_limit (null: every image); the device follows eval.device
    ft = dataclasses.replace(
        ev.finetune, device=ev.finetune.device if ev.finetune.device != "auto" else ev.device)
    start = time.time()
    for row in rows:
        path = Path(models[row["model"]])
        sha = (known_sha256 or {}).get(row["model"]) or file_sha256(path)
        out = Path(cfg.workdir) / "finetune" / f"{row['model']}-{sha[:12]}"
        result = finetune(ft, model_path=path, train_shards=cfg.data.train,
                          test_shards=cfg.data.test, out_dir=out, arch=cfg.base_model.arch,
                          timm_kwargs=cfg.base_model.timm_kwargs,
                          allow_pickle=cfg.base_model.allow_pickle, name=row["model"])
        row["finetune_top1"] = result.top1
        row["finetune_dir"] = str(out)
    summary.add("finetune", f"{len(rows)} models fine-tuned end to end ({ft.epochs} epochs, "
                            f"{(time.time() - start) / 60:.1f} min) -> {cfg.workdir}/finetune")


def _evaluate(cfg: PipelineConfig, resolved: ResolvedBase, summary: PipelineSummary) -> None:
    """Evaluate the base model (as described once for the command) and every run's export."""
    from stages.evaluate import evaluate_models, format_table

    if cfg.data.test is None:
        summary.add("eval", "skipped: data.test is not set")
        return
    base = resolved.config
    if base.pretrained:  # evaluated as the resolved file, a plain checkpoint of its arch
        base = base.as_checkpoint()
        cfg = dataclasses.replace(cfg, base_model=base)
    models = {"base": Path(base.checkpoint)}
    # the base model as loaded once, where loading its file as evaluation does gives the same
    loaded = {"base": resolved.model} if resolved.loads_as_file() else {}
    for run in cfg.runs:
        export = find_export(cfg.run_dir(run.name))
        if export is not None:
            models[run.name] = export
    ev = cfg.eval
    rows = evaluate_models(models, cfg.data.train, cfg.data.test, ev, arch=cfg.base_model.arch,
                           allow_pickle=cfg.base_model.allow_pickle,
                           timm_kwargs=cfg.base_model.timm_kwargs, loaded=loaded)
    if ev.finetune is not None and ev.finetune.enabled:
        finetune_rows(cfg, models, rows, summary,
                      known_sha256={"base": resolved.checkpoint_sha256})
    summary.eval_table = format_table(rows)
    results = Path(cfg.workdir) / "eval.json"
    results.write_text(json.dumps(rows, indent=2))
    summary.results_file = str(results)
    summary.add("eval", f"k-NN and linear probe for {len(rows)} models -> {results}")
    if ev.viz_images > 0 and len(models) > 1:
        try:
            png = attention_picture(models, cfg.data.test,
                                    Path(cfg.workdir) / "attention.png",
                                    num_images=ev.viz_images, arch=cfg.base_model.arch,
                                    allow_pickle=cfg.base_model.allow_pickle,
                                    timm_kwargs=cfg.base_model.timm_kwargs, loaded=loaded)
            summary.add("viz", f"attention maps -> {png}")
        except ConfigError as exc:
            summary.add("viz", f"skipped: {exc}")
