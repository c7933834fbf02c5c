"""The `tec` command's bad-input cases and the tiny workspace they run in (tests/test_cli.py).

The cases are data (``BAD_INPUT_CASES``) so that a reliability script can run them all and count
tried / passed::

    from cli_helpers import BAD_INPUT_CASES, make_workspace, run_bad_input
    ws = make_workspace(Path(tmp))
    results = [run_bad_input(case, ws) for case in BAD_INPUT_CASES]   # (ok, detail) each
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from click.testing import CliRunner

from pipeline.cli import main

BASE_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 40, "depth": 3, "num_heads": 2}
ARCH = "vit_base_patch16_224"


# ----------------------------------------------------------------------------- the workspace
def tiny_pipeline(ws: Path) -> dict:
    """A valid tiny pipeline mapping using the workspace's base checkpoint."""
    return {
        "workdir": str(ws / "work"),
        "data": {"train": str(ws / "shards" / "train-{000000..000001}.tar"), "num_samples": 16},
        "base_model": {"arch": ARCH, "checkpoint": str(ws / "base.safetensors"),
                       "timm_kwargs": dict(BASE_KWARGS)},
        "targets": {"views": 2, "k_max": 8, "batch_size": 8, "cache": str(ws / "work" / "cache"),
                    "view_policy": {"output_size": 32}, "ray": {"num_cpus": 1}},
        "runs": [{"name": "tec", "epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu",
                  "model": {"embed_dim": 48, "depth": 3, "num_heads": 3, "decoder_embed_dim": 32,
                            "decoder_depth": 1, "decoder_num_heads": 2, "k": 4, "tau": 1.0}}],
        "eval": {"enabled": False},
    }


def _fingerprint(embed_dim: int) -> dict:
    return {"arch": ARCH, "checkpoint_sha256": "0" * 64, "img_size": 32, "patch_size": 8,
            "embed_dim": embed_dim, "num_heads": 2, "depth": 3, "last_n": 2, "k_max": 8}


def _write_cache(path: Path, *, embed_dim: int, parts: int, committed: int) -> None:
    """A small zarr cache (L=16, H=2, k_max=8, K=2) with ``committed`` of ``parts`` parts done."""
    from storage import CacheSpec, create_cache

    L, H, k_max, K, n = 16, 2, 8, 2, 2
    spec = CacheSpec(num_patches=L, channels=embed_dim, heads=H, k_max=k_max, views=K)
    names = [f"part{i}" for i in range(parts)]
    writer = create_cache(path, spec, base_model=_fingerprint(embed_dim),
                          view_policy={"seed": 0, "views": K},
                          source={"kind": "webdataset", "shards": names, "num_samples": n * parts},
                          parts=[(name, n) for name in names])
    rng = np.random.default_rng(0)
    for name in names[:committed]:
        part = writer.open_part(name)
        for slot in range(n):
            part.write(slot, f"{name}_{slot}", {
                "features": rng.standard_normal((K, L, embed_dim)).astype(np.float32),
                "feature_mean": np.zeros((K, embed_dim), np.float32),
                "feature_std": np.ones((K, embed_dim), np.float32),
                "attn_logits": rng.standard_normal((K, H, k_max + 1, L)).astype(np.float32),
                "attn_index": np.stack([rng.permutation(L)[:k_max] for _ in range(K)]),
                "crop": np.tile([0, 0, 32, 32], (K, 1)), "flip": np.zeros(K, bool),
                "source_size": (32, 32), "label": 0})
        part.commit()


def make_workspace(ws: Path) -> Path:
    """Files the bad-input cases refer to as {ws}/...; returns ``ws``."""
    import timm
    import torch
    from safetensors.torch import save_file

    ws.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **BASE_KWARGS)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ws / "base.safetensors"))
    # an MAE-style release that also pickles its argparse args: needs allow_pickle
    torch.save({"model": state, "args": argparse.Namespace(lr=1.0)}, ws / "pickle.pth")
    (ws / "garbage.pth").write_bytes(b"this is not a checkpoint\n" * 4)
    # a TEC export (carries its own geometry, so `tec eval` can load it without kwargs)
    from tec.export import export_timm
    from tec.model import NewModel, NewModelConfig

    new_model = NewModel(NewModelConfig(img_size=32, patch_size=8, embed_dim=48, depth=3,
                                        num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                                        decoder_num_heads=2, base_embed_dim=40, base_num_heads=2,
                                        k=4))
    export_timm(new_model, ws / "export.safetensors")
    (ws / "broken.yaml").write_text("targets:\n  views: [2, 4\n  codec: int8\n")
    (ws / "list.yaml").write_text("- data\n- targets\n")
    (ws / "notacache").mkdir(exist_ok=True)
    (ws / "notacache" / "readme.txt").write_text("just a folder\n")
    _write_cache(ws / "other_base_cache", embed_dim=64, parts=1, committed=1)
    _write_cache(ws / "partial_cache", embed_dim=40, parts=2, committed=1)
    return ws


# ----------------------------------------------------------------------------- the cases
class BadInput(NamedTuple):
    """argv follows ``tec``; ``{cfg}`` is the tiny pipeline (after ``mutate``) written to a file,
    ``{ws}`` the workspace folder. ``expect``: a substring of the one-line error message."""

    name: str
    argv: tuple[str, ...]
    expect: str
    mutate: Callable[[dict], None] | None = None
    known_bug: str | None = None  # an open bug outside pipeline/: the test xfails while it lasts


def _set(*path_and_value):
    """mutate: set raw[path...] = value (path entries are keys or list indices)."""
    *path, value = path_and_value

    def mutate(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(*path):
    def mutate(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


PLAN = ("plan", "{cfg}")
TARGETS = ("targets", "{cfg}")
TRAIN = ("train", "{cfg}", "tec")

BAD_INPUT_CASES: list[BadInput] = [
    # --- the config file itself
    BadInput("missing config file", ("plan", "{ws}/nope.yaml"), "nope.yaml"),
    BadInput("YAML syntax error", ("plan", "{ws}/broken.yaml"), "broken.yaml"),
    BadInput("YAML top level is a list", ("plan", "{ws}/list.yaml"), "must be a mapping"),
    # --- schema: keys, types, allowed values
    BadInput("unknown top-level key", PLAN, "unknown key targetz", _set("targetz", {"views": 2})),
    BadInput("missing targets section", PLAN, "targets", _delete("targets")),
    BadInput("targets is not a mapping", PLAN, "targets: expected a mapping",
             _set("targets", ["views", 2])),
    BadInput("unknown nested key targets.viewz", PLAN, "targets.viewz",
             _set("targets", "viewz", 4)),
    BadInput("wrong type targets.views", PLAN, "targets.views", _set("targets", "views", "four")),
    BadInput("negative views", PLAN, "targets.views", _set("targets", "views", -2)),
    BadInput("bad Literal targets.backend", PLAN, "targets.backend",
             _set("targets", "backend", "hdf5")),
    BadInput("bad Literal targets.codec", PLAN, "targets.codec", _set("targets", "codec", "int4")),
    BadInput("view_policy scale above 1", PLAN, "targets.view_policy.scale",
             _set("targets", "view_policy", "scale", [0.5, 2.0])),
    BadInput("view_policy bad interpolation", PLAN, "targets.view_policy.interpolation",
             _set("targets", "view_policy", "interpolation", "cubic")),
    BadInput("wrong type bool bootstrap.enabled", PLAN, "bootstrap.enabled",
             _set("bootstrap", {"enabled": "yes"})),
    BadInput("data.shard_size zero", PLAN, "data.shard_size", _set("data", "shard_size", 0)),
    BadInput("eval.knn_k zero", PLAN, "eval.knn_k", _set("eval", "knn_k", 0)),
    BadInput("workdir not a string", PLAN, "workdir", _set("workdir", 7)),
    BadInput("run without name", PLAN, "runs[0].name", _delete("runs", 0, "name")),
    BadInput("duplicate run names", PLAN, "duplicate run name 'tec'",
             lambda raw: raw["runs"].append(copy.deepcopy(raw["runs"][0]))),
    BadInput("unknown run model key", PLAN, "runs[0].model.depthh",
             _set("runs", 0, "model", "depthh", 3)),
    BadInput("run sets derived img_size", PLAN, "runs[0].model.img_size",
             _set("runs", 0, "model", "img_size", 64)),
    BadInput("depth not a multiple of 3 with the encoder adapter", PLAN, "depth",
             _set("runs", 0, "model", "depth", 4)),
    BadInput("k above k_max", PLAN, "k_max", _set("runs", 0, "model", "k", 12)),
    BadInput("tau zero", PLAN, "tau", _set("runs", 0, "model", "tau", 0.0)),
    BadInput("tau negative", PLAN, "tau", _set("runs", 0, "model", "tau", -1.0)),
    BadInput("online_fraction 1.5", PLAN, "online_fraction",
             _set("runs", 0, "online_fraction", 1.5)),
    BadInput("mask_ratio 1.0", PLAN, "mask_ratio", _set("runs", 0, "model", "mask_ratio", 1.0)),
    BadInput("base patch size does not divide image size", PLAN, "patch_size",
             _set("base_model", "timm_kwargs", "patch_size", 5)),
    BadInput("run patch size differs from the base model's", PLAN, "runs[0].model.patch_size",
             _set("runs", 0, "model", "patch_size", 4)),
    BadInput("bootstrap model target not pixel", PLAN, "bootstrap.run.model.target",
             _set("bootstrap", {"enabled": True, "run": {"epochs": 1, "batch_size": 4,
                                                         "model": {"target": "tec"}}})),
    BadInput("unknown timm arch", PLAN, "vit_nosuch", _set("base_model", "arch", "vit_nosuch")),
    BadInput("unknown timm kwarg", PLAN, "base_model.timm_kwargs",
             _set("base_model", "timm_kwargs", "bogus", 1)),
    BadInput("plan without shards or data.num_samples", PLAN, "data.num_samples",
             _delete("data", "num_samples")),
    # --- --set overrides
    BadInput("--set without '='", (*PLAN, "--set", "targets.views"), "KEY=VALUE"),
    BadInput("--set unknown run name", (*PLAN, "--set", "runs.nosuch.epochs=2"), "nosuch"),
    BadInput("--set run index out of range", (*PLAN, "--set", "runs.3.epochs=2"), "runs.3"),
    BadInput("--set unknown key", (*PLAN, "--set", "targets.viewz=4"), "targets.viewz"),
    BadInput("--set wrong type", (*PLAN, "--set", "targets.views=[1, 2]"), "targets.views"),
    BadInput("--set below a scalar", (*PLAN, "--set", "targets.views.x=1"), "targets.views"),
    # --- the base model (stage 1 loads it before starting Ray)
    BadInput("no base checkpoint and no bootstrap", TARGETS, "base_model.checkpoint",
             _set("base_model", "checkpoint", None)),
    BadInput("missing base checkpoint file", TARGETS, "missing_base.pth",
             _set("base_model", "checkpoint", "{ws}/missing_base.pth")),
    BadInput("pickled base checkpoint without allow_pickle", TARGETS, "allow_pickle",
             _set("base_model", "checkpoint", "{ws}/pickle.pth")),
    BadInput("garbage base checkpoint", TARGETS, "garbage.pth",
             _set("base_model", "checkpoint", "{ws}/garbage.pth")),
    BadInput("base checkpoint does not fit the configured depth", TARGETS, "missing encoder keys",
             _set("base_model", "timm_kwargs", "depth", 6)),
    BadInput("view size differs from the base model's img_size", TARGETS, "output_size",
             _set("targets", "view_policy", "output_size", 48)),
    BadInput("k_max above the base model's patches", TARGETS, "targets.k_max",
             _set("targets", "k_max", 20)),
    BadInput("last_n above the base model's depth", TARGETS, "targets.last_n",
             _set("targets", "last_n", 5)),
    BadInput("tec run: missing base checkpoint", ("run", "{cfg}", "--only", "targets"),
             "missing_base.pth", _set("base_model", "checkpoint", "{ws}/missing_base.pth")),
    # --- stage 2 and the cache
    BadInput("train nosuch", ("train", "{cfg}", "nosuch"), "nosuch"),
    BadInput("train --run nosuch (old spelling)", ("train", "{cfg}", "--run", "nosuch"), "nosuch"),
    BadInput("train without a run", ("train", "{cfg}"), "name the run"),
    BadInput("train run named twice", ("train", "{cfg}", "tec", "--run", "other"),
             "named twice"),
    BadInput("train before stage 1 (no cache)", TRAIN, "cache"),
    BadInput("train from a folder that is not a cache", TRAIN, "notacache",
             _set("targets", "cache", "{ws}/notacache")),
    BadInput("train from an incomplete cache", TRAIN, "partial_cache",
             _set("targets", "cache", "{ws}/partial_cache")),
    BadInput("train with a base model whose width does not match the cache", TRAIN,
             "different base model", _set("targets", "cache", "{ws}/other_base_cache")),
    BadInput("cache inspect on a missing path", ("cache", "inspect", "{ws}/no_cache_here"),
             "no_cache_here"),
    BadInput("cache inspect on a non-cache folder", ("cache", "inspect", "{ws}/notacache"),
             "notacache"),
    BadInput("cache verify on a missing path", ("cache", "verify", "{ws}/no_cache_here"),
             "no_cache_here"),
    BadInput("export of a missing checkpoint",
             ("export", "{ws}/nope.ckpt", "--out", "{ws}/out.safetensors"), "nope.ckpt"),
    BadInput("export of a garbage checkpoint",
             ("export", "{ws}/garbage.pth", "--out", "{ws}/out.safetensors"), "garbage.pth"),
    # --- evaluation, pictures and data preparation
    BadInput("eval knn: missing model file",
             ("eval", "knn", "{ws}/nope.safetensors", "--train", "{ws}/a.tar", "--test",
              "{ws}/b.tar"), "nope.safetensors"),
    BadInput("eval linear: missing model file",
             ("eval", "linear", "{ws}/nope.safetensors", "--train", "{ws}/a.tar", "--test",
              "{ws}/b.tar"), "nope.safetensors"),
    BadInput("eval knn: missing shards",
             ("eval", "knn", "{ws}/export.safetensors", "--train", "{ws}/no-shards-*.tar",
              "--test", "{ws}/no-shards-*.tar"), "no-shards-"),
    BadInput("eval knn: plain checkpoint that does not fit --arch",
             ("eval", "knn", "{ws}/base.safetensors", "--arch", ARCH, "--train", "{ws}/a.tar",
              "--test", "{ws}/b.tar"), "base.safetensors"),
    BadInput("viz attention: missing model file",
             ("viz", "attention", "{ws}/nope.safetensors", "--images", "{ws}/a.tar", "--out",
              "{ws}/att.png"), "nope.safetensors"),
    BadInput("data fashion-mnist --idx-dir /nonexistent",
             ("data", "fashion-mnist", "--idx-dir", "/nonexistent", "--out", "{ws}/fm"),
             "/nonexistent"),
]

# a few cases also run as real processes (no traceback from the installed `tec` either)
SUBPROCESS_CASES = ["YAML syntax error", "unknown nested key targets.viewz",
                    "pickled base checkpoint without allow_pickle",
                    "cache inspect on a non-cache folder"]


def _fill(value, ws: Path):
    if isinstance(value, str):
        return value.replace("{ws}", str(ws))
    if isinstance(value, list):
        return [_fill(v, ws) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ws) for k, v in value.items()}
    return value


def case_argv(case: BadInput, ws: Path, tag: str | None = None) -> list[str]:
    """The argv of ``case`` with its config written to ``{ws}/cases/<tag>.yaml``."""
    argv = [_fill(a, ws) for a in case.argv]
    if "{cfg}" in case.argv:
        raw = tiny_pipeline(ws)
        if case.mutate is not None:
            case.mutate(raw)
        raw = _fill(raw, ws)
        path = ws / "cases" / f"{tag or abs(hash(case.name))}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(raw))
        argv = [str(path) if a == "{cfg}" else a for a in argv]
    return argv


def check_result(case: BadInput, exit_code: int, stderr: str) -> tuple[bool, str]:
    """(ok, why): exit != 0, exactly one ``error:`` line naming ``expect``, no traceback."""
    if "Traceback" in stderr:
        return False, f"traceback on stderr:\n{stderr}"
    if exit_code == 0:
        return False, "exit code 0"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        return False, f"expected one 'error:' line on stderr, got:\n{stderr}"
    if case.expect not in errors[0]:
        return False, f"{errors[0]!r} does not mention {case.expect!r}"
    return True, errors[0]


def _tag(case: BadInput) -> str:
    return "".join(c if c.isalnum() else "_" for c in case.name)


def run_bad_inputs_in_processes(cases: list[BadInput], ws: Path) -> list[tuple[bool, str]]:
    """Run cases as real `tec` processes, all at once; (ok, detail) per case."""
    env = {k: v for k, v in os.environ.items() if k != "TEC_DEBUG"}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", *case_argv(c, ws, _tag(c))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ws) for c in cases]
    results = []
    for case, proc in zip(cases, procs):
        _, stderr = proc.communicate(timeout=300)
        results.append(check_result(case, proc.returncode, stderr))
    return results


def run_bad_input(case: BadInput, ws: Path, *, subprocess_run: bool = False) -> tuple[bool, str]:
    """Run one case (in-process with CliRunner, or as a `tec` subprocess); returns (ok, detail)."""
    if subprocess_run:
        return run_bad_inputs_in_processes([case], ws)[0]
    argv = case_argv(case, ws, _tag(case))
    result = CliRunner().invoke(main, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        return False, f"uncaught exception:\n{tb}"
    ok, detail = check_result(case, result.exit_code, result.stderr)
    if ok and len(result.stderr.strip().splitlines()) != 1:
        return False, f"more than one line on stderr:\n{result.stderr}"
    return ok, detail
