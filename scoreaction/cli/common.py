"""Helpers shared by the command modules: config assembly and output."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch

from scoreaction.config import apply_overrides, load_yaml, merge
from scoreaction.io import atomic_write_bytes


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (defaults < file < flags < --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set task.dim=16 (repeatable)")


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 when other jobs share the cores)")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"threads must be a positive integer, found {args.threads}")
    torch.set_num_threads(args.threads)


def build_config(args: argparse.Namespace, flags: dict) -> dict:
    """defaults (in the dataclasses) < --config file < explicit flags < --set overrides."""
    config = load_yaml(args.config) if args.config else {}
    explicit = {}
    for dotted, value in flags.items():
        if value is not None:
            section, key = dotted.split(".")
            explicit.setdefault(section, {})[key] = value
    return apply_overrides(merge(config, explicit), args.overrides)


def save_npz(path: str, **arrays) -> None:
    """np.savez, written atomically; strings are stored as unicode arrays (loadable without pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: (np.asarray(json.dumps(v)) if isinstance(v, dict) else np.asarray(v)) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def fmt_vec(v, digits: int = 4, limit: int = 6) -> str:
    v = list(np.asarray(v, dtype=float).reshape(-1))
    body = ", ".join(f"{x:.{digits}f}" for x in v[:limit])
    return f"[{body}{', ...' if len(v) > limit else ''}]"
