"""The command line, derived from config dataclasses: each field written once, with its help text.

Every command takes `--config FILE` (YAML) and `--set section.key=value` (repeatable), and one
`--flag` per field declared with `config.option(..., flag=True)`. A configuration is assembled as

    dataclass defaults < --config file < explicit flags < --set overrides

and handed to the dataclasses, whose `__post_init__` validates it. Flags default to None so that a
flag left out never overrides the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from scoreaction.config import apply_overrides, load_yaml, merge
from scoreaction.errors import ConfigError

SCALARS = (int, float, str)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (defaults < file < flags < --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set task.dim=16 (repeatable; values are YAML)")


def _scalar_type(annotation) -> type | None:
    """int, float, str or bool for `T` and `T | None`; None for anything else (lists, mappings, unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if len(args) == 1 and args[0] in (*SCALARS, bool) else None
    return annotation if annotation in (*SCALARS, bool) else None


def flag_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    """(field, scalar type) of the fields of a config dataclass that become flags."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _scalar_type(hints[f.name])
        if f.metadata.get("flag", False) and kind is not None:
            out.append((f, kind))
    return out


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_options(parser: argparse.ArgumentParser, cls, section: str | None = None, *, skip=()) -> None:
    """One `--field-name` per flag field of `cls` (the values land in `section`, or at the top level)."""
    group = parser.add_argument_group(f"{section} options" if section else "configuration (config file keys)")
    for f, kind in flag_fields(cls):
        if f.name in skip:
            continue
        dest = flag_dest(f.name, section)
        flag = "--" + f.name.replace("_", "-")
        default = _default(f)
        text = f"{f.metadata['help']} (default {default})" if default not in (None, "") else f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=text.replace("%", "%%"))
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=text.replace("%", "%%"))


def flag_dest(name: str, section: str | None = None) -> str:
    """The argparse dest under which `flag_values` collects an option: for a spelling `add_options` cannot
    derive (a positional, or a flag named after a keyword such as `--in`), add the argument by hand with it."""
    return f"opt:{section or ''}:{name}"


def flag_values(args: argparse.Namespace) -> dict:
    """The flags the user typed, as a nested mapping {section: {key: value}} (top-level keys at the root)."""
    out: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith("opt:") or value is None:
            continue
        _, section, key = dest.split(":")
        (out.setdefault(section, {}) if section else out)[key] = value
    return out


def assemble(args: argparse.Namespace, base: dict | None = None) -> dict:
    """base < --config file < flags < --set: the nested mapping a command hands its dataclasses."""
    config = merge(base or {}, load_yaml(args.config) if getattr(args, "config", None) else {})
    config = merge(config, flag_values(args))
    return apply_overrides(config, getattr(args, "overrides", []))


def section(config: dict, name: str) -> dict:
    """One section of an assembled config (a mapping; missing: empty)."""
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"config section {name!r} must be a mapping, found {type(value).__name__}")
    return dict(value)


def checkpoint_overrides(task_options: dict, command: str) -> dict:
    """The task options of a command that reads a checkpoint (`command`, e.g. "sample --checkpoint"): only
    `task.reward`, naming again a `package.module:function` reward the run used so that its code may run (a
    checkpoint alone never imports code: rewards.images.imports_only). Returns {"task": {"reward": SPEC}} or {};
    any other task option is a ConfigError."""
    extra = sorted(set(task_options) - {"reward"}, key=str)
    if extra:
        raise ConfigError(f"{command} uses the run's own task; leave out --task and task.* options (task.reward may "
                          f"name again a reward of code the run used), found task.{extra[0]}")
    return {"task": {"reward": task_options["reward"]}} if "reward" in task_options else {}
