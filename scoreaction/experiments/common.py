"""What the experiments share: worker pools with pinned threads, the machine a run was measured on, intervals over
seeds, and a unit of work in a fresh process (JSON in, JSON out)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class _Inline:
    """The executor interface, run in this process (quick mode, or workers=1)."""

    def __init__(self, threads: int):
        self.threads, self.saved = threads, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)

    def map(self, fn, items):
        return map(fn, list(items))


def executor(config):
    """Worker processes (spawned, `config.threads` torch threads each) or, with `config.workers == 1`, this process."""
    if config.workers == 1:
        return _Inline(config.threads)
    import multiprocessing

    return ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(config.threads,))


def machine_info(config) -> dict:
    """What a timing needs beside it: cores, versions, workers and threads, and the load average at the start."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "workers": config.workers, "threads_per_process": config.threads,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# --- statistics over seeds ------------------------------------------------------------------------------------
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_975(df: int) -> float:
    """Student's t quantile t_{0.975, df}: a table up to 30 degrees of freedom, beyond it the Cornish-Fisher
    expansion around z = 1.959964 (error below 1e-6 there), so that no statistics library is needed."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval over seeds (inf for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.inf
    return mean, t_975(n - 1) * sd / math.sqrt(n) if n > 1 else math.inf


def first_reach(xs: list[float], ys: list[float], level: float) -> float | None:
    """The x at which the curve ys(xs) first reaches `level` (linear interpolation between evaluations; xs[0]
    if it starts there), None if it never does."""
    if ys and ys[0] >= level:
        return xs[0]
    for i in range(1, len(ys)):
        if ys[i] >= level:
            w = (level - ys[i - 1]) / (ys[i] - ys[i - 1]) if ys[i] > ys[i - 1] else 1.0
            return xs[i - 1] + min(max(w, 0.0), 1.0) * (xs[i] - xs[i - 1])
    return None


# --- one unit of work in a fresh process ----------------------------------------------------------------------
def run_child(module: str, payload: dict, result: Path, threads: int, timeout: float) -> tuple[dict | None, str | None]:
    """`module.child_main(json.dumps(payload), str(result))` in a fresh Python process with `threads` torch threads,
    offline, at most `timeout` seconds; data in and out as JSON, never pickle. (the JSON it wrote, None) or, if it
    failed, (None, the error in one line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    script = f"import sys; from {module} import child_main; child_main(*sys.argv[1:])"
    try:
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(payload), str(result)], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0 or not result.is_file():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        return None, f"exit code {proc.returncode}: {lines[-1]}"
    return json.loads(result.read_text()), None


def run_forked(module: str, payload: dict, result: Path, timeout: float, preload: list[str]) -> tuple[dict | None,
                                                                                                       str | None]:
    """As `run_child`, in a fresh process forked from multiprocessing's fork server, which imports `preload` once
    (torch, diffusers ...: seconds per process saved); its output goes to `result` + ".log". The child still sets its
    own torch threads (child_main). As with any spawn or forkserver pool, a script that calls this needs the
    `if __name__ == "__main__":` guard."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    log = result.with_suffix(".log")
    proc = context.Process(target=_forked_main, args=(module, json.dumps(payload), str(result), str(log)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None, f"timed out after {timeout:.0f} s"
    if proc.exitcode != 0 or not result.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
        return None, f"exit code {proc.exitcode}: {(lines or ['no output'])[-1]}"
    return json.loads(result.read_text()), None


def _forked_main(module: str, payload: str, result: str, log: str) -> None:
    import importlib
    import traceback

    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    try:
        importlib.import_module(module).child_main(payload, result)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
