"""The `tec` command: help texts, and bad configuration / CLI input.

Every bad input must end with exit code != 0, ONE line on stderr (``error: ...``) that names the key
or file at fault, and no traceback. The cases are data (``BAD_INPUT_CASES``) so that a reliability
script can run them all and count tried / passed::

    from cli_helpers import BAD_INPUT_CASES, make_workspace, run_bad_input
    ws = make_workspace(Path(tmp))
    results = [run_bad_input(case, ws) for case in BAD_INPUT_CASES]   # (ok, detail) each

Most cases run in-process with click's CliRunner (fast); a few run ``tec`` as a subprocess to prove
that a real process prints no traceback.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import (
    BAD_INPUT_CASES,
    SUBPROCESS_CASES,
    case_argv,
    make_workspace,
    run_bad_input,
    run_bad_inputs_in_processes,
    tiny_pipeline,
)
from click.testing import CliRunner

from pipeline.cli import main


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("TEC_DEBUG", raising=False)


def test_enough_bad_input_cases():
    assert len(BAD_INPUT_CASES) >= 20
    names = [c.name for c in BAD_INPUT_CASES]
    assert len(set(names)) == len(names), "case names must be unique"
    assert set(SUBPROCESS_CASES) <= set(names)


def test_the_tiny_pipeline_is_valid(ws):
    """The cases' starting point is fine, so each case fails for its own reason only."""
    path = ws / "valid.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(ws)))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "bytes per view" in result.stdout


@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c.name for c in BAD_INPUT_CASES])
def test_bad_input(case, ws):
    ok, detail = run_bad_input(case, ws)
    if not ok and case.known_bug:
        pytest.xfail(case.known_bug)
    assert ok, f"{case.name}: {detail}"


def test_bad_input_in_real_processes(ws):
    cases = [c for c in BAD_INPUT_CASES if c.name in SUBPROCESS_CASES]
    for case, (ok, detail) in zip(cases, run_bad_inputs_in_processes(cases, ws)):
        assert ok, f"{case.name}: {detail}"


def test_debug_env_shows_the_traceback(ws, monkeypatch):
    monkeypatch.setenv("TEC_DEBUG", "1")
    result = CliRunner().invoke(main, ["cache", "inspect", str(ws / "notacache")])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


def test_allow_pickle_flag_loads_a_pickled_checkpoint(ws):
    """The pickle error points at base_model.allow_pickle / --allow-pickle; both work."""
    case = next(c for c in BAD_INPUT_CASES
                if c.name == "pickled base checkpoint without allow_pickle")
    argv = case_argv(case, ws, "allow_pickle")
    # with the flag the checkpoint loads and stage 1 gets as far as the (mismatching) view size
    for extra in (["--allow-pickle"], ["--set", "base_model.allow_pickle=true"]):
        result = CliRunner().invoke(main, [*argv, *extra, "--set",
                                           "targets.view_policy.output_size=48"])
        assert result.exit_code == 2, result.output
        assert "output_size" in result.stderr and "allow_pickle" not in result.stderr


def test_usage_errors_exit_2_without_traceback(ws):
    runner = CliRunner()
    for argv in (["plan"], ["nosuch-command"], ["train"],
                 ["run", str(ws / "x.yaml"), "--only", "bogus"], ["plan", str(ws)],
                 ["cache", "inspect"], ["data", "fashion-mnist"]):
        result = runner.invoke(main, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output and "Error:" in result.output


# ----------------------------------------------------------------------------- help
SUBCOMMANDS = [
    ["run"], ["plan"], ["targets"], ["train"], ["export"],
    ["cache"], ["cache", "inspect"], ["cache", "verify"], ["cache", "repair"],
    ["cache", "transcode"], ["cache", "subset"], ["cache", "extend"],
    ["data"], ["data", "fashion-mnist"],
    ["eval"], ["eval", "knn"], ["eval", "linear"], ["eval", "finetune"],
    ["viz"], ["viz", "attention"],
]


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("run", "plan", "targets", "train", "export", "cache", "data", "eval", "viz"):
        assert f"  {name} " in result.output
    assert "stage 1" in result.output.lower() and "stage 2" in result.output.lower()
    assert CliRunner().invoke(main, ["-h"]).exit_code == 0


def test_every_command_is_listed_in_the_tests():
    import click

    found = []

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            found.append([*prefix, name])
            if isinstance(sub, click.Group):
                walk(sub, [*prefix, name])

    walk(main, [])
    assert sorted(map(tuple, found)) == sorted(map(tuple, SUBCOMMANDS))


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=[" ".join(a) for a in SUBCOMMANDS])
def test_subcommand_help(argv):
    result = CliRunner().invoke(main, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("Usage: ") and f" {argv[-1]}" in out.splitlines()[0]
    # a description beyond the usage line and the options
    body = out.split("Options:")[0].splitlines()[1:]
    assert sum(len(line.split()) for line in body) >= 5, out
    assert "--help" in out


@pytest.mark.parametrize("argv, needle", [
    (["run"], "--set"), (["plan"], "--set"), (["targets"], "--ray-address"),
    (["train"], "RUN"), (["train"], "--nproc-per-node"), (["train"], "torchrun"),
    (["export"], "--keep-adapters"),
    (["targets"], "--allow-pickle"), (["eval", "knn"], "--temperature"),
    (["data", "fashion-mnist"], "--idx-dir"),
])
def test_help_mentions_options(argv, needle):
    assert needle in CliRunner().invoke(main, [*argv, "--help"]).output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "0." in result.output


def test_nproc_per_node_inside_torchrun_is_refused(tmp_path):
    """`tec train ... --nproc-per-node N` under torchrun would launch ranks from every rank."""
    result = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "tec",
                                       "--nproc-per-node", "2"], env={"LOCAL_RANK": "0"})
    assert result.exit_code == 2
    assert "inside torchrun" in result.output
