"""Configuration: dataclass defaults < YAML file < command-line flags and `--set key=value` overrides.

Configs are plain nested dicts until a command hands each section to its dataclass, whose
`__post_init__` validates it. YAML is read with `safe_load` only: a config is data, never code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable

import yaml

from scoreaction.errors import ConfigError


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
    """Parse YAML text as data (never code). Besides yaml.YAMLError, text that YAML reads but Python
    cannot hold (an integer of over 4300 digits, nesting deeper than the recursion limit) is a ConfigError."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError("YAML value is nested too deeply") from None
    except ValueError as err:  # int() of a very long integer
        raise ConfigError(f"YAML value cannot be read ({str(err).split(';')[0]})") from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist" if not p.exists() else
                          f"config file {str(p)!r} is not a file")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not text (UTF-8)") from None
    except ConfigError as err:
        raise ConfigError(f"config file {str(p)!r}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, found {type(data).__name__}")
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
        raise ConfigError(f"override must look like section.key=value, found {item!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as err:
        raise ConfigError(f"override {key}=...: {err}") from None
    return key.split("."), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(config)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for part in keys[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = node[part]
        node[keys[-1]] = value
    return out


def section(config: dict, name: str) -> dict:
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, found {type(value).__name__}")
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
    """Mixin for config dataclasses: `from_dict` rejects unknown keys in one line; `to_dict`.

    Every number in an option is checked on construction (`check_numbers`): a float anywhere in a field
    (a scalar, a list such as a task's mean vector, a mapping such as a path's options) must be finite,
    an integer must fit in 64 bits, and a field declared as a float (`float`, `float | list`, ...) holds
    numbers, not strings. A subclass calls nothing for this: `__init_subclass__` wraps its
    `__post_init__`, checking the fields before it runs and, for mappings, after it (a mapping such as
    TrainConfig's `task:` section becomes a config dataclass there, which checks its keys, then itself).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_numbers", False):
            cls.__post_init__ = _checking_numbers(own)

    def __post_init__(self):
        check_numbers(self)
        check_numbers(self, mappings=True)

    @classmethod
    def from_dict(cls, values: dict, where: str = "in the config"):
        if not isinstance(values, dict):
            raise ConfigError(f"options {where} must be a mapping, found {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} {where}; expected one of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _checking_numbers(post_init: Callable) -> Callable:
    """`post_init` between the checks of the fields (before) and of the fields still mappings (after)."""

    @functools.wraps(post_init)
    def __post_init__(self, *args):
        check_numbers(self)
        post_init(self, *args)
        check_numbers(self, mappings=True)

    __post_init__.checks_numbers = True
    return __post_init__


def _declares_float(annotation) -> bool:
    """Whether a field's annotation (a string under `from __future__ import annotations`) is a number
    type that excludes text: float, float | None, float | list, list[float], ..."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return re.search(r"\bfloat\b", text) is not None and re.search(r"\bstr\b", text) is None


def check_numbers(options, *, mappings: bool = False) -> None:
    """Check every number in the fields of a config dataclass (see `Options`): the fields that are not
    mappings, or with `mappings` those that are. Config dataclasses in fields checked themselves when
    they were built. Errors are ConfigErrors naming the key path, e.g. "mean[0] must be finite, found nan"."""
    if not dataclasses.is_dataclass(options):
        return
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, dict) != mappings or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            continue
        try:
            check_finite(f.name, value, numbers_only=_declares_float(f.type))
        except RecursionError:
            raise ConfigError(f"{f.name} is nested too deeply") from None


def check_finite(name: str, value, *, numbers_only: bool = False) -> None:
    """Every float in `value` (a number, or lists, tuples, mappings, arrays or config dataclasses of them,
    at any depth) is finite and every integer fits in 64 bits; with `numbers_only`, strings are refused.
    `name` is the key of `value`; the error names the key path down to the offending entry."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, found {value!r}")
    elif isinstance(value, int):
        if value.bit_length() > 63:
            raise ConfigError(f"{name} must fit in 64 bits, found an integer of {value.bit_length()} bits")
    elif isinstance(value, str):
        if numbers_only:
            raise ConfigError(f"{name} must be a number, found {shown(value)}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_finite(f"{name}.{key}", item, numbers_only=numbers_only)
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            check_finite(f"{name}[{k}]", item, numbers_only=numbers_only)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_finite(f"{name}.{f.name}", getattr(value, f.name), numbers_only=_declares_float(f.type))
    elif hasattr(value, "dtype") and hasattr(value, "tolist"):  # a numpy or torch array or scalar
        check_finite(name, value.tolist(), numbers_only=numbers_only)


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlong, _repr.maxlevel = 60, 60, 40, 3


def shown(value) -> str:
    """A short repr of a value for an error message (long strings, huge integers, deep lists cut)."""
    try:
        return _repr.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__} too large to show"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite_number(name: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, found {value!r}")


def check_positive(name: str, value) -> None:
    """A finite number > 0."""
    _check_finite_number(name, value)
    if not (_is_number(value) and value > 0):
        raise ConfigError(f"{name} must be a number > 0, found {shown(value)}")


def check_nonnegative(name: str, value) -> None:
    """A finite number >= 0."""
    _check_finite_number(name, value)
    if not (_is_number(value) and value >= 0):
        raise ConfigError(f"{name} must be a number >= 0, found {shown(value)}")


def check_range(name: str, value, low: float, high: float) -> None:
    """A finite number in [low, high]."""
    _check_finite_number(name, value)
    if not (_is_number(value) and low <= value <= high):
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}], found {shown(value)}")


def check_positive_int(name: str, value) -> None:
    if not (_is_int(value) and value >= 1):
        raise ConfigError(f"{name} must be a positive integer, found {shown(value)}")


def check_nonnegative_int(name: str, value) -> None:
    if not (_is_int(value) and value >= 0):
        raise ConfigError(f"{name} must be an integer >= 0, found {shown(value)}")


SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT): what every generator we seed accepts


def check_seed(name: str, value) -> None:
    """A random seed: an integer in [0, 2**63 - 1] (torch, numpy and random all accept these)."""
    if not (_is_int(value) and 0 <= value < SEED_LIMIT):
        raise ConfigError(f"{name} must be an integer >= 0 and < 2**63, found {shown(value)}")


TIME_LIMIT = 253_402_300_800  # Unix time of the year 10000: timestamps are seconds in [0, TIME_LIMIT)


def check_timestamp(name: str, value) -> None:
    """A Unix time in seconds: a finite number from 1970 to the end of the year 9999."""
    if not (_is_number(value) and 0 <= value < TIME_LIMIT):  # a NaN fails the comparison
        raise ConfigError(f"{name} must be Unix time in seconds (from 0 to {TIME_LIMIT}, the year 10000), "
                          f"found {shown(value)}")


def check_choice(name: str, value, choices) -> None:
    try:
        known = value in choices
    except TypeError:  # an unhashable value (a list or a mapping) and a set of choices
        known = False
    if not known:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, found {shown(value)}")


def require(flag: str, value) -> None:
    """A "required" option: a field that defaults to None, named by its flag when it is missing."""
    if value is None:
        raise ConfigError(f"{flag} is required")


def check_text(name: str, value) -> None:
    """An optional string option (None, or a non-empty string)."""
    if value is not None and not (isinstance(value, str) and value):
        raise ConfigError(f"{name} must be a non-empty string, found {shown(value)}")


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (psutil where installed, else sysconf; 2^62 if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_size(name: str, value, limit: int, why: str = "") -> None:
    """An integer size option of at most `limit`; the error names the option, the value and the limit."""
    if _is_int(value) and value > limit:
        raise ConfigError(f"{name} must be at most {limit}{f' ({why})' if why else ''}, found {shown(value)}")


def check_samples(name: str, n, shape, itemsize: int = 4, copies: int = 2) -> None:
    """`n` samples of `shape` (`copies` arrays of them, e.g. the state and its noise) must fit in memory."""
    elements = math.prod(shape) if shape else 1
    check_memory(name, n, copies * elements * itemsize, f"{copies} x {elements} values of {itemsize} bytes per sample")


def check_steps(name: str, steps) -> None:
    """Solver steps: their time grid, steps + 1 float64 values, must fit in memory."""
    check_memory(name, steps, 8, "a time grid of float64 values")


def check_memory(name: str, value, bytes_each: int, what: str = "") -> None:
    """A size whose memory, `value * bytes_each` bytes (a lower bound of what it allocates, e.g. one float32
    per sample), must fit in this machine's memory: refused before anything is allocated."""
    total = memory_bytes()
    limit = max(1, total // max(1, bytes_each))
    check_size(name, value, limit, f"{what or f'{bytes_each} bytes each'}; this machine has {total / 2**30:.3g} GiB "
                                   f"of memory")


def check_flag(name: str, value) -> None:
    if type(value) is not bool:
        raise ConfigError(f"{name} must be true or false, found {shown(value)}")
