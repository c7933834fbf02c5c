"""View-diversity study (issue #14): how many cached views does TEC need?

    python benchmarks/views.py                  # the study (benchmarks/configs/views.yaml)
    python benchmarks/views.py --rows k1,online # some rows only (merged into the result file)
    python benchmarks/views.py --smoke          # tiny sizes, a few minutes: checks the plumbing

Writes ``benchmarks/results/views.json`` (``--smoke``: ``<smoke workdir>/views_smoke.json``, never
a file under results/). The ImageNet configs cache K = 8 views and replay them for 300 epochs
(each crop ~37 times) where the reference draws a fresh crop every epoch; this study measures,
at the Fashion-MNIST miniature, TEC for E_t epochs from caches of K in {1, 2, 4, 8} views with
uniform and round-robin view selection, a small share of fresh views on top of a small cache
(``online_fraction`` 0.25) and the fully online reference (``online_fraction`` 1.0), by k-NN,
linear probe and (``views.finetune``) full fine-tuning. ``chosen`` in the result is the cheapest
cached setting within ``views.tolerance`` (0.3) point of fully online on every measured metric
(:func:`choose`, its rule is written into the file).

Everything runs through the library, with the quality benchmark's evaluation (imported from
``quality.py``): one stage-1 cache of the largest K (``stages.stage1.run_stage1``) from the given
base model (``base_model.checkpoint``; no bootstrap), the smaller caches cut from it with
``storage.subset.subset_cache`` (bit for bit its first K views, no base-model forward), so every
row replays the same first views; ``pipeline.orchestrate.train_run`` per row; held-out choice of
k-NN k/T, probe lr and read-out (``quality.evaluate_cached``); ``quality.finetune_row``. Every
step is reused when finished (stage-1 parts, subset parts, trained runs, evaluations, fine-tuning
runs), so an interrupted study resumes, and a later invocation with the same config keeps the
rows an earlier one measured (``--rows`` runs a few at a time). Benchmarks report, never assert.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
# quality.py sets TQDM_DISABLE unless --progress is given (the runs' bars would flood the log)
import quality  # noqa: E402
from common import (  # noqa: E402
    CONFIGS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    result_header,
    setup_logging,
    write_result,
)

log = logging.getLogger("benchmarks.views")

REFERENCE = "online"  # the fully online row's name
METRICS = ("knn_top1", "linear_top1", "finetune_top1")
VIEW_SELECTIONS = ("uniform", "round_robin")
# views.finetune keys that are not stages.finetune.FinetuneConfig settings
_FINETUNE_META = ("enabled", "rows", "settings_from")


class StudyError(ValueError):
    """A bad ``views:`` section or command line (one line, names the key)."""


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class Row:
    """One setting of the study. views: K of the cache it replays (None: fully online, no cached
    view is used); online_fraction: share of samples trained on a fresh view."""

    name: str
    views: int | None
    view_selection: str | None
    online_fraction: float

    def cache_views(self, source_views: int) -> int:
        """K of the cache the run is given (the fully online row reads the largest cache's
        manifest only: view policy and geometry, no record)."""
        return self.views if self.views is not None else source_views

    def base_forwards_per_image(self, epochs: int) -> float:
        """The base-model forward passes per pretraining image one run costs: K views in stage 1
        (once) plus online_fraction x E_t fresh views in stage 2."""
        return (self.views or 0) + self.online_fraction * epochs

    def epochs_per_cached_view(self, epochs: int) -> float | None:
        """How often each cached view is replayed (in expectation): (1 - f) x E_t / K."""
        if not self.views:
            return None
        return (1.0 - self.online_fraction) * epochs / self.views


def _int_list(study: dict, key: str, default=None) -> list[int]:
    values = study.get(key, default)
    if not isinstance(values, list) or not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise StudyError(f"views.{key}: expected a non-empty list of integers >= 1, got {values!r}")
    if len(set(values)) != len(values):
        raise StudyError(f"views.{key}: {values} lists a value twice")
    return values


def expand_rows(study: dict) -> list[Row]:
    """The rows of a ``views:`` section, in table order.

    - every K of ``views`` with every ``view_selection`` (K = 1: one row, ``k1``: every selection
      replays view 0), named ``k{K}_{selection}``;
    - every ``online_fractions`` value f < 1 on top of each K of ``online_views`` (view selection
      ``online_view_selection`` when K > 1), named ``k{K}_online{f}`` /
      ``k{K}_{selection}_online{f}``;
    - f = 1.0: the fully online reference ``online``.
    """
    known = {"seeds", "views", "view_selection", "online_fractions", "online_views",
             "online_view_selection", "tolerance", "finetune", "smoke", "base_epochs"}
    unknown = sorted(set(study) - known)
    if unknown:
        raise StudyError(f"views.{unknown[0]}: unknown key; allowed: {', '.join(sorted(known))}")
    views = _int_list(study, "views")
    selections = study.get("view_selection", list(VIEW_SELECTIONS))
    if not isinstance(selections, list) or not selections or any(
            s not in VIEW_SELECTIONS for s in selections) \
            or len(set(selections)) != len(selections):
        raise StudyError(f"views.view_selection: expected a list of {' / '.join(VIEW_SELECTIONS)}"
                         f" without repeats, got {selections!r}")
    fractions = study.get("online_fractions", [])
    if not isinstance(fractions, list) or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0
            for f in fractions) or len(set(fractions)) != len(fractions):
        raise StudyError(f"views.online_fractions: expected distinct numbers in (0, 1], got "
                         f"{fractions!r}")
    online_selection = study.get("online_view_selection", "round_robin")
    if online_selection not in VIEW_SELECTIONS:
        raise StudyError(f"views.online_view_selection: {online_selection!r} is not one of "
                         f"{', '.join(VIEW_SELECTIONS)}")
    rows: list[Row] = []
    for k in views:
        if k == 1:
            rows.append(Row("k1", 1, selections[0], 0.0))
        else:
            rows += [Row(f"k{k}_{s}", k, s, 0.0) for s in selections]
    partial = [f for f in fractions if f < 1.0]
    if partial:
        online_views = _int_list(study, "online_views")
        too_many = [k for k in online_views if k > max(views)]
        if too_many:
            raise StudyError(f"views.online_views: K = {too_many[0]} exceeds the largest cache "
                             f"(views: max {max(views)}); the smaller caches are its subsets")
        for f in partial:
            for k in online_views:
                if k == 1:
                    rows.append(Row(f"k1_online{f:g}", 1, selections[0], float(f)))
                else:
                    rows.append(Row(f"k{k}_{online_selection}_online{f:g}", k, online_selection,
                                    float(f)))
    if any(f == 1.0 for f in fractions):
        rows.append(Row(REFERENCE, None, None, 1.0))
    return rows


def select_rows(rows: list[Row], names: str | None) -> list[Row]:
    """The rows named in ``--rows a,b`` (all when None), in table order."""
    if not names:
        return rows
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [r.name for r in rows]
    missing = [n for n in wanted if n not in known]
    if missing or not wanted:
        raise StudyError(f"--rows: no row named {missing[0] if missing else names!r}; rows of "
                         f"this config: {', '.join(known)}")
    return [r for r in rows if r.name in wanted]


def caches_needed(rows: list[Row], study: dict) -> tuple[int, list[int]]:
    """(K of the stage-1 cache, the smaller K cut from it by subset). Stage 1 always builds the
    largest K of ``views.views``, whatever rows run now, so every row replays the same views."""
    source = max(_int_list(study, "views"))
    subsets = sorted({r.views for r in rows if r.views is not None and r.views < source})
    return source, subsets


def run_config(template: dict, row: Row, seed: int) -> dict:
    """The pipeline ``runs:`` entry of a row: the template run (``runs:``'s single entry) with
    the row's name, seed, view selection and online fraction."""
    run = copy.deepcopy(template)
    run.update(name=row.name, seed=seed, online_fraction=row.online_fraction)
    if row.view_selection is not None:
        run["view_selection"] = row.view_selection
    return run


def cache_dir(workdir: str | Path, k: int) -> Path:
    return Path(workdir) / f"cache-k{k}"


def group_raw(raw: dict, template: dict, rows: list[Row], *, k: int, seed: int,
              base_checkpoint: str) -> dict:
    """The raw pipeline config of the rows that train from the K-view cache, for one seed:
    workdir <workdir>/seed<s> (its runs/), the shared cache <workdir>/cache-k<K>, the resolved
    base model, no bootstrap."""
    out = copy.deepcopy(raw)
    out["workdir"] = str(Path(raw["workdir"]) / f"seed{seed}")
    out["base_model"]["checkpoint"] = str(base_checkpoint)
    out.setdefault("bootstrap", {})["enabled"] = False
    out["targets"] = {**raw["targets"], "views": k, "cache": str(cache_dir(raw["workdir"], k))}
    out["runs"] = [run_config(template, r, seed) for r in rows]
    return out


# ----------------------------------------------------------------------------- the rule
def choose(rows: list[dict], *, tolerance: float = 0.3, reference: str = REFERENCE,
           epochs: int | None = None) -> dict:
    """The cheapest cached setting within ``tolerance`` point of the fully online reference.

    rows: result rows (name, views, view_selection, online_fraction, epochs, base-model
    forwards per image, knn_top1, linear_top1, finetune_top1 or None; means over seeds).
    Candidates are the rows trained from a cache (online_fraction < 1). A candidate qualifies
    when, for k-NN and linear top-1 and, if the reference was fine-tuned, fine-tuning top-1, its
    value is at least the reference's minus ``tolerance``. Of those the one with the fewest
    base-model forward passes per pretraining image (K + online_fraction x E_t) is chosen; ties
    go to fewer cached views K, then the lower online fraction, then round-robin over uniform
    view selection, then the larger smallest margin, then the name. Round-robin wins a tie of
    cost because it replays every cached view exactly (1 - online_fraction) x E_t / K times (the
    replay count the K-for-E rule below assumes; uniform only on average) and is what ``read:
    stream`` needs; the margins of two equal-cost rows differ by seed noise (the two-seed check
    of the K = 2 rows, results/views_seeds01.json, flipped their order).
    Returns the setting (views, view_selection, online_fraction: None when no candidate
    qualifies or the reference is missing), the rule and every candidate's margins.
    """
    by = {r["name"]: r for r in rows}
    ref = by.get(reference)
    metrics = ["knn_top1", "linear_top1"]
    if ref is not None and ref.get("finetune_top1") is not None:
        metrics.append("finetune_top1")
    rule = (f"Candidates: the rows trained from a cache (online_fraction < 1). A candidate "
            f"qualifies when each of {', '.join(metrics)} (means over seeds) is at least the "
            f"fully online row's ({reference!r}, same epochs) minus {tolerance:g} point "
            f"(fine-tuning counts when the reference was fine-tuned; a candidate without a "
            f"required metric does not qualify). Chosen: the qualifying row with the fewest "
            f"base-model forward passes per pretraining image, K + online_fraction x E_t (stage 1 "
            f"computes K views once, stage 2 online_fraction x E_t fresh ones); ties: fewer "
            f"cached views K, then lower online_fraction, then round_robin over uniform (exact "
            f"replay counts; what read: stream needs), then larger smallest margin, then name. "
            f"epochs_per_cached_view = (1 - online_fraction) x E_t / K is how often the chosen "
            f"setting replays each cached view; at another schedule of E epochs, K >= (1 - "
            f"online_fraction) x E / epochs_per_cached_view keeps the replays within what was "
            f"measured.")
    out: dict = {"views": None, "view_selection": None, "online_fraction": None, "row": None,
                 "rule": rule, "tolerance": tolerance, "reference": reference,
                 "metrics": metrics, "candidates": []}
    if ref is None:
        out["why"] = f"no fully online reference row ({reference!r}) was measured"
        return out
    candidates = []
    for r in rows:
        if r["name"] == reference or r.get("online_fraction", 0.0) >= 1.0:
            continue
        missing = [m for m in metrics if r.get(m) is None or ref.get(m) is None]
        deltas = {m: round(r[m] - ref[m], 6) for m in metrics if m not in missing}
        within = not missing and all(d >= -tolerance for d in deltas.values())
        cost = r.get("base_forwards_per_image")
        if cost is None:
            e = r.get("epochs", epochs)
            cost = (r.get("views") or 0) + float(r.get("online_fraction", 0.0)) * float(e)
        candidates.append({"row": r["name"], "views": r.get("views"),
                           "view_selection": r.get("view_selection"),
                           "online_fraction": r.get("online_fraction", 0.0),
                           "base_forwards_per_image": cost, "deltas": deltas,
                           "missing": missing, "within": within,
                           "epochs_per_cached_view": r.get("epochs_per_cached_view")})

    def key(c: dict):
        margin = min(c["deltas"].values()) if c["deltas"] else float("-inf")
        selection = {"round_robin": 0, "uniform": 1}.get(c["view_selection"], 2)
        return (c["base_forwards_per_image"], c["views"] or 0, c["online_fraction"], selection,
                -margin, c["row"])

    candidates.sort(key=key)
    out["candidates"] = candidates
    qualifying = [c for c in candidates if c["within"]]
    if not qualifying:
        out["why"] = (f"no cached setting is within {tolerance:g} point of fully online on "
                      f"{', '.join(metrics)}" if candidates else "no cached row was measured")
        return out
    best = qualifying[0]
    out.update(views=best["views"], view_selection=best["view_selection"],
               online_fraction=best["online_fraction"], row=best["row"],
               base_forwards_per_image=best["base_forwards_per_image"],
               epochs_per_cached_view=best["epochs_per_cached_view"], deltas=best["deltas"],
               why=f"{best['row']} is the cheapest of the {len(qualifying)} qualifying cached "
                   f"rows ({', '.join(c['row'] for c in qualifying)})")
    return out


# ----------------------------------------------------------------------------- configuration
def load_study(path: str, overrides: list[str]) -> tuple[dict, dict, dict]:
    """(pipeline mapping, quality settings, views section) after the overrides, paths absolute."""
    raw, q = quality.load_raw(path, overrides)
    study = raw.pop("views", None)
    if not isinstance(study, dict):
        raise StudyError(f"{path}: no views: section (see benchmarks/configs/views.yaml)")
    runs = raw.get("runs") or []
    if len(runs) != 1:
        raise StudyError(f"runs: the study expands one template run into its rows; {path} has "
                         f"{len(runs)}")
    quality.make_paths_absolute(raw, q)
    return raw, q, study


def finetune_settings(study: dict) -> dict | None:
    """The fine-tuning settings of the rows (FinetuneConfig keys) or None when disabled:
    ``views.finetune.settings_from``'s ``quality.finetune`` (the miniature budget chosen for
    the quality benchmark, its ``rows`` dropped) updated by the other keys of views.finetune."""
    ft = study.get("finetune")
    if not ft or not ft.get("enabled", True):
        return None
    settings: dict = {}
    source = ft.get("settings_from")
    if source:
        path = Path(source) if Path(source).is_absolute() else REPO_ROOT / source
        if not path.is_file():
            raise StudyError(f"views.finetune.settings_from: file not found: {path}")
        inherited = (yaml.safe_load(path.read_text()).get("quality") or {}).get("finetune")
        if not isinstance(inherited, dict):
            raise StudyError(f"views.finetune.settings_from: {path} has no quality.finetune")
        settings.update({k: v for k, v in inherited.items() if k != "rows"})
    settings.update({k: v for k, v in ft.items() if k not in _FINETUNE_META})
    from stages.configs import ConfigError
    from stages.finetune import finetune_config

    try:
        finetune_config(settings)  # a bad key is one line now, not after hours of training
    except ConfigError as exc:
        raise StudyError(f"views.finetune: {exc}") from None
    return settings


def finetune_rows(study: dict, rows: list[Row]) -> list[str]:
    """The names of the rows to fine-tune (``views.finetune.rows``: 'all' or a list; 'base'
    fine-tunes the base model too)."""
    wanted = (study.get("finetune") or {}).get("rows", "all")
    names = [r.name for r in rows]
    if wanted == "all":
        return names
    if not isinstance(wanted, list):
        raise StudyError(f"views.finetune.rows: 'all' or a list of row names, got {wanted!r}")
    return [n for n in wanted if n in names or n == "base"]


# ----------------------------------------------------------------------------- the study
def run_study(raw: dict, q: dict, study: dict, rows: list[Row]) -> dict:
    """Train, evaluate and fine-tune ``rows`` (every seed); returns the result's rows, chosen,
    the base model's numbers and the steps' timings."""
    from pipeline.config import parse_config
    from pipeline.orchestrate import ensure_base_checkpoint, find_export, prepare_data, train_run
    from stages.stage1 import run_stage1
    from storage import inspect_cache
    from storage.subset import subset_cache

    all_rows = expand_rows(study)
    template = raw["runs"][0]
    epochs = int(template["epochs"])
    seeds = [int(s) for s in study.get("seeds", [0])]
    arch = raw["base_model"]["arch"]
    img_size = int(raw["base_model"]["timm_kwargs"]["img_size"])
    ft_settings = finetune_settings(study)
    ft_rows = finetune_rows(study, all_rows) if ft_settings is not None else []
    ft_quality = {**q, "finetune": ft_settings}
    steps: dict = {}
    data_fn = quality.lazy_eval_data(q, raw["data"]["test"], img_size, steps)

    # data and the base model (given, or the smoke's bootstrap)
    given = raw["base_model"].get("checkpoint")
    if given and not Path(given).is_file():  # before preparing anything
        raise FileNotFoundError(f"base_model.checkpoint: file not found: {given}")
    top = parse_config({**copy.deepcopy(raw), "runs": []}, source_file="views.yaml")
    t0 = time.perf_counter()
    steps["data"] = prepare_data(top)
    base = ensure_base_checkpoint(top)
    steps["base_s"] = time.perf_counter() - t0
    log.info("base model %s", base.checkpoint)
    from stages.resolve import resolve_base

    resolved = resolve_base(base)  # hashed and described once: stage 1 and every row
    # caches: stage 1 for the largest K, the smaller ones its subsets
    source_k, subset_ks = caches_needed(rows, study)
    source_raw = group_raw(raw, template, [], k=source_k, seed=seeds[0],
                           base_checkpoint=base.checkpoint)
    log.info("stage 1: K=%d views of every pretraining image -> %s", source_k,
             cache_dir(raw["workdir"], source_k))
    t0 = time.perf_counter()
    s1 = run_stage1(parse_config(source_raw).targets, resolved, progress=False)
    steps["stage1_s"] = time.perf_counter() - t0
    steps["stage1_images_rate"] = s1.images_per_s if s1.parts_done else None
    source_cache = cache_dir(raw["workdir"], source_k)
    steps["source_views"] = source_k
    info = inspect_cache(source_cache)
    steps["cache"] = {k: info[k] for k in ("samples", "records", "bytes_total", "bytes_per_view",
                                            "float32_bytes_per_view")}
    model = dict(template.get("model") or {})
    steps["attention_target"] = quality.attention_target_entropy(
        source_cache, k=int(model.get("k", 4)), tau=float(model.get("tau", 1.0)))
    for k in subset_ks:
        log.info("cache K=%d: the first %d views of the K=%d cache", k, k, source_k)
        t0 = time.perf_counter()
        done = subset_cache(source_cache, cache_dir(raw["workdir"], k), views=k)
        steps[f"subset_k{k}_s"] = time.perf_counter() - t0
        log.info("cache K=%d: %d parts cut from the K=%d cache, %d reused", k,
                 done["parts_written"], source_k, done["parts_skipped"])
    # the base model's own numbers (context for the table; no row of the rule)
    t0 = time.perf_counter()
    base_eval = quality.evaluate_cached(Path(base.checkpoint), arch, data_fn, q)
    if "base" in ft_rows:
        base_eval.update(quality.finetune_row(Path(base.checkpoint), "base", arch, raw,
                                              ft_quality, Path(raw["workdir"])))
    steps["eval_base_s"] = time.perf_counter() - t0
    # the rows, every seed
    per_seed: dict = {}
    for seed in seeds:
        evals, train_info, seed_steps = {}, {}, {}
        for row in rows:
            k = row.cache_views(source_k)
            cfg = parse_config(group_raw(raw, template, [row], k=k, seed=seed,
                                         base_checkpoint=base.checkpoint),
                               source_file="views.yaml")
            run = cfg.runs[0]
            log.info("seed %d row %s (K=%s, %s, online_fraction %g, %d epochs): training",
                     seed, row.name, row.views or "-", row.view_selection or "-",
                     row.online_fraction, epochs)
            t0 = time.perf_counter()
            result = train_run(cfg, run, resolved)
            seed_steps[f"train_{row.name}_s"] = time.perf_counter() - t0
            if result is not None and result.samples:
                log.info("seed %d row %s: %d steps, %.0f samples/s", seed, row.name,
                         result.steps, result.samples_per_s)
            else:
                log.info("seed %d row %s: reused (finished earlier)", seed, row.name)
            export = find_export(cfg.run_dir(row.name))
            train_info[row.name] = quality._run_info(cfg.run_dir(row.name))
            t0 = time.perf_counter()
            evals[row.name] = quality.evaluate_cached(export, arch, data_fn, q)
            seed_steps[f"eval_{row.name}_s"] = time.perf_counter() - t0
            if row.name in ft_rows:
                log.info("seed %d row %s: fine-tuning", seed, row.name)
                t0 = time.perf_counter()
                evals[row.name].update(quality.finetune_row(
                    export, row.name, arch, raw, ft_quality, Path(cfg.workdir)))
                seed_steps[f"finetune_{row.name}_s"] = time.perf_counter() - t0
        per_seed[seed] = {"eval": evals, "train": train_info, "steps": seed_steps}
    result_rows = [aggregate_row(row, epochs, per_seed) for row in rows]
    base_entry = {"checkpoint": str(base.checkpoint),
                  "epochs": study.get("base_epochs"),
                  **{m: base_eval.get(m) for m in METRICS},
                  "readouts": {"knn": base_eval["knn_readout"],
                               "linear": base_eval["linear_readout"]}}
    return {"epochs": epochs, "rows": result_rows, "base": base_entry, "steps": steps,
            "per_seed": {str(s): v for s, v in per_seed.items()},
            "finetune": ft_settings, "finetune_rows": ft_rows}


def aggregate_row(row: Row, epochs: int, per_seed: dict) -> dict:
    """One result row: the setting, and per metric the mean, spread and values over seeds
    (``finetune_top1`` None when the row was not fine-tuned)."""
    results = [(s, per_seed[s]["eval"][row.name]) for s in per_seed
               if row.name in per_seed[s]["eval"]]
    entry = {"name": row.name, "views": row.views, "view_selection": row.view_selection,
             "online_fraction": row.online_fraction, "epochs": epochs,
             "epochs_per_cached_view": row.epochs_per_cached_view(epochs),
             "base_forwards_per_image": row.base_forwards_per_image(epochs),
             "seeds": [s for s, _ in results]}
    for metric in METRICS:
        quality.set_stats(entry, metric, [r[metric] for _, r in results
                                           if r.get(metric) is not None])
    entry["readouts"] = {"knn": [r["knn_readout"] for _, r in results],
                         "linear": [r["linear_readout"] for _, r in results]}
    entry["files"] = [str(r["file"]) for _, r in results]
    entry["train"] = [per_seed[s]["train"].get(row.name, {}) for s, _ in results]
    return entry


def merge_rows(previous: dict | None, new_rows: list[dict], order: list[str],
               created: str) -> list[dict]:
    """This invocation's rows plus the rows an earlier invocation of the same config measured
    that this one did not run (``--rows``), in table order; each row says when it was measured."""
    rows = {r["name"]: {**r, "measured": created} for r in new_rows}
    for r in (previous or {}).get("rows", []):
        if r["name"] not in rows and r["name"] in order:
            rows[r["name"]] = {**r, "measured": r.get("measured", previous.get("created"))}
    return [rows[n] for n in order if n in rows]


def previous_result(out: Path, config_record: dict) -> dict | None:
    """The result file ``out`` when an earlier invocation of the same config wrote it."""
    if not out.is_file():
        return None
    try:
        previous = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if previous.get("config") != json.loads(json.dumps(config_record)):
        log.warning("%s holds a result of another config; its rows are not kept", out)
        return None
    return previous


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIGS_DIR / "views.yaml"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (views.smoke overrides), a few minutes")
    parser.add_argument("--rows", default=None, metavar="A,B",
                        help="run these rows only (the result file keeps earlier rows)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (as `tec run --set`)")
    parser.add_argument("--out", default=None, help="result file (default: see above)")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--progress", action="store_true", help="show the training bars")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    started = time.perf_counter()
    from stages.configs import ConfigError

    try:
        stem = Path(args.config).stem
        smoke = (yaml.safe_load(Path(args.config).read_text()).get("views") or {}).get(
            "smoke", []) if args.smoke else []
        overrides = list(smoke) + list(args.set)
        name = f"{stem}_smoke" if args.smoke else stem
        raw, q, study = load_study(args.config, overrides)
        all_rows = expand_rows(study)
        rows = select_rows(all_rows, args.rows)
        if args.list:
            for r in all_rows:
                print(f"{r.name:<28} K={r.views or '-':<3} {r.view_selection or '-':<12} "
                      f"online_fraction={r.online_fraction:g}")
            return 0
        out = Path(args.out) if args.out else (
            Path(raw["workdir"]) / f"{name}.json" if args.smoke else RESULTS_DIR / f"{name}.json")
        config_record = {"file": str(Path(args.config)), "overrides": overrides,
                         "pipeline": copy.deepcopy(raw), "quality": q, "views": study}
        result = result_header(name)
        measured = run_study(raw, q, study, rows)
    except (StudyError, ConfigError, FileNotFoundError) as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError) and "strong_base" in str(exc):
            hint = (" (train and ship it: python benchmarks/strong_base.py; or --set "
                    "base_model.checkpoint=FILE)")
        log.error("%s%s", exc, hint)
        return 2
    previous = previous_result(out, config_record)
    result_rows = merge_rows(previous, measured.pop("rows"), [r.name for r in all_rows],
                             result["created"])
    result["rows"] = result_rows
    result["chosen"] = choose(result_rows, tolerance=float(study.get("tolerance", 0.3)),
                              epochs=measured["epochs"])
    result.update(measured)
    result["rows_run"] = [r.name for r in rows]
    result["config"] = config_record
    result["runtime_s"] = time.perf_counter() - started
    earlier = quality.earlier_invocations(out, config_record)
    if earlier:
        result["earlier_invocations"] = earlier
    write_result(result, out)
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['benchmark']} on {result['device']}, {result['runtime_s'] / 60:.1f} min")
    print(f"{'row':<28} {'K':>2} {'sel':<11} {'f':>4} {'fwd/img':>7}  {'k-NN':>13}  "
          f"{'linear':>13}  {'fine-tune':>13}")

    def cell(r: dict, m: str) -> str:
        return "n/a".rjust(13) if r.get(m) is None else f"{r[m]:6.2f} ± {r[m + '_std']:4.2f}"

    for r in result["rows"]:
        print(f"{r['name']:<28} {r['views'] or '-':>2} {r['view_selection'] or '-':<11} "
              f"{r['online_fraction']:>4g} {r['base_forwards_per_image']:>7g}  "
              f"{cell(r, 'knn_top1')}  {cell(r, 'linear_top1')}  {cell(r, 'finetune_top1')}")
    c = result["chosen"]
    print(f"chosen: {c['row'] or 'none'}: {c['why']}")


if __name__ == "__main__":
    sys.exit(main())
