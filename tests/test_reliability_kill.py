"""kill -9 of training at random moments, one of them inside a checkpoint write, and a damaged latest
checkpoint: `train --resume` always succeeds, finishes, leaves no temporaries, and ends with weights
bit-identical to an uninterrupted run."""

import contextlib
import io
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from scoreaction.cli import main

UPDATES = 40
ARGS = ["--batch-size", "8", "--steps", "4", "--hidden", "16", "--checkpoint-every", "1", "--eval-every", "0",
        "--eval-n", "64", "--eval-steps", "4", "--set", "task.dim=2", "--threads", "1", "-q"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STALE = re.compile(r"^\..+\.(tmp|old)-\d+$")


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scoreaction", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV)


def latest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def writing(run: Path, pid: int) -> bool:
    """Whether process `pid` is inside a checkpoint write (its temporary folder exists)."""
    try:
        return any(e.name.endswith(f".tmp-{pid}") and e.name.startswith(".step-")
                   for e in os.scandir(run / "checkpoints"))
    except FileNotFoundError:
        return False


def kill_when(proc: subprocess.Popen, condition, timeout: float = 30) -> bool:
    """SIGKILL `proc` as soon as `condition()` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.0002)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError("the run neither reached the moment to kill it nor finished")
    return False


def final_weights(run: Path) -> dict:
    name = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run = tmp_path / "run"
    log = [f"seed {seed}"]

    # 1. killed inside a checkpoint write (its temporary folder exists), after a few checkpoints
    proc = start("train", "--updates", str(UPDATES), *ARGS, "--out", str(run))
    after = rng.randint(3, 8)
    killed = kill_when(proc, lambda: latest_step(run) >= after and writing(run, proc.pid))
    log.append(f"kill 1 inside a write after step {after}: {killed}, latest {latest_step(run)}")
    assert killed, log
    assert any(STALE.match(p.name) for p in (run / "checkpoints").iterdir()), log  # a half-written checkpoint

    # 2. resumed, then killed at a random moment (maybe inside a write, maybe between a write and `latest`)
    for k in range(2):
        proc = start("train", "--resume", str(run), "-q", "--threads", "1")
        target = latest_step(run) + rng.randint(1, 4)
        delay = rng.uniform(0, 0.03)
        killed = kill_when(proc, lambda: latest_step(run) >= target and (time.sleep(delay) or True))
        log.append(f"kill {k + 2} after step {target} + {delay:.4f} s: {killed}, latest {latest_step(run)}")
        assert killed, log

    # 3. the latest checkpoint damaged (a disk, a user): the resume takes the previous good one and says so
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[:len(data) // 2])
    proc = start("train", "--resume", str(run), "-q", "--threads", "1")
    _, err = proc.communicate(timeout=60)
    log.append(f"resume to the end: exit {proc.returncode}")
    assert proc.returncode == 0, (log, err.decode())
    warning = err.decode().splitlines()
    assert len(warning) == 1 and warning[0].startswith("scoreaction: warning: ") and "truncated" in warning[0], log

    # finished: no temporaries left, every update done, the weights of a run never interrupted
    assert not [p.name for p in (run / "checkpoints").iterdir() if STALE.match(p.name)], log
    assert latest_step(run) == UPDATES, log
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--updates", str(UPDATES), *ARGS, "--out", str(tmp_path / "reference")]) == 0
    resumed, reference = final_weights(run), final_weights(tmp_path / "reference")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), (key, log)
