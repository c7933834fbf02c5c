"""Every command the README shows is run by a test, as written.

``readme_commands()`` collects each command line of the README's ```bash blocks. Each must be
claimed by exactly one entry of ``COVERED`` (a pattern and the test below that runs it); a
command added to the README without a test fails ``test_every_readme_command_is_run_by_a_test``.
Commands run as written; only what a miniature needs changes: the config file and run name of
an ImageNet example, the rank count, host:port placeholders, and tiny budgets through ``--set``.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from image_helpers import make_shards
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin: tec, torchrun, ray


def readme_commands(text: str | None = None) -> list[str]:
    """The command lines of the README's ```bash blocks (comments and blank lines dropped)."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line.strip()).strip()
            if line.endswith("\\"):  # a continued command: join with the next line
                pending += line[:-1].strip() + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line:
                commands.append(line)
    return commands


# (pattern a README command matches, the test of this module that runs it)
COVERED: list[tuple[str, str]] = [
    (r"apt-get update && .* && \.venv/bin/tec run pipeline\.yaml", "test_quickstart_run"),
    (r"apt-get update && .* && \.venv/bin/python -m pytest",
     "test_quickstart_tests_are_what_ci_runs"),
    (r"\.venv/bin/python -m pytest( -m slow)?", "test_quickstart_tests_are_what_ci_runs"),
    (r"bash \.ci/run", "test_quickstart_tests_are_what_ci_runs"),
    (r"tec train \S+ \S+ --nproc-per-node \d+", "test_tec_train_launches_ranks"),
    (r"torchrun --nproc-per-node \d+ -m pipeline\.cli train \S+ \S+", "test_torchrun_command"),
    (r"tec run pipeline\.yaml --set .*", "test_configuration_override"),
    (r"tec cache (inspect|verify|verify --deep|repair) \S+", "test_cache_commands"),
    (r"tec cache transcode \S+ \S+ --codec .*", "test_cache_commands"),
    (r"(RAY_AUTH\S+ )+ray (get-auth-token|start) .*", "test_ray_cluster_commands"),
    (r"RAY_AUTH_TOKEN_PATH=\S+ tec targets .*", "test_ray_cluster_commands"),
]


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert len(commands) >= 10, commands
    for command in commands:
        claims = [name for pattern, name in COVERED if re.fullmatch(pattern, command)]
        assert claims, f"README command without a test in tests/test_readme.py: {command}"
        assert len(set(claims)) == 1, f"{command} is claimed by several tests: {claims}"
    names = {name for _, name in COVERED}
    assert names <= set(globals()), sorted(names - set(globals()))


def test_readme_commands_parser():
    text = ("x\n```bash\n# comment\ntec a b   # trailing\n\n  tec c \\\n    --d e   # c\n```\n"
            "```python\nno\n```\n")
    assert readme_commands(text) == ["tec a b", "tec c --d e"]


def _command(pattern: str) -> str:
    found = [c for c in readme_commands() if re.fullmatch(pattern, c)]
    assert len(found) == 1, (pattern, found)
    return found[0]


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(extra)
    return env


def _sh(command: str, cwd: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """Run one README command line through the shell, with this venv's bin first on PATH."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# --------------------------------------------------------------------------- Quickstart
def test_quickstart_tests_are_what_ci_runs():
    """CI runs the Quickstart's test command verbatim (in a fresh .venv), then the slow tests."""
    ci = (REPO / ".ci" / "run").read_text()
    quick = _command(r"apt-get update && .* && \.venv/bin/python -m pytest")
    assert quick in ci.splitlines(), "the README's test command is not a line of .ci/run"
    assert "python3 -m venv .venv" in quick and '.venv/bin/pip install -e ".[test]"' in quick
    assert "rm -rf .venv" in ci  # fresh: the packages tested are the ones pip resolves
    assert ".venv/bin/python -m pytest -m slow" in ci
    run = _command(r"apt-get update && .* && \.venv/bin/tec run pipeline\.yaml")
    # the two Quickstart commands set up the same environment (the run adds the dataset)
    assert run.split(" && ")[2] == quick.split(" && ")[2] == "python3 -m venv .venv"
    assert run.split(" && ")[3] == ".venv/bin/pip install -e ."


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it (gzip, big-endian header)."""
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(idx_dir: Path, n_train: int = 96, n_test: int = 32) -> Path:
    """Fashion-MNIST-shaped IDX files (28 x 28 uint8, 10 classes) with class-dependent images."""
    idx_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, label in enumerate(labels):  # a bright bar whose place depends on the class
            images[i, 2 + 2 * label: 5 + 2 * label, 4:24] += 180
        _write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return idx_dir


def _tiny_sets(config: Path) -> list[str]:
    """--set overrides that shrink the embedded default to seconds, for every run it has."""
    raw = yaml.safe_load(config.read_text())
    sets = ["data.idx_dir=idx", "data.train_limit=96", "data.shard_size=48",
            "bootstrap.run.epochs=1", "bootstrap.run.batch_size=32", "bootstrap.run.num_workers=0",
            "targets.batch_size=32", "targets.ray.num_cpus=1",
            "eval.linear_epochs=1", "eval.test_limit=32", "eval.viz_images=2"]
    for i, _ in enumerate(raw.get("runs") or []):
        sets += [f"runs.{i}.epochs=1", f"runs.{i}.batch_size=32", f"runs.{i}.num_workers=0"]
    finetune = (raw.get("eval") or {}).get("finetune")
    if isinstance(finetune, dict) and finetune.get("enabled"):
        sets += ["eval.finetune.epochs=1", "eval.finetune.batch_size=32"]
    return sets


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The embedded default's workspace after the Quickstart's `tec run pipeline.yaml`."""
    ws = tmp_path_factory.mktemp("quickstart")
    (ws / "pipeline.yaml").write_text((REPO / "pipeline.yaml").read_text())
    _fake_fashion_mnist(ws / "idx")
    run = _command(r"apt-get update && .* && \.venv/bin/tec run pipeline\.yaml").split(" && ")[-1]
    assert run == ".venv/bin/tec run pipeline.yaml"
    sets = _tiny_sets(ws / "pipeline.yaml")
    # the venv the Quickstart made is this interpreter's: `.venv/bin/tec` is BIN/tec
    command = run.replace(".venv/bin/tec", shlex.quote(str(BIN / "tec")))
    proc = _sh(command + "".join(f" --set {s}" for s in sets), ws)
    return ws, sets, proc


@pytest.mark.slow
def test_quickstart_run(quickstart):
    ws, _, proc = quickstart
    out = _ok(proc)
    raw = yaml.safe_load((ws / "pipeline.yaml").read_text())
    for name in ["base", *[r["name"] for r in raw["runs"]]]:
        assert re.search(rf"^\|? *{re.escape(name)}\b", out, flags=re.M), (name, out[-3000:])
    assert (ws / raw["workdir"] / "attention.png").is_file()


@pytest.mark.slow
def test_cache_commands(quickstart):
    ws, _, proc = quickstart
    _ok(proc)
    for pattern in (r"tec cache inspect \S+", r"tec cache verify \S+",
                    r"tec cache verify --deep \S+", r"tec cache transcode \S+ \S+ --codec .*"):
        command = _command(pattern)
        out = _ok(_sh(command, ws))
        assert "runs/fashion-mnist/cache" in command and out.strip(), out
    transcoded = shlex.split(_command(r"tec cache transcode \S+ \S+ --codec .*"))[4]
    _ok(_sh(f"tec cache verify {transcoded}", ws))
    # repair: damage one committed part's data, then the README's command makes verify pass
    cache = ws / "runs" / "fashion-mnist" / "cache"
    _ok(_sh(f"tec cache verify {cache}", ws))
    victim = max((p for p in (cache / "parts").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert _sh(f"tec cache verify {cache}", ws).returncode != 0
    _ok(_sh(_command(r"tec cache repair \S+"), ws))
    _ok(_sh(_command(r"tec cache verify --deep \S+"), ws))


@pytest.mark.slow
def test_configuration_override(quickstart):
    """The Configuration section's `tec run ... --set targets.views=4 ...` after a first run:
    a new cache with 4 views, and the runs trained from it (not the first run's models)."""
    ws, sets, proc = quickstart
    _ok(proc)
    command = _command(r"tec run pipeline\.yaml --set .*")
    out = _ok(_sh(command + "".join(f" --set {s}" for s in sets if s != "runs.0.epochs=1"),
                  ws))
    cache = re.search(r"targets\.cache=(\S+)", command).group(1)
    manifest = json.loads((ws / cache / "manifest.json").read_text())
    assert manifest["view_policy"]["views"] == 4, manifest["view_policy"]
    assert "reused finished run" not in out, out[-3000:]


# --------------------------------------------------------------------------- stage 2, DDP
ARCH = "vit_base_patch16_224"
GEOMETRY = {"img_size": 32, "patch_size": 8, "embed_dim": 40, "depth": 3, "num_heads": 2}


@pytest.fixture(scope="module")
def ddp_workspace(tmp_path_factory) -> Path:
    """A tiny config with a finished stage 1: what `tec train` needs."""
    ws = tmp_path_factory.mktemp("ddp")
    make_shards(ws / "shards", n_shards=2, per_shard=8, size_range=(28, 40), prefix="train")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **GEOMETRY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(ws / "base.safetensors"))
    run = {"epochs": 1, "batch_size": 8, "num_workers": 0, "device": "cpu",
           "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "decoder_embed_dim": 32,
                     "decoder_depth": 1, "decoder_num_heads": 2, "k": 4}}
    raw = {
        "workdir": "work",
        "data": {"train": str(ws / "shards" / "train-{000000..000001}.tar")},
        "base_model": {"arch": ARCH, "checkpoint": str(ws / "base.safetensors"),
                       "timm_kwargs": dict(GEOMETRY)},
        "targets": {"views": 2, "k_max": 8, "batch_size": 8, "view_policy": {"output_size": 32},
                    "ray": {"num_cpus": 1}},
        "runs": [{"name": "tec_a", **run}, {"name": "tec_b", **run}, {"name": "tec_c", **run}],
        "eval": {"enabled": False},
    }
    (ws / "config.yaml").write_text(yaml.safe_dump(raw))
    _ok(_sh(f"{shlex.quote(str(BIN / 'tec'))} targets config.yaml", ws))
    return ws


def _one_summary(out: str, run: str, world: int) -> None:
    """Only rank 0 printed the summary, and it names the world size."""
    lines = [line for line in out.splitlines() if line.startswith("run ")]
    assert len(lines) == 1, out[-3000:]
    assert f"{run} ({world} process(es)" in lines[0], lines[0]
    assert "export         None" not in out


@pytest.mark.slow
def test_torchrun_command(ddp_workspace):
    command = _command(r"torchrun --nproc-per-node \d+ -m pipeline\.cli train \S+ \S+")
    argv = shlex.split(command)
    assert argv[:6] == ["torchrun", "--nproc-per-node", argv[2], "-m", "pipeline.cli", "train"]
    argv[2], argv[6], argv[7] = "2", "config.yaml", "tec_a"  # the miniature's config and run
    argv[0] = str(BIN / "torchrun")
    out = _ok(_sh(shlex.join(argv), ddp_workspace, OMP_NUM_THREADS="1"))
    _one_summary(out, "tec_a", 2)
    assert (ddp_workspace / "work" / "runs" / "tec_a" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_tec_train_launches_ranks(ddp_workspace):
    command = _command(r"tec train \S+ \S+ --nproc-per-node \d+")
    argv = shlex.split(command)
    argv[0], argv[2], argv[3], argv[5] = str(BIN / "tec"), "config.yaml", "tec_b", "2"
    out = _ok(_sh(shlex.join(argv), ddp_workspace, OMP_NUM_THREADS="1"))
    _one_summary(out, "tec_b", 2)


def readme_python_snippets() -> list[str]:
    text = README.read_text()
    return [textwrap.dedent(block) for block in
            re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, flags=re.S | re.M)]


@pytest.mark.slow
def test_export_snippet(ddp_workspace):
    """The Exports snippet, as written, builds the exported model with timm (paths of the
    miniature's run in place of the ImageNet example's)."""
    _ok(_sh(f"{shlex.quote(str(BIN / 'tec'))} train config.yaml tec_c", ddp_workspace))
    export = ddp_workspace / "work" / "runs" / "tec_c" / "export"
    (snippet,) = readme_python_snippets()
    info_path = re.search(r'open\("([^"]+model\.json)"\)', snippet).group(1)
    file_path = re.search(r'file="([^"]+model\.safetensors)"', snippet).group(1)
    code = snippet.replace(info_path, str(export / "model.json")).replace(
        file_path, str(export / "model.safetensors"))
    code += ("\nimport torch\n"
             "out = model.eval()(torch.zeros(1, 3, 32, 32))\n"
             "print('FEATURES', tuple(out.shape))\n")
    out = _ok(subprocess.run([sys.executable, "-c", code], cwd=ddp_workspace, env=_env(),
                             capture_output=True, text=True, timeout=300))
    assert "FEATURES (1, 48)" in out, out


def test_torchrun_passes_the_train_arguments_through():
    """torchrun's own parser must not claim any option of `tec train` (it claimed `--run`)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(
        ["--nproc-per-node", "2", "-m", "pipeline.cli", "train", "c.yaml", "tec",
         "--set", "runs.tec.epochs=1", "--allow-pickle"])
    assert args.training_script_args == ["train", "c.yaml", "tec", "--set", "runs.tec.epochs=1",
                                         "--allow-pickle"]


# --------------------------------------------------------------------------- Ray cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_commands(port: int) -> list[str]:
    """The README's Ray-cluster lines on this machine: HEAD is 127.0.0.1, the port is free,
    ray start stays in the foreground (--block) so the test can stop exactly its processes."""
    lines = [c for c in readme_commands()
             if re.fullmatch(r"(RAY_AUTH\S+ )+ray (get-auth-token|start) .*", c)
             or re.fullmatch(r"RAY_AUTH_TOKEN_PATH=\S+ tec targets .*", c)]
    assert len(lines) == 4, lines
    out = []
    for line in lines:
        line = line.replace("HEAD:6379", f"127.0.0.1:{port}").replace("--port 6379",
                                                                     f"--port {port}")
        if " ray start " in f" {line}":
            line += (" --block --node-ip-address=127.0.0.1 --num-cpus=1"
                     " --include-dashboard=false --disable-usage-stats")
        out.append(line)
    return out


@pytest.mark.slow
def test_ray_cluster_commands(ddp_workspace, tmp_path):
    """The README's cluster recipe: token on the head, a worker node and the driver join with
    the copied token file; stage 1 runs on that cluster."""
    port = _free_port()
    generate, head_cmd, worker_cmd, driver_cmd = _ray_commands(port)
    home = tmp_path / "home"  # the head's ~ (its ~/.ray/auth_token)
    home.mkdir()
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    subprocess.run(["bash", "-c", generate], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.read_text().strip()
    (ddp_workspace / "auth_token").write_text(token.read_text())  # "copy its token"
    procs = []
    try:
        procs.append(subprocess.Popen(["bash", "-c", head_cmd], cwd=tmp_path, env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert procs[0].poll() is None and time.time() < deadline, "head did not start"
                time.sleep(0.2)
        other = {**env, "HOME": str(tmp_path / "elsewhere")}  # another machine: no ~/.ray token
        procs.append(subprocess.Popen(["bash", "-c", worker_cmd], cwd=ddp_workspace, env=other,
                                      start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        config = driver_cmd.split(" tec targets ")[1].split()[0]
        cmd = driver_cmd.replace(config, "config.yaml").replace(
            "tec targets", f"{shlex.quote(str(BIN / 'tec'))} targets")
        cmd += " --set targets.cache=work/cluster_cache"
        out = subprocess.run(["bash", "-c", cmd], cwd=ddp_workspace, env=other,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert (ddp_workspace / "work" / "cluster_cache" / "manifest.json").is_file()
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
