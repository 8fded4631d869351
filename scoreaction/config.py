"""Configuration: dataclass defaults < YAML file < command-line flags and `--set key=value` overrides.

Configs are plain nested dicts until a command hands each section to its dataclass, whose
`__post_init__` validates it. YAML is read with `safe_load` only: a config is data, never code.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading 1e-3 and 1E+5 as floats (YAML 1.1 wants 1.0e-3 and reads 1e-3 as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML text as data (never code)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ValueError(f"config file {str(p)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping, found {type(data).__name__}")
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `update` replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value); the value is parsed as YAML (numbers, lists, true/false, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override must look like section.key=value, found {item!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(config)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for part in keys[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
            node = node[part]
        node[keys[-1]] = value
    return out


def section(config: dict, name: str) -> dict:
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"config section {name!r} must be a mapping, found {type(value).__name__}")
    return dict(value)


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None,
           flag: bool = True) -> Any:
    """A config field and its help text, written once: the command line derives `--name` from it (see
    cli/options.py). `factory` builds a mutable default; `flag=False` leaves the field to `--config` and
    `--set section.key=value` only (lists, mappings, rarely changed internals)."""
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Options:
    """Mixin for config dataclasses: `from_dict` rejects unknown keys in one line; `to_dict`."""

    @classmethod
    def from_dict(cls, values: dict, where: str = "in the config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} {where}; expected one of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name: str, value) -> None:
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{name} must be a number > 0, found {value!r}")


def check_nonnegative(name: str, value) -> None:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, found {value!r}")


def check_positive_int(name: str, value) -> None:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, found {value!r}")


def check_nonnegative_int(name: str, value) -> None:
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, found {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, found {value!r}")


def require(flag: str, value) -> None:
    """A "required" option: a field that defaults to None, named by its flag when it is missing."""
    if value is None:
        raise ValueError(f"{flag} is required")


def check_text(name: str, value) -> None:
    """An optional string option (None, or a non-empty string)."""
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"{name} must be a non-empty string, found {value!r}")


def check_flag(name: str, value) -> None:
    if type(value) is not bool:
        raise ValueError(f"{name} must be true or false, found {value!r}")
