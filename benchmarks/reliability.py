"""Reliability suite: run every fault-injection test (slow ones included) and count the cases.

    python benchmarks/reliability.py              # everything, ~10-15 min on a 2-core CPU
    python benchmarks/reliability.py --fast       # the default-run cases only (~1-2 min)
    python benchmarks/reliability.py --no-readme  # leave benchmarks/README.md alone

Runs ``tests/test_reliability_*.py`` with pytest in this process and collects, for every test,
its category (``reliability_helpers.category``), its outcome and what it recorded
(``record_cases`` / ``record_details``). Counts therefore come from real runs:

* a test that checks several sub-cases (e.g. one per bad sample of a shard) counts each;
* any other test counts as one case; an expected failure (``xfail(strict=True)``: a known bug
  outside the test suite) counts as tried and not passed, with its reason listed.

Writes ``benchmarks/results/reliability.json``::

    {..common header.., "categories": {"stage1_crashes": {"tried": N, "passed": M,
     "cases": [...]}, "bad_input": ..., "damaged_caches": ..., "stage2_crashes": ...,
     "bad_config": ..., "untrusted_files": ..., "duplicate_keys": ..., "missing_records": ...,
     "stale_reuse": ..., "deterministic_failures": ..., "deep_damage": ...}, "known_bugs": [...],
     "pytest_exit_code": 0}

and the table between ``<!-- BEGIN reliability -->`` / ``<!-- END reliability -->`` in
``benchmarks/README.md``. Like the other benchmarks it reports and never asserts; the exit code
is non-zero only when pytest itself could not run (usage or collection error).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, result_header, setup_logging, write_result  # noqa: E402

README = REPO_ROOT / "benchmarks" / "README.md"
TEST_GLOB = "tests/test_reliability_*.py"
CATEGORIES = {
    "stage1_crashes": "stage 1: SIGKILL of the driver / Ray workers at random points, resume; "
                      "cache bit-identical to an uninterrupted run",
    "bad_input": "stage 1 over shards of broken / odd / malicious samples: good ones cached, "
                 "bad ones listed with their reason",
    "damaged_caches": "flipped bytes, truncated files, deleted parts, edited manifests, "
                      "another base model: `tec cache verify` and `tec train`",
    "stage2_crashes": "stage 2: SIGKILL at random steps / mid-checkpoint and a full disk, "
                      "resume; weights identical to an uninterrupted run",
    "bad_config": "bad configuration and CLI input: exit != 0, one line naming the key or file",
    "untrusted_files": "pickles in shards, base-model and training checkpoints, indexes: "
                       "never unpickled without an explicit opt-in",
    "duplicate_keys": "shards sharing member names, image folders with x.jpg beside x.png: "
                      "every sample cached under its own key, never two samples on one record",
    "missing_records": "a committed part lacking records for its shard (a part folder linked "
                       "to another): refused naming the part, or counted fall-backs to online",
    "stale_reuse": "`tec run` after the cache, base model or a run setting changed: trains "
                   "anew and says what changed, never old results for new settings",
    "deterministic_failures": "failures a retry cannot change (a base model giving NaN): "
                              "fail once, say what to change, never 'rerun to resume'",
    "deep_damage": "records that keep their checksums but do not decode or hold NaN/inf: "
                   "`tec cache verify --deep` names the part, `tec cache repair` fixes it",
}


class Collector:
    """pytest plugin: outcome, duration, category and recorded properties of every test."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}
        self.categories: dict[str, str | None] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            fn = getattr(item, "function", None)
            self.categories[item.nodeid] = getattr(fn, "reliability_category", None)

    def pytest_runtest_logreport(self, report) -> None:
        rec = self.tests.setdefault(report.nodeid, {
            "test": report.nodeid, "category": self.categories.get(report.nodeid),
            "outcome": None, "duration_s": 0.0, "properties": {}})
        rec["duration_s"] += report.duration
        for name, value in report.user_properties:
            rec["properties"][name] = value
        xfail = getattr(report, "wasxfail", None)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.passed:
                rec["outcome"] = "xpassed" if xfail is not None else "passed"
            elif report.skipped:
                rec["outcome"] = "xfailed" if xfail is not None else "skipped"
            else:
                rec["outcome"] = "failed" if report.when == "call" else "error"
            if xfail is not None or "XPASS(strict)" in str(report.longrepr or ""):
                rec["xfail_reason"] = (xfail or str(report.longrepr)).removeprefix("reason: ")
            if report.failed:
                rec["failure"] = _short_failure(report)
        elif report.when == "teardown" and report.failed and rec["outcome"] == "passed":
            rec["outcome"] = "error"
            rec["failure"] = _short_failure(report)


def _short_failure(report) -> str:
    text = str(report.longrepr or "")
    lines = [line for line in text.splitlines() if line.startswith("E ")]
    return "\n".join(lines[:12]) if lines else text[-1500:]


def _short_id(nodeid: str) -> str:
    return nodeid.split("/")[-1]


def summarize(tests: list[dict]) -> tuple[dict, list[dict]]:
    """Per-category {tried, passed, cases} and the known bugs (expected failures)."""
    categories = {name: {"what": what, "tried": 0, "passed": 0, "seconds": 0.0, "cases": []}
                  for name, what in CATEGORIES.items()}
    known_bugs = []
    for rec in tests:
        if rec.get("xfail_reason") and rec["outcome"] in ("xfailed", "failed"):
            known_bugs.append({"test": _short_id(rec["test"]), "category": rec["category"],
                               "reason": rec["xfail_reason"], "outcome": rec["outcome"]})
        cat = rec["category"]
        if cat is None or rec["outcome"] in (None, "skipped"):
            continue
        ok = rec["outcome"] in ("passed", "xpassed")
        sub = rec["properties"].get("reliability_cases")
        if sub:
            tried, passed = int(sub["tried"]), int(sub["passed"])
            if not ok:
                passed = min(passed, tried - 1)
        else:
            tried, passed = 1, int(ok)
        case = {"test": _short_id(rec["test"]), "outcome": rec["outcome"], "tried": tried,
                "passed": passed, "seconds": round(rec["duration_s"], 2)}
        if sub and sub.get("failed"):
            case["failed_sub_cases"] = sub["failed"]
        if rec["properties"].get("reliability_details"):
            case["details"] = rec["properties"]["reliability_details"]
        if rec.get("xfail_reason"):
            case["known_bug"] = rec["xfail_reason"]
        if rec.get("failure") and not rec.get("xfail_reason"):
            case["failure"] = rec["failure"]
        c = categories[cat]
        c["tried"] += tried
        c["passed"] += passed
        c["seconds"] = round(c["seconds"] + rec["duration_s"], 1)
        c["cases"].append(case)
    return categories, known_bugs


def crash_facts(categories: dict) -> dict:
    """Kill points and parts / steps recomputed per crash, pulled out of the case details."""
    stage1, stage2 = [], []
    for case in categories["stage1_crashes"]["cases"]:
        d = case.get("details") or {}
        if d:
            stage1.append({k: d.get(k) for k in (
                "seed", "killed", "kill_point", "kill_at_base_model_call", "committed_at_kill",
                "in_flight_at_kill", "parts_recomputed", "identical") if k in d})
    for case in categories["stage2_crashes"]["cases"]:
        d = case.get("details") or {}
        for kill in d.get("kills", []):
            stage2.append({**{k: kill.get(k) for k in ("seed", "phase", "step")},
                           "resumed_from_step": kill.get("checkpoint_after_kill"),
                           "steps_recomputed": kill.get("steps_recomputed")})
        if "failed_checkpoint_step" in d:
            stage2.append({"full_disk_at_checkpoint_step": d["failed_checkpoint_step"],
                           "resumed_from_step": d.get("resumed_from_step"),
                           "steps_recomputed": d.get("steps_recomputed")})
    return {"stage1": stage1, "stage2": stage2}


def readme_table(result: dict) -> str:
    cats = result["categories"]
    git = result.get("git", {})
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty tree)" if git.get("dirty") else "")
    scope = "default-run cases only" if result["fast"] else "slow cases included"
    lines = [
        f"Measured {result['created']} on {result['device']}, commit {commit}, "
        f"{result['runtime_s'] / 60:.1f} min ({scope}).",
        "",
        "| category | what is tried | tried | passed |",
        "|---|---|---:|---:|",
    ]
    for name, c in cats.items():
        lines.append(f"| `{name}` | {c['what']} | {c['tried']} | {c['passed']} |")
    total_t = sum(c["tried"] for c in cats.values())
    total_p = sum(c["passed"] for c in cats.values())
    lines.append(f"| **all** | | **{total_t}** | **{total_p}** |")
    facts = result.get("crashes", {})
    if facts.get("stage1"):
        lines += ["", "Stage-1 crashes (parts recomputed: parts whose work was lost with the "
                  "killed process and done again; committed parts are never recomputed):", "",
                  "| seed | killed | at | parts committed at kill | in flight | recomputed | "
                  "identical cache |", "|---:|---|---|---:|---|---:|---|"]
        for k in facts["stage1"]:
            at = k.get("kill_point") or {"base-model call": k.get("kill_at_base_model_call")}
            at = ", ".join(f"{a}={b}" for a, b in at.items())
            in_flight = len(k.get("in_flight_at_kill") or [])
            lines.append(f"| {k.get('seed')} | {k.get('killed', 'shard task (no Ray)')} | {at} | "
                         f"{k.get('committed_at_kill')} | {in_flight} | "
                         f"{k.get('parts_recomputed')} | {k.get('identical', True)} |")
    if facts.get("stage2"):
        lines += ["", "Stage-2 crashes (12 steps, checkpoints at steps 4, 5, 8, 10, 12):", "",
                  "| kill | resumed from step | steps recomputed |", "|---|---:|---:|"]
        for k in facts["stage2"]:
            if "full_disk_at_checkpoint_step" in k:
                what = f"ENOSPC half-way through checkpoint {k['full_disk_at_checkpoint_step']}"
            else:
                what = f"SIGKILL, {k['phase']} of step {k['step']} (seed {k['seed']})"
            recomputed = k.get("steps_recomputed")
            lines.append(f"| {what} | {k.get('resumed_from_step') or 'start (no checkpoint)'} | "
                         f"{'n/a' if recomputed is None else recomputed} |")
    if result["known_bugs"]:
        lines += ["", "Known bugs (tests marked `xfail(strict=True)`; each counts as tried, not "
                  "passed, where it has a category):", ""]
        for bug in result["known_bugs"]:
            lines.append(f"- `{bug['test']}`: {bug['reason']}")
    failed = [c for cat in cats.values() for c in cat["cases"]
              if c["outcome"] in ("failed", "error") and "known_bug" not in c]
    if failed:
        lines += ["", "Unexpected failures:", ""]
        lines += [f"- `{c['test']}`" for c in failed]
    return "\n".join(lines)


def update_readme(table: str) -> None:
    text = README.read_text()
    block = f"<!-- BEGIN reliability -->\n{table}\n<!-- END reliability -->"
    pattern = re.compile(r"<!-- BEGIN reliability -->\n.*?<!-- END reliability -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Reliability (`reliability.py`)\n\n" + block + "\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    import pytest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="default-run cases only (no slow)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "reliability.json"))
    parser.add_argument("--no-readme", action="store_true", help="do not update the README table")
    parser.add_argument("-k", default=None, help="pytest -k expression (partial runs)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    os.chdir(REPO_ROOT)
    result = result_header("reliability")
    files = sorted(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob(TEST_GLOB))
    pytest_args = [*files, "-m", "not slow" if args.fast else "slow or not slow",
                   "-p", "no:cacheprovider", "-q", "-rfExX", "--timeout", "900"]
    if args.k:
        pytest_args += ["-k", args.k]
    collector = Collector()
    start = time.perf_counter()
    code = pytest.main(pytest_args, plugins=[collector])
    result["runtime_s"] = round(time.perf_counter() - start, 1)
    result["fast"] = bool(args.fast)
    result["pytest_args"] = pytest_args
    result["pytest_exit_code"] = int(code)
    categories, known_bugs = summarize(list(collector.tests.values()))
    result["categories"] = categories
    # the contract: each category name maps to {"tried": N, "passed": M} at the top level
    result.update({name: {"tried": c["tried"], "passed": c["passed"]}
                   for name, c in categories.items()})
    result["known_bugs"] = known_bugs
    result["crashes"] = crash_facts(categories)
    result["totals"] = {"tried": sum(c["tried"] for c in categories.values()),
                        "passed": sum(c["passed"] for c in categories.values())}
    write_result(result, args.out)
    table = readme_table(result)
    print("\n" + table)
    if not args.no_readme and not args.k:
        update_readme(table)
    return 0 if int(code) in (0, 1) else int(code)


if __name__ == "__main__":
    sys.exit(main())
