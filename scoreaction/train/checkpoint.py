"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A run folder holds its checkpoints, each under a new name, and a pointer to the newest:

    RUN/checkpoints/step-000020/    one checkpoint, a folder written atomically (io.atomic_folder):
        model.safetensors           the policy's trainable weights (policy.state_dict())
        train.safetensors           optimiser tensors, algorithm modules and optimisers, RNG state ('rng')
        state.json                  config, step, trajectories, metrics, optimiser hyper-parameters,
                                    algorithm metadata
    RUN/checkpoints/latest          the newest checkpoint's name ("step-000020\n"), switched by
                                    writing a new pointer file beside it and renaming it over the old

A kill at any moment leaves every checkpoint folder whole or absent, and `latest` naming a whole one,
with two exceptions the readers handle: a kill while a folder of the same name is rewritten (the
trainer's final save at a step that was just checkpointed) leaves its previous version as
`.NAME.old-PID`, and a disk or a user can still damage a file. `resolve` of a run folder therefore
takes the newest intact checkpoint, warning on stderr when that is not the one `latest` names; a
checkpoint folder named explicitly is loaded as it is, and a damaged one is an error. `save` first
removes what killed writers left behind (`clean_stale`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scoreaction.config import check_finite, shown
from scoreaction.errors import CheckpointError
from scoreaction.io import STALE, atomic_folder, atomic_write_bytes, remove_stale

FILES = ("model.safetensors", "train.safetensors", "state.json")
FORMAT = "scoreaction-checkpoint-1"  # state.json's "format"
LATEST = "latest"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # what `latest` may name: a folder beside it
STEP = re.compile(r"^step-(\d+)$")
# keys of state.json whose numbers must all be finite (the config is checked by TrainConfig itself)
FINITE_KEYS = ("optimizer", "algorithm_optimizers", "algorithm_extra")
# keys of state.json that loading needs, with their JSON types
STATE_KEYS = {"config": dict, "step": int, "trajectories": int, "optimizer": dict, "algorithm_optimizers": dict}
MAX_HEADER = 100 * 2**20  # a safetensors header above this is corrupt

_warned: set[str] = set()


# --- optimisers --------------------------------------------------------------------------------------
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
    """Inverse of `optimizer_state`; state that does not fit `opt` is a CheckpointError."""
    try:
        state: dict[int, dict[str, Any]] = {}
        head = f"{prefix}.state."
        for name, value in tensors.items():
            if name.startswith(head):
                idx, key = name[len(head):].split(".", 1)
                state.setdefault(int(idx), {})[key] = value
        for name, value in meta.get("scalars", {}).items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        check_optimizer_state(opt, state, meta["param_groups"], prefix)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint's optimiser state {prefix!r} does not fit this run "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_optimizer_state(opt: torch.optim.Optimizer, state: dict, groups, prefix: str) -> None:
    """A checkpoint's optimiser state against the optimiser it is loaded into, before torch's
    load_state_dict (which checks little of it): as many param groups, each with the same keys, the same
    parameter indices, and values of the same kind (numbers finite and >= 0, lists of the same length,
    flags true or false); per-parameter state only for those parameters, tensors of their shapes."""
    live = opt.state_dict()["param_groups"]
    key = "optimizer" if prefix == "optimizer" else f"algorithm_optimizers.{prefix.removeprefix('algo.')}"
    where = f"checkpoint file state.json: {key}"
    if not isinstance(groups, list) or len(groups) != len(live):
        raise CheckpointError(f"{where}.param_groups must be a list of {len(live)} group(s), found "
                              f"{f'{len(groups)} groups' if isinstance(groups, list) else shown(groups)}")
    params = [p for group in opt.param_groups for p in group["params"]]
    for k, (group, expected) in enumerate(zip(groups, live)):
        if not isinstance(group, dict):
            raise CheckpointError(f"{where}.param_groups[{k}] must be a JSON object, found {shown(group)}")
        if set(group) != set(expected):
            odd = sorted(set(group) ^ set(expected), key=str)[0]
            raise CheckpointError(f"{where}.param_groups[{k}] {'has the unknown' if odd in group else 'lacks the'} "
                                  f"key {shown(odd)} (this run's optimiser has {len(expected)} keys)")
        for name, reference in expected.items():
            _check_like(f"{where}.param_groups[{k}].{name}", group[name], reference)
    for idx, entry in state.items():
        if not 0 <= idx < len(params):
            raise CheckpointError(f"{where}: state of parameter {idx}, but the optimiser has {len(params)}")
        for item, value in entry.items():
            if torch.is_tensor(value):
                if value.ndim and tuple(value.shape) != tuple(params[idx].shape):
                    raise CheckpointError(f"{where}: {item} of parameter {idx} has shape {tuple(value.shape)}, "
                                          f"expected {tuple(params[idx].shape)}")
            else:
                _check_like(f"{where}.scalars.{idx}.{item}", value, 0.0)


def _check_like(name: str, value, reference) -> None:
    """`value` (from JSON) of the kind of `reference` (from the live optimiser); see check_optimizer_state."""
    if isinstance(reference, bool) or reference is None:
        ok, expected = isinstance(value, bool) or value is None, "true or false (or null)"
    elif isinstance(reference, (int, float)):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0)
        expected = "a finite number >= 0"
    elif isinstance(reference, (list, tuple)) and name.endswith(".params"):
        ok, expected = value == list(reference), f"this run's parameter indices {shown(list(reference))}"
    elif isinstance(reference, (list, tuple)):
        ok, expected = isinstance(value, list) and len(value) == len(reference), f"a list of {len(reference)} values"
        for k, (item, ref) in enumerate(zip(value, reference) if ok else ()):
            _check_like(f"{name}[{k}]", item, ref)
    elif isinstance(reference, str):
        ok, expected = isinstance(value, str), "a string"
    else:
        ok, expected = True, ""  # a kind the optimiser's own load_state_dict checks
    if not ok:
        raise CheckpointError(f"{name} must be {expected}, found {shown(value)}")


# --- writing -----------------------------------------------------------------------------------------
def save(folder: str | os.PathLike, *, model: dict[str, torch.Tensor], train: dict[str, torch.Tensor],
         state: dict) -> Path:
    """Write one checkpoint folder atomically (see the module docstring), after `clean_stale`. A non-finite
    tensor or optimiser number is a CheckpointError, and nothing is written."""
    folder = Path(folder)
    bad = non_finite_value({"model.safetensors": model, "train.safetensors": train}, state)
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(folder)!r} not written: its {bad[0]}: {bad[1]}")
    if folder.parent.name == "checkpoints":  # a run folder's: see the module docstring
        clean_stale(folder.parent.parent)
    with atomic_folder(folder, replace=True) as tmp:  # the final save may rewrite the last periodic one
        save_file({k: v.detach().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in train.items()}, str(tmp / "train.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    return folder


def mark_latest(run_dir: str | os.PathLike, name: str) -> None:
    """Point RUN/checkpoints/latest at the checkpoint folder `name`, atomically (write, then rename)."""
    if not NAME.match(name) or not (Path(run_dir) / "checkpoints" / name).is_dir():
        raise CheckpointError(f"latest must name a checkpoint folder in {str(Path(run_dir) / 'checkpoints')!r}, "
                              f"found {name!r}")
    atomic_write_bytes(Path(run_dir) / "checkpoints" / LATEST, (name + "\n").encode())


def clean_stale(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporaries that killed writers left in a run folder: `.NAME.tmp-PID` files and
    folders in RUN/checkpoints (and of RUN's own files), and `.NAME.old-PID` folders, restored to NAME
    where a kill left NAME missing. Those of a process still running are kept. Returns their names."""
    run_dir = Path(run_dir)
    return remove_stale(run_dir / "checkpoints") + remove_stale(run_dir, names=("config.json", "metrics.jsonl"))


def non_finite_value(files: dict[str, dict[str, torch.Tensor]], state: dict) -> tuple[str, str] | None:
    """(file name, what) of the first non-finite value of a checkpoint: a floating tensor of `files` (file name ->
    tensors), or a number under state.json's FINITE_KEYS; None if every one is finite. A NaN weight or Adam eps
    would make every later step non-finite."""
    for file, tensors in files.items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return file, f"tensor {name!r} has non-finite values (NaN or inf)"
    for key in FINITE_KEYS:
        try:
            check_finite(key, state.get(key))
        except ValueError as err:
            return "state.json", str(err)
    return None


# --- reading -----------------------------------------------------------------------------------------
def check_state(state, where: str) -> dict:
    """A state.json's content, checked to hold what loading needs (STATE_KEYS, optimizer.param_groups);
    otherwise a one-line CheckpointError naming the file `where` and the key."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {where!r} must hold a JSON object, found {_json_kind(state)}")
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"checkpoint file {where!r} lacks the key {key!r}")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            expected = "an integer >= 0" if kind is int else "a JSON object"
            raise CheckpointError(f"checkpoint file {where!r}: {key} must be {expected}, found {shown(value)}")
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"checkpoint file {where!r}: format must be {FORMAT!r} (what this scoreaction reads), "
                              f"found {shown(state['format'])}")
    if not isinstance(state.get("metrics", {}), dict):
        raise CheckpointError(f"checkpoint file {where!r}: metrics must be a JSON object, found "
                              f"{_json_kind(state['metrics'])}")
    if not isinstance(state["optimizer"].get("param_groups"), list):
        raise CheckpointError(f"checkpoint file {where!r}: optimizer lacks the key 'param_groups' (a list)")
    return state


def read_state(path: Path) -> dict:
    """state.json, parsed and checked."""
    try:
        state = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise CheckpointError(f"checkpoint file {str(path)!r} is not valid JSON ({detail})") from None
    return check_state(state, str(path))


def check_safetensors(path: Path) -> None:
    """Whether a safetensors file is whole, from its header alone: its JSON parses and the tensors it
    lists end exactly at the end of the file (a truncated or padded file does not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER):
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupt ({err})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupt ({size} bytes, its header "
                              f"describes {8 + n + end})")


def check_folder(folder: Path) -> None:
    """Whether a checkpoint folder is intact, without reading its tensors: every file present, the
    safetensors headers consistent with the file sizes, state.json valid. A CheckpointError says why not."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} is not a folder"
                              + (" (it does not exist)" if not folder.exists() else ""))
    for name in FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r} is missing {name}")
    for name in FILES[:2]:
        check_safetensors(folder / name)
    read_state(folder / "state.json")


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, train tensors, state) of a checkpoint folder, or of a run folder's newest intact
    checkpoint (`resolve`); a missing or damaged file is a CheckpointError naming it."""
    folder = resolve(path)
    check_folder(folder)
    tensors = []
    for name in FILES[:2]:
        try:
            tensors.append(load_file(str(folder / name)))
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"checkpoint file {str(folder / name)!r} is truncated or corrupt "
                                  f"({detail})") from None
    model, train = tensors
    rng = train.get("rng")
    expected = torch.Generator().get_state()
    if rng is None or rng.dtype != expected.dtype or rng.shape != expected.shape:
        found = "nothing" if rng is None else f"{rng.dtype} of shape {tuple(rng.shape)}"
        raise CheckpointError(f"checkpoint file {str(folder / 'train.safetensors')!r} lacks the generator state "
                              f"'rng' (uint8 of shape {tuple(expected.shape)}); found {found}")
    state = read_state(folder / "state.json")
    bad = non_finite_value({"model.safetensors": model, "train.safetensors": train}, state)
    if bad is not None:
        raise CheckpointError(f"checkpoint file {str(folder / bad[0])!r}: {bad[1]}")
    return model, train, state


def resolve(path: str | os.PathLike, *, writing: bool = False) -> Path:
    """The checkpoint folder a path means: a checkpoint folder as it is (intact or not: loading it says),
    or for a run folder (or its checkpoints/) the newest intact checkpoint, preferring the one `latest`
    names. When that one is damaged or missing, a one-line warning on stderr says which is used instead;
    when none is intact, a CheckpointError says why the one `latest` names is not. `writing`: the caller
    will write into this run (a resume), which would replace the damaged newer checkpoints it passes over,
    so each is first renamed to `.NAME.damaged` beside it (kept for the user; the warning says so)."""
    path = Path(path)
    if not path.exists():
        return path  # loading it says that it does not exist
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file, not a checkpoint or run folder")
    if any((path / name).exists() for name in FILES):
        return path
    if path.name == "checkpoints" and (path / LATEST).is_file():
        path = path.parent
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a checkpoint nor a run folder with checkpoints/latest")
    named, why = _latest_name(checkpoints)
    if named is not None and not (checkpoints / named).is_dir():
        why = f"checkpoint {str(checkpoints / named)!r} that {LATEST} names is missing"
    problems, damaged = [], []
    for folder in _candidates(checkpoints, named):
        try:
            check_folder(folder)
        except CheckpointError as err:
            problems.append(str(err))
            damaged.append(folder)
            continue
        kept = ""
        if writing and damaged:
            for bad in damaged:
                os.replace(bad, bad.with_name(f".{bad.name}.damaged"))
            mark_latest(path, folder.name)  # so that loading it next says nothing more
            kept = f" (the damaged {'ones are' if len(damaged) > 1 else 'one is'} kept as .NAME.damaged)"
        if folder.name != named:
            _warn(f"{why or problems[0]}; using {str(folder)!r} instead{kept}")
        return folder
    if not problems:
        raise CheckpointError(f"run folder {str(path)!r} has no checkpoint ({why or 'checkpoints/ is empty'})")
    raise CheckpointError(f"run folder {str(path)!r} has no intact checkpoint: {problems[0]}")


def run_folder(path: str | os.PathLike) -> Path | None:
    """The run folder a path means, where a resume from it writes: a run folder itself (it has checkpoints/),
    RUN for RUN/checkpoints and for a checkpoint folder RUN/checkpoints/NAME; None for a checkpoint folder
    that lies in no run folder. Never the `out` a checkpoint recorded: a copied run resumes in the copy."""
    path = Path(path)
    if path.name == "checkpoints" and path.is_dir():
        return path.parent
    if path.parent.name == "checkpoints" and any((path / name).exists() for name in FILES):
        return path.parent.parent
    if (path / "checkpoints").is_dir():
        return path
    return None


def _latest_name(checkpoints: Path) -> tuple[str | None, str | None]:
    """(the name `latest` holds, None), or (None, why it cannot be used)."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None, f"{str(pointer)!r} is missing"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not NAME.match(name):
        return None, f"{str(pointer)!r} does not name a checkpoint (found {shown(name)})"
    return name, None


def _candidates(checkpoints: Path, named: str | None) -> list[Path]:
    """Checkpoint folders to try, best first: the one `latest` names (or, if a kill left it missing
    while it was replaced, its previous version `.NAME.old-PID`), then the other step-N folders (and
    old versions of missing ones), newest step first."""
    by_name: dict[str, list[Path]] = {}
    for entry in checkpoints.iterdir():
        stale = STALE.match(entry.name)
        if stale and stale["kind"] == "old" and entry.is_dir():
            by_name.setdefault(stale["name"], []).append(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            by_name.setdefault(entry.name, []).insert(0, entry)  # the folder itself before old versions
    for name, folders in by_name.items():
        if folders[0].name == name:
            del folders[1:]  # the folder exists: its old versions are leftovers
    ordered = by_name.pop(named, []) if named else []
    steps = sorted((n for n in by_name if STEP.match(n)), key=lambda n: int(STEP.match(n)[1]), reverse=True)
    return ordered + [folder for name in steps for folder in by_name[name]]


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"scoreaction: warning: {message}\n")
        sys.stderr.flush()


def _json_kind(value) -> str:
    kinds = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "null"}
    return kinds.get(type(value), "a JSON number" if isinstance(value, (int, float)) else type(value).__name__)
