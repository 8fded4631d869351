"""Helpers shared by the command modules: threads, output files, printing."""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import torch

from scoreaction.io import atomic_write_bytes


def add_run_switches(parser: argparse.ArgumentParser, *, quiet: bool = True, threads: bool = True) -> None:
    """Switches that change how a command runs, not what it computes: -q and --threads."""
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or progress lines")
    if threads:
        parser.add_argument("--threads", type=int, metavar="N",
                            help="torch CPU threads (default: torch's choice; 1 when other jobs share the cores)")


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise ValueError(f"threads must be a positive integer, found {args.threads}")
    torch.set_num_threads(args.threads)


def check_new_file(path: str, what: str = "output") -> None:
    """An output path must not be an existing folder, and its folder must exist or be creatable."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; expected a file name")


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
