"""Stage 2 across processes: 2-rank torchrun (gloo, CPU) and resume after SIGKILL."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from train_helpers import PYTHON, build_cache, make_data, python_env, save_base_model

from stages.checkpoint import load_checkpoint

# Runs stages.train.train in a fresh process. Test hooks (test code only, patched in here):
# kill_at: SIGKILL this process right after checkpoint <kill_at> is written;
# dump_weights: every rank saves its final weights to <out>/weights_rank<r>.pt;
# log_samples: every rank writes the samples it trains on (train_helpers.log_sample_keys).
SCRIPT = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from train_helpers import Source, log_sample_keys, run_config
from stages import checkpoint, train
from stages.configs import BaseModelConfig

args = json.loads(sys.argv[1])
if args.get("kill_at"):
    save = checkpoint.Checkpointer.save
    def save_then_die(self, state, step):
        path = save(self, state, step)
        if step == args["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    checkpoint.Checkpointer.save = save_then_die
if args.get("dump_weights"):
    fit = train.Trainer.fit
    def fit_and_dump(self):
        summary = fit(self)
        torch.save(self.model.state_dict(),
                   os.path.join(args["out"], f"weights_rank{self.dist.rank}.pt"))
        return summary
    train.Trainer.fit = fit_and_dump
base = BaseModelConfig(**args["base"]) if args.get("base") else None
summary = train.train(run_config(**args["run"]), cache=args["cache"], source=None, base=base,
                      out_dir=args["out"], progress=False,
                      on_batches=log_sample_keys if args.get("log_samples") else None)
print("SUMMARY", json.dumps({"steps": summary.steps, "samples": summary.samples}))
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    shards = make_data(tmp, n_shards=2, per_shard=8)
    base = save_base_model(tmp / "base.safetensors")
    cache = build_cache(tmp / "cache", shards, base)
    script = tmp / "run_train.py"
    script.write_text(SCRIPT)
    return dict(tmp=tmp, base=base, cache=cache, script=script)


def _run(world, out: Path, run: dict, *, nproc: int = 1, timeout: int = 240, env=None, **hooks):
    args = json.dumps({"cache": world["cache"], "out": str(out), "run": run, **hooks})
    if nproc == 1:
        cmd = [PYTHON, str(world["script"]), args]
    else:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(world["script"]), args]
    return subprocess.run(cmd, env={**python_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_torchrun_shards_disjointly_and_keeps_ranks_identical(world, tmp_path):
    run = dict(epochs=2, batch_size=8, accum_steps=2, num_workers=1, blr=0.05, seed=0)
    ddp = _run(world, tmp_path / "ddp", run, nproc=2, dump_weights=True, log_samples=True)
    _ok(ddp)
    w0 = torch.load(tmp_path / "ddp" / "weights_rank0.pt")
    w1 = torch.load(tmp_path / "ddp" / "weights_rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    seen = {}
    for rank in (0, 1):
        with open(tmp_path / "ddp" / "debug" / f"samples_rank{rank}.tsv") as f:
            seen[rank] = [line.rstrip("\n").split("\t") for line in f]
    assert len(seen[0]) == len(seen[1]) == 2 * 2 * 4  # 2 epochs x 2 steps x 4 samples per rank
    for epoch in ("0", "1"):
        keys = [{row[2] for row in seen[r] if row[1] == epoch} for r in (0, 1)]
        assert not keys[0] & keys[1]  # disjoint within an epoch
        assert len(keys[0] | keys[1]) == 16  # and together the whole dataset

    # same global batches, same masks: the 2-rank run trains the single-process model
    from train_helpers import run_config

    from stages.train import train

    train(run_config(**dict(run, accum_steps=1, num_workers=0)), cache=world["cache"],
          out_dir=tmp_path / "single", progress=False)
    ws = load_checkpoint(tmp_path / "single" / "checkpoints" / "last")["model"]
    worst = max((w0[k] - ws[k]).abs().max().item() for k in w0)
    assert worst < 1e-3, worst  # float summation order differs (gloo all-reduce, accumulation)


def test_run_killed_mid_epoch_resumes_to_the_same_weights(world, tmp_path):
    from train_helpers import run_config

    from stages.train import train

    run = dict(epochs=3, batch_size=4, checkpoint_every=3, keep_checkpoints=2, num_workers=0,
               blr=0.05, seed=1, deterministic=True, log_every=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess
    try:
        straight = train(run_config(**run), cache=world["cache"], out_dir=tmp_path / "straight",
                         progress=False)
        killed = _run(world, tmp_path / "resumed", run, kill_at=6)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        last = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last")
        assert (last["step"], last["epoch"], last["step_in_epoch"]) == (6, 1, 2)  # mid-epoch
        resumed = train(run_config(**run), cache=world["cache"], out_dir=tmp_path / "resumed",
                        progress=False)
    finally:
        torch.set_num_threads(threads)
    assert straight.steps == resumed.steps == 12
    assert resumed.resumed_from_step == 6 and resumed.samples == 6 * 4  # only what was left

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    with open(tmp_path / "resumed" / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, 13))  # the killed run's rows after step 6 were dropped


@pytest.mark.slow
def test_two_process_torchrun_streams_every_sample_once_with_equal_steps(world, tmp_path):
    """read: stream over 2 ranks x 2 loader workers: each epoch's samples once, none on two
    ranks, the same steps on both ranks (16 samples, batches of 6: 2 steps, 4 dropped), and
    the ranks' weights identical."""
    cache = build_cache(tmp_path / "wds",
                        sorted(str(p) for p in (world["tmp"] / "shards").iterdir()),
                        world["base"], backend="webdataset", codec="int8", pixels="jpeg")
    run = dict(epochs=2, batch_size=6, num_workers=2, blr=0.05, seed=0, read="stream",
               view_selection="round_robin", shuffle_buffer=3)
    proc = _run({**world, "cache": cache}, tmp_path / "ddp", run, nproc=2, dump_weights=True,
                log_samples=True)
    _ok(proc)
    w0 = torch.load(tmp_path / "ddp" / "weights_rank0.pt")
    w1 = torch.load(tmp_path / "ddp" / "weights_rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    seen = {}
    for rank in (0, 1):
        with open(tmp_path / "ddp" / "debug" / f"samples_rank{rank}.tsv") as f:
            seen[rank] = [line.rstrip("\n").split("\t") for line in f]
    for rank in (0, 1):  # 2 epochs x 2 steps x 3 samples, each step on both ranks
        assert [row[0] for row in seen[rank]] == [str(s) for s in range(4) for _ in range(3)]
    for epoch in ("0", "1"):
        keys = [[row[2] for row in seen[r] if row[1] == epoch] for r in (0, 1)]
        assert len(set(keys[0] + keys[1])) == len(keys[0] + keys[1]) == 12  # once, 4 dropped
        assert {row[3] for r in (0, 1) for row in seen[r] if row[1] == epoch} == {epoch}  # view
