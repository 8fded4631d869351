"""Data-parallel training (scoreaction/distributed.py): torchrun with gloo processes on the CPU.

The contract: W processes with global batch B make the update one process makes with batch B, to float
tolerance (float64 here), for every algorithm; checkpoints do not depend on W, so a run resumes on another
number of processes; disagreements and dead or hung processes end in one-line errors, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoreaction.distributed import World

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RUN = ["--task", "gaussian", "--batch-size", "12", "--steps", "4", "--dtype", "float64", "--eval-every", "0",
       "--eval-n", "64", "--no-tensorboard", "-q"]
ALGOS = {"ctrl": ["--set", "algo.minibatches=5"], "ddpo": ["--set", "algo.minibatches=5", "--set", "algo.min_count=4"],
         "grpo": ["--set", "algo.group_size=3"], "dpok": [], "draft": ["--set", "algo.minibatches=2"],
         "adjoint": ["--set", "algo.minibatches=2", "--set", "algo.steps_per_sample=2"]}


def train(out: Path, *args: str, procs: int = 1, script: Path | None = None, timeout: float = 240):
    entry = [str(script)] if script else ["-m", "scoreaction"]
    cmd = ([*TORCHRUN, "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]) + entry
    return subprocess.run([*cmd, "train", *RUN, *args, "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    folder = run / "checkpoints" / latest
    return {**load_file(folder / "model.safetensors"), **load_file(folder / "train.safetensors")}


def assert_same_run(a: Path, b: Path, tol: float = 1e-9) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if wa[key].is_floating_point():
            assert torch.allclose(wa[key], wb[key], rtol=tol, atol=tol), key
        else:
            assert torch.equal(wa[key], wb[key]), key  # the generator's state: the same draws
    la = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("reward_mean", "path_kl", "J", "loss", "grad_norm", "approx_kl", "value_explained_var"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-7, abs=1e-9), key


# --- shards and members, without processes ------------------------------------------------------------
def test_members_of_a_global_minibatch_are_each_process_share():
    K, b, W = 3, 4, 2
    whole = torch.arange(K * W * b).reshape(K, W * b)  # item g = k B + j, step-major
    idx = torch.randperm(K * W * b, generator=torch.Generator().manual_seed(0))[:11]
    found = []
    for rank in range(W):
        world = World(rank=rank, size=W)
        local = world.shard(whole, dim=1).flatten()
        found += local[world.members(idx, b)].tolist()
    assert sorted(found) == sorted(idx.tolist())


def test_draws_of_a_shard_are_the_rows_of_the_whole_batch():
    x = torch.zeros(3, 2)
    whole = World().draw(torch.zeros(6, 2), torch.Generator().manual_seed(1))
    parts = [World(rank=r, size=2).draw(x, torch.Generator().manual_seed(1)) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


# --- the contract, with torchrun ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_two_processes_make_the_one_process_update(tmp_path, algorithm):
    args = ["--algorithm", algorithm, "--updates", "2", *ALGOS[algorithm]]
    one = train(tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr
    # micro-batches and rollout chunks do not change the update either
    two = train(tmp_path / "two", *args, "--micro-batch", "5", "--rollout-batch", "4", procs=2)
    assert two.returncode == 0, two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert two.stdout.count("run folder") == 1  # process 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_processes(tmp_path):
    args = ["--algorithm", "ctrl", *ALGOS["ctrl"]]
    assert train(tmp_path / "straight", *args, "--updates", "4").returncode == 0
    first = train(tmp_path / "moved", *args, "--updates", "2", procs=2)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([sys.executable, "-m", "scoreaction", "train", "--resume", str(tmp_path / "moved"),
                              "--updates", "4", "-q"], env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "moved")


# --- bad input: one line, nothing written ------------------------------------------------------------------
def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("scoreaction: error:")]


def assert_clean_failure(stderr: str) -> None:
    """No traceback through scoreaction's code; the process that found the error exited with code 2 (torchrun
    then stops the others and reports it in its own words, exiting 1)."""
    assert "/scoreaction/" not in stderr
    assert "exitcode  : 2" in stderr


@pytest.mark.slow
def test_a_batch_the_processes_cannot_share_is_a_one_line_error(tmp_path):
    done = train(tmp_path / "run", "--batch-size", "13", "--updates", "1", procs=2)
    assert done.returncode != 0
    assert error_lines(done.stderr) == ["scoreaction: error: batch_size must be divisible by the number of "
                                        "processes (2), found 13"]
    assert_clean_failure(done.stderr)
    assert not (tmp_path / "run").exists()


RANK_SPECIFIC = """
import os, sys, time
from scoreaction.cli import main
from scoreaction.train import loop

collect = loop.Trainer.collect


def misbehave(self):
    if int(os.environ["RANK"]) == 1 and self.step == 1:
        {action}
    return collect(self)


loop.Trainer.collect = misbehave
sys.argv += {extra}
sys.exit(main(sys.argv[1:]))
"""


def script(tmp_path: Path, action: str, extra: str = "[]") -> Path:
    path = tmp_path / "launch.py"
    path.write_text(RANK_SPECIFIC.format(action=action, extra=extra))
    return path


@pytest.mark.slow
def test_processes_given_different_configurations_stop(tmp_path):
    launch = script(tmp_path, "pass", extra='["--seed", os.environ["RANK"]]')
    done = train(tmp_path / "run", "--updates", "1", procs=2, script=launch)
    assert done.returncode != 0
    assert error_lines(done.stderr) == ["scoreaction: error: the processes were given different configurations: "
                                        "process 1 has seed=1, process 0 has 0"]
    assert_clean_failure(done.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("action", ["time.sleep(600)", "os._exit(7)"])
def test_a_hung_or_dead_process_stops_the_others(tmp_path, action):
    start = time.monotonic()
    done = train(tmp_path / "run", "--updates", "3", "--checkpoint-every", "1", "--timeout", "5", procs=2,
                 script=script(tmp_path, action), timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 100
    if action.startswith("time"):  # process 0 waited `timeout` seconds at the gather of update 2's rewards
        assert any("timed out after 5 s" in line for line in error_lines(done.stderr)), done.stderr
    # what was written before is intact: update 1's checkpoint, and no trace of update 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000001"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


@pytest.mark.slow
def test_resume_on_processes_that_cannot_share_the_batch_writes_nothing(tmp_path):
    first = train(tmp_path / "run", "--updates", "1", procs=2)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    done = subprocess.run([*TORCHRUN, "--nproc_per_node", "5", "-m", "scoreaction", "train", "--resume",
                           str(tmp_path / "run"), "--updates", "2", "-q"], env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0
    assert error_lines(done.stderr) == ["scoreaction: error: batch_size must be divisible by the number of "
                                        "processes (5), found 12"]
    assert_clean_failure(done.stderr)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
