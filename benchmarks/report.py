"""Render the result tables of benchmarks/README.md from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrite the tables in README.md in place
    python benchmarks/report.py --print    # print them instead

The README keeps hand-written findings outside the generated blocks, which sit between
``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers (names: speed, quality,
quality_reduced, quality_sweep, views, ...). A block whose result file is missing says so.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR  # noqa: E402

README = REPO_ROOT / "benchmarks" / "README.md"


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _provenance(r: dict) -> str:
    git = r.get("git", {})
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty tree)" if git.get("dirty") else "")
    m = r["machine"]
    load = m.get("load_average_at_start")
    text = (f"_{r['benchmark']}: `{r['command']}` on {r['device']}, GPU: "
            f"{m.get('gpu') or 'none'}; commit {commit}; {r['created']}; runtime "
            f"{r['runtime_s'] / 60:.1f} min; load average at start {load}, at end "
            f"{m.get('load_average_at_end')}._")
    for inv in r.get("earlier_invocations", []):
        sha = ((inv.get("git") or {}).get("commit") or "unknown")[:10]
        text += (f" _This file was written by a rerun that reused the finished work of an "
                 f"earlier invocation: `{inv['command']}`, commit {sha}, {inv['created']}, "
                 f"runtime {inv['runtime_s'] / 60:.1f} min._")
    return text


def speed_block() -> str:
    r = _load("speed")
    if r is None:
        return "_No result yet: run `python benchmarks/speed.py`._"
    raw, sec, g = r["raw"], r["secondary"], r["goals"]

    def verdict(name: str) -> str:
        return "met" if r[name] >= g[name] else "**not met**"

    fwd = raw["forward_only_before"]
    lines = [
        "| metric | definition (measured) | CPU (this machine) | GPU | goal |",
        "|---|---|---|---|---|",
        f"| stage-1 efficiency | {_fmt(raw['stage1_views_per_s'], 1)} views/s end to end "
        f"(best steady part) ÷ {_fmt(raw['forward_only_views_per_s'], 1)} views/s forward only "
        f"(best pass) "
        f"({fwd['threads']} thread(s), batch {fwd['batch_size']}) | "
        f"{_fmt(r['stage1_efficiency'])} | not measured | >= {g['stage1_efficiency']} "
        f"({verdict('stage1_efficiency')}) |",
        f"| stage-2 speedup | {_fmt(raw['train_cached_samples_per_s'])} samples/s from the cache "
        f"÷ {_fmt(raw['train_online_samples_per_s'])} samples/s online (p90 steps) | "
        f"{_fmt(r['stage2_speedup'])} | not measured | >= {g['stage2_speedup']} "
        f"({verdict('stage2_speedup')}) |",
        f"| loader headroom | {_fmt(raw['loader_samples_per_s'], 1)} samples/s loader alone ÷ "
        f"{_fmt(raw['train_cached_samples_per_s'])} samples/s training | "
        f"{_fmt(r['loader_headroom'], 1)} | not measured | >= {g['loader_headroom']} "
        f"({verdict('loader_headroom')}) |",
        f"| storage, float16 | {_fmt(raw['storage_fp16']['bytes_per_view'], 0)} B per view on "
        f"disk ÷ {raw['storage_fp16']['float32_bytes_per_view']} B float32 tensors | "
        f"{_fmt(r['bytes_per_view_ratio_fp16'], 3)} | (same) | report |",
        f"| storage, int8 | {_fmt(raw['storage_int8']['bytes_per_view'], 0)} B per view on disk "
        f"÷ {raw['storage_int8']['float32_bytes_per_view']} B float32 tensors | "
        f"{_fmt(r['bytes_per_view_ratio_int8'], 3)} | (same) | report |",
        "",
        f"Estimator: {r['estimator']}",
        "",
        "Secondary ratios from the same run:",
        "",
        "| ratio | value |",
        "|---|---|",
        f"| stage-1 efficiency, median-based (mean of the two float16 runs' rates after their "
        f"first part ÷ median forward-only pass) | {_fmt(sec['stage1_efficiency_median_based'])} |",
        f"| stage-1 efficiency, all parts (first part included) ÷ median forward-only pass | "
        f"{_fmt(sec['stage1_efficiency_all_parts_median_based'])} |",
        f"| stage-1 first part's extra seconds (fresh Ray worker: imports, first calls) | "
        f"{', '.join(_fmt(v, 1) for v in sec['stage1_first_part_extra_s'])} |",
        f"| stage-2 speedup, median steps ({_fmt(raw['train_cached_samples_per_s_median'])} ÷ "
        f"{_fmt(raw['train_online_samples_per_s_median'])} samples/s) | "
        f"{_fmt(sec['stage2_speedup_median_step'])} |",
        f"| loader headroom, median steps | {_fmt(sec['loader_headroom_median_step'], 1)} |",
        f"| stage-1 efficiency incl. the driver's setup (Ray already up: actor start, model "
        f"load, cache create/finalize) | {_fmt(sec['stage1_efficiency_incl_driver_setup'])} |",
        f"| stage-1 efficiency incl. starting Ray | "
        f"{_fmt(sec['stage1_efficiency_incl_ray_startup'])} |",
        f"| stage-1 efficiency vs. forward + target extraction (the actor's own compute) | "
        f"{_fmt(sec['stage1_efficiency_vs_forward_plus_targets'])} |",
        f"| target extraction cost: forward-only ÷ forward+targets throughput | "
        f"{_fmt(sec['targets_cost_vs_forward'])} |",
        f"| stage-1 efficiency of each float16 run (all parts ÷ median forward pass) | "
        f"{', '.join(_fmt(v) for v in sec['stage1_efficiency_each_fp16_run'])} |",
        f"| stage-1 efficiency with the int8 codec | {_fmt(sec['stage1_efficiency_int8'])} |",
        f"| forward-only views/s while another process decodes flat out ÷ alone | "
        f"{_fmt(sec['forward_with_decode_vs_forward_alone'])} |",
        f"| actor share of one shard's time, run serially in-process "
        f"(actor / decode+views / write+commit ms per view: "
        f"{', '.join(_fmt(v, 1) for v in raw['stage1_profile_serial']['ms_per_view'].values())})"
        f" | {_fmt(sec['profile_actor_share_serial'])} |",
        f"| stage-2 speedup if FLOP-bound: (new-model step + base forward) ÷ new-model step, "
        f"counted as `tec plan` does | {_fmt(sec['stage2_speedup_flops_bound'])} |",
        f"| stage-2 speedup over the whole fits (incl. start-up steps) | "
        f"{_fmt(sec['stage2_speedup_whole_fit'])} |",
        f"| stage-2 speedup from mean step times | "
        f"{_fmt(sec['stage2_speedup_mean_step_time'])} |",
        f"| stage-2 speedup of each cached/online segment pair (median steps) | "
        f"{', '.join(_fmt(v) for v in sec['stage2_speedup_each_segment'])} |",
        f"| loader headroom estimated inside the training run (worker busy time) | "
        f"{_fmt(sec['loader_headroom_in_run_estimate'], 1)} |",
        f"| int8 vs float16 cache: relative RMS error of features / attention logits | "
        f"{_fmt(sec['int8_error']['features']['relative_rms'], 4)} / "
        f"{_fmt(sec['int8_error']['attn_logits']['relative_rms'], 4)} |",
        "",
        f"Setup: {r['config']['images']} synthetic JPEGs of "
        f"{r['config']['image_size_range'][0]}-{r['config']['image_size_range'][1]} px, "
        f"K = {r['config']['targets']['views']} views, stage-1 batch "
        f"{r['config']['targets']['batch_size']}, stage-1 plan {raw['stage1_plan']}; training "
        f"batch {r['config']['train']['batch_size']}, {r['config']['train']['segments_per_mode']} "
        f"segments of {r['config']['train']['epochs']} epoch(s) per mode run cached/online "
        f"alternately, {r['config']['train']['num_workers']} loader worker(s), the median "
        f"step rate after the first {r['config']['train']['warmup_steps_excluded']} steps of "
        f"each segment; stage 1 {_fmt(raw['stage1_images_per_s'], 1)} source images/s.",
        "",
        _provenance(r),
    ]
    return "\n".join(lines)


def quality_block(name: str) -> str:
    r = _load(name)
    if r is None:
        if name in ("quality", "quality_reduced"):
            flag = " --reduced" if name.endswith("reduced") else ""
        else:
            flag = f" --config benchmarks/configs/{name}.yaml"
        return f"_No result yet: run `python benchmarks/quality.py{flag}`._"
    tuned = any(row.get("finetune_top1") is not None for row in r["rows"])
    lines = [
        "| row | epochs | seeds | k-NN top-1 | linear top-1 | k-NN cls / mean | "
        "linear cls / mean |" + (" fine-tune top-1 |" if tuned else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if tuned else ""),
    ]
    for row in r["rows"]:
        finetune = ""
        if tuned:
            finetune = (f" {_fmt(row['finetune_top1'])} ± {_fmt(row['finetune_top1_std'])} |"
                        if row.get("finetune_top1") is not None else " n/a |")
        lines.append(
            f"| {row['name']} ({row['description']}) | {row['epochs']} | {len(row['seeds'])} | "
            f"{_fmt(row['knn_top1'])} ± {_fmt(row['knn_top1_std'])} | "
            f"{_fmt(row['linear_top1'])} ± {_fmt(row['linear_top1_std'])} | "
            f"{_fmt(row['knn_cls'])} / {_fmt(row['knn_mean'])} | "
            f"{_fmt(row['linear_cls'])} / {_fmt(row['linear_mean'])} |" + finetune)
    measured = {goal: g for goal, g in r["goals"].items() if g["mean"] is not None}
    if measured:
        lines += ["", "| goal | measured (mean over seeds; per seed) | goal | |",
                  "|---|---|---|---|"]
    for goal, g in measured.items():
        per_seed = ", ".join(f"{v:+.2f}" for v in g["per_seed"])
        lines.append(f"| {goal} | {g['mean']:+.2f} ({per_seed}) | {g['goal']} | "
                     f"{'met' if g['met'] else '**not met**'} |")
    q = r["config"]["quality"]
    steps = r.get("per_seed", {})
    timing = []
    for seed, info in steps.items():
        st = info["steps"]
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in st.items()
                          if k.endswith("_s") and isinstance(v, (int, float)))
        timing.append(f"seed {seed}: {parts}")
    entropy = [f"seed {seed}: {info['steps']['attention_target']['entropy']:.3f}"
               for seed, info in steps.items() if "attention_target" in info["steps"]]
    if entropy:
        a = next(info["steps"]["attention_target"] for info in steps.values()
                 if "attention_target" in info["steps"])
        lines += ["", f"Attention target of the cache (softmax(logits / {a['tau']:g}) over the "
                      f"{a['num_patches']} patches, cls row + top-{a['k']} rows, mean entropy; "
                      f"a uniform map has {a['uniform_entropy']:.3f} nats): "
                      + "; ".join(entropy) + " nats."]
    lines += [
        "",
        f"± is the sample standard deviation over seeds (0 with one seed). Evaluation: "
        f"{q['eval_train']} training images (k-NN bank / probe training), {q['eval_test']} "
        f"test images; k in {q['knn_k']}, T in {q['knn_temperature']}, probe lr in "
        f"{q['linear_lrs']} ({q['linear_epochs']} epochs) and the headline read-out chosen "
        f"per model on a {q['holdout_fraction']:.0%} held-out split of those training images.",
        "",
        "Time per step: " + "; ".join(timing) + ".",
        "",
        _provenance(r),
    ]
    return "\n".join(lines)


def sweep_block() -> str:
    r = _load("quality_sweep")
    if r is None:
        return "_No result yet: run `python benchmarks/quality.py --sweep`._"
    lines = ["| stage | setting | held-out k-NN top-1 | held-out linear top-1 |",
             "|---|---|---|---|"]
    for stage, entries in r["stages"].items():
        for setting, score in entries.items():
            lines.append(f"| {stage} | {setting} | {_fmt(score['knn_holdout'])} | "
                         f"{_fmt(score['linear_holdout'])} |")
    lines += ["", f"Chosen: {r['chosen']} (by {r['selection_metric']}).", "",
              _provenance(r)]
    return "\n".join(lines)


def views_block(name: str = "views") -> str:
    """The view-diversity study (benchmarks/views.py): one line per row, the chosen setting
    and its rule."""
    r = _load(name)
    if r is None:
        return "_No result yet: run `python benchmarks/views.py`._"
    rows, chosen = r["rows"], r["chosen"]
    ref = next((row for row in rows if row["name"] == chosen["reference"]), None)

    def cell(row: dict, metric: str) -> str:
        if row.get(metric) is None:
            return "n/a"
        text = f"{_fmt(row[metric])} ± {_fmt(row[metric + '_std'])}"
        if ref is not None and row is not ref and ref.get(metric) is not None:
            text += f" ({row[metric] - ref[metric]:+.2f})"
        return text

    lines = [
        "| row | K | view selection | online fraction | epochs | replays per cached view | "
        "base forwards per image | seeds | k-NN top-1 | linear top-1 | fine-tune top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        replays = row.get("epochs_per_cached_view")
        lines.append(
            f"| {row['name']} | {row['views'] if row['views'] is not None else '-'} | "
            f"{row['view_selection'] or '-'} | {row['online_fraction']:g} | {row['epochs']} | "
            f"{_fmt(replays, 1) if replays is not None else '-'} | "
            f"{row['base_forwards_per_image']:g} | {len(row['seeds'])} | "
            f"{cell(row, 'knn_top1')} | {cell(row, 'linear_top1')} | "
            f"{cell(row, 'finetune_top1')} |")
    base = r.get("base") or {}
    if base:
        checkpoint = Path(base["checkpoint"])
        if checkpoint.is_relative_to(REPO_ROOT):  # the shipped strong base: a repository path
            checkpoint = checkpoint.relative_to(REPO_ROOT)
        lines += ["", f"Base model ({base.get('epochs')} epochs, `{checkpoint}`): k-NN "
                      f"{_fmt(base.get('knn_top1'))}, linear {_fmt(base.get('linear_top1'))}"
                      + (f", fine-tune {_fmt(base['finetune_top1'])}"
                         if base.get("finetune_top1") is not None else "") + "."]
    if chosen.get("row"):
        deltas = ", ".join(f"{m} {d:+.2f}" for m, d in chosen["deltas"].items())
        lines += ["", f"**Chosen: K = {chosen['views']}, view_selection "
                      f"{chosen['view_selection']}, online_fraction "
                      f"{chosen['online_fraction']:g}** (row {chosen['row']}; vs fully online: "
                      f"{deltas}; {chosen['why']})."]
    else:
        lines += ["", f"**Chosen: none** ({chosen['why']})."]
    steps = r.get("steps", {})
    a = steps.get("attention_target")
    if a:
        lines += ["", f"Attention target of the K = {steps.get('source_views')} cache"
                      f" (softmax(logits / {a['tau']:g}), cls + top-{a['k']} rows, mean "
                      f"entropy): {a['entropy']:.3f} nats; a uniform map has "
                      f"{a['uniform_entropy']:.3f}."]
    lines += ["", "In parentheses: the difference to the fully online row. ± is the sample "
                  "standard deviation over seeds (0 with one seed). Rule of the choice: "
                  + chosen["rule"], "", _provenance(r)]
    return "\n".join(lines)


def storage_block() -> str:
    r = _load("storage")
    if r is None:
        return "_No result yet: run `python benchmarks/storage_bench.py`._"
    from storage_bench import markdown

    return markdown(r) + "\n\n" + _provenance(r)


def loader_block() -> str:
    r = _load("loader")
    if r is None:
        return "_No result yet: run `python benchmarks/loader.py`._"
    from loader import markdown

    return markdown(r) + "\n\n" + _provenance(r)


BLOCKS = {
    "speed": speed_block,
    "quality": lambda: quality_block("quality"),
    "quality_reduced": lambda: quality_block("quality_reduced"),
    "quality_sweep": sweep_block,
    "quality_long": lambda: quality_block("quality_long"),
    "quality_strong_base": lambda: quality_block("quality_strong_base"),
    "storage": storage_block,
    "views": views_block,
    "loader": loader_block,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print instead of editing README")
    args = parser.parse_args(argv)
    rendered = {name: fn() for name, fn in BLOCKS.items()}
    if args.print:
        for name, text in rendered.items():
            print(f"## {name}\n\n{text}\n")
        return 0
    text = README.read_text()
    for name, block in rendered.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            print(f"README has no block {name}; skipped", file=sys.stderr)
            continue
        text = pattern.sub(lambda m, b=block: m.group(1) + b + "\n" + m.group(2), text)
    README.write_text(text)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
