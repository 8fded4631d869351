"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a folder written atomically (built beside its final name, then renamed into place):

    model.safetensors      the policy's trainable weights (policy.state_dict())
    train.safetensors      optimiser tensors, algorithm modules and optimisers, RNG state
    state.json             config, step, metrics, optimiser hyper-parameters, algorithm metadata
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scoreaction.io import atomic_folder, atomic_write_bytes

FILES = ("model.safetensors", "train.safetensors", "state.json")


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state_dict into tensors (safetensors) and the rest (JSON)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            idx, key = name[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(folder: str | os.PathLike, *, model: dict[str, torch.Tensor], train: dict[str, torch.Tensor], state: dict) -> Path:
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in train.items()}, str(tmp / "train.safetensors"))
        atomic_write_bytes(tmp / "state.json", json.dumps(state, indent=1, default=float).encode())
    return Path(folder)


def load(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, train tensors, state); a missing or corrupt file is a ValueError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint {str(folder)!r} is not a folder")
    for name in FILES:
        if not (folder / name).is_file():
            raise ValueError(f"checkpoint {str(folder)!r} is missing {name}")
    tensors = []
    for name in FILES[:2]:
        try:
            tensors.append(load_file(str(folder / name)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint file {str(folder / name)!r} is truncated or corrupt ({err})") from None
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"checkpoint file {str(folder / 'state.json')!r} is not valid JSON") from None
    return tensors[0], tensors[1], state


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder whose checkpoints/latest names one."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    if (path / "state.json").exists() or not path.exists():
        return path
    raise ValueError(f"{str(path)!r} is neither a checkpoint nor a run folder with checkpoints/latest")


def mark_latest(run_dir: str | os.PathLike, name: str) -> None:
    atomic_write_bytes(Path(run_dir) / "checkpoints" / "latest", (name + "\n").encode())
