"""Helpers shared by the command modules: threads, output files, printing. Output paths are checked by
`scoreaction.outputs.check_output` (one policy for every command)."""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import torch

from scoreaction.io import atomic_write_bytes


def add_run_switches(parser: argparse.ArgumentParser, *, quiet: bool = True, threads: bool = True) -> None:
    """Switches that change how a command runs, not what it computes: -q, --verbose and --threads."""
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--verbose", action="store_true",
                        help="show the log lines, warnings and progress bars of diffusers and transformers")
    if threads:
        parser.add_argument("--threads", type=int, metavar="N",
                            help="torch CPU threads (default: torch's choice, capped at the cores the load average leaves free)")


def default_threads() -> int:
    """Torch threads when neither --threads nor OMP_NUM_THREADS says: no more than the cores other processes
    leave free (the 1-minute load average), at least 1. Torch's threads spin: beside a busy core, its default
    made one update of the tiny diffusers task 16x slower (docs/diffusers.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is None:
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(min(torch.get_num_threads(), default_threads()))
        return
    most = 64 * (os.cpu_count() or 1)  # far past any gain: threads beyond the cores only wait for them
    if not 1 <= args.threads <= most:
        raise ValueError(f"--threads must be a positive integer of at most {most} ({os.cpu_count()} cores here), "
                         f"found {args.threads}")
    torch.set_num_threads(args.threads)


def save_npz(path: str, **arrays) -> None:
    """np.savez, written atomically; dicts are stored as JSON text (loadable without pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: (np.asarray(json.dumps(v)) if isinstance(v, dict) else np.asarray(v)) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def fmt_vec(v, digits: int = 4, limit: int = 6) -> str:
    v = list(np.asarray(v, dtype=float).reshape(-1))
    body = ", ".join(f"{x:.{digits}f}" for x in v[:limit])
    return f"[{body}{', ...' if len(v) > limit else ''}]"


def print_table(values: dict, keys=None) -> None:
    for key in keys or values:
        if key in values:
            value = values[key]
            print(f"{key:22s} {value:.5g}" if isinstance(value, float) else f"{key:22s} {value}")


def check_sizes(n: int | None, steps: int | None) -> None:
    """`--n` samples and `--steps` solver steps of sample/evaluate, where given (None: the task's or run's own):
    positive, and within what this machine can hold."""
    from scoreaction.config import check_positive_int, check_samples, check_steps

    if steps is not None:
        check_positive_int("steps", steps)
        check_steps("steps", steps)
    if n is not None:
        check_positive_int("n", n)
        check_samples("n", n, ())
