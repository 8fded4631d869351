"""What the command line checks of the paths it is given before a command creates anything, and how it
words the errors of the machine (a file system, memory) that a command may still meet.

    check_paths(args)     every path option: no name longer than its file system allows, not under a file;
                          an output's folder writable, with some space free
    describe(err, flags)  the one line for an OSError, out-of-memory or library error, naming the option
                          whose path it concerns; None for anything else (a bug: its traceback is shown)
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

from scoreaction.errors import OutputError

PATH_OPTIONS = ("out", "store", "checkpoint", "resume", "config", "comparisons", "input", "reward_model")
OUTPUT_OPTIONS = ("out",)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
MIN_FREE = 1 << 20  # bytes an output's file system must have free before a command starts writing


# --- paths, before anything runs -----------------------------------------------------------------
def path_values(args: argparse.Namespace, flags: dict[str, str]) -> list[tuple[str, str]]:
    """(flag, path) of every path option given, on the command line or as `--set out=...`."""
    found = []
    for dest, value in vars(args).items():
        name = dest.split(":")[-1]
        if name in PATH_OPTIONS and isinstance(value, str) and value:
            found.append((flags.get(dest, "--" + name.replace("_", "-")), value))
    for item in getattr(args, "overrides", None) or []:
        key, sep, value = item.partition("=")
        if sep and key in PATH_OPTIONS and value.strip():
            found.append((f"--set {key}", value.strip()))
    return found


def nearest_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (the current folder at worst)."""
    for part in (path, *path.parents):
        if os.path.lexists(part):
            return part
    return Path(".")


def check_path(path: str, option: str, *, output: bool) -> None:
    """One path option (see the module docstring); an OutputError names the option, the path and the limit."""
    p = Path(path)
    where = f"{option} {shown_path(path)}"
    name_max, path_max = 255, 4096
    for part in (p, *p.parents):
        try:
            if os.path.isdir(part):
                name_max = os.pathconf(part, "PC_NAME_MAX")
                path_max = os.pathconf(part, "PC_PATH_MAX")
                break
        except (OSError, ValueError):
            continue
    for component in p.parts:
        if len(os.fsencode(component)) > name_max:
            named = "" if component == str(p) else f" {shown_path(component)}"
            raise OutputError(f"{where}: a name{named} of {len(os.fsencode(component))} bytes; this file system "
                              f"allows at most {name_max}")
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise OutputError(f"{where}: the path has {len(os.fsencode(os.path.abspath(path)))} bytes; "
                          f"this file system allows fewer than {path_max}")
    existing = nearest_existing(p)
    if existing != p and not existing.is_dir():
        raise OutputError(f"{where} lies under {shown_path(str(existing))}, which is a file; expected a folder there")
    if not output:
        return
    folder = (existing if existing.is_dir() else existing.parent).absolute()
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{where}: the folder {shown_path(str(folder))} is not writable")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE:
        raise OutputError(f"{where}: the file system of {shown_path(str(folder))} has {free} bytes free; "
                          f"a command needs at least {MIN_FREE}")


def check_paths(args: argparse.Namespace, flags: dict[str, str]) -> None:
    """check_path for every path option; outputs are OUTPUT_OPTIONS, and a --store that does not exist yet."""
    for option, path in path_values(args, flags):
        name = option.split()[-1].lstrip("-").replace("-", "_")
        output = name in OUTPUT_OPTIONS or (name == "store" and not os.path.lexists(path))
        check_path(path, option, output=output)


def shown_path(path: str, limit: int = 80) -> str:
    """A path for a message: its repr, with the middle of a very long one left out."""
    text = repr(str(path))
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """argparse dest -> its longest option string, over the parser and all its sub-commands."""
    out: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for dest, flag in flag_names(sub).items():
                    out.setdefault(dest, flag)
        elif action.option_strings:
            out.setdefault(action.dest, max(action.option_strings, key=len))
    return out


# --- errors of the machine, at the command line's boundary ---------------------------------------
def library_errors() -> tuple[type[BaseException], ...]:
    """Errors of the libraries that read our files, of those imported: they mean a damaged file, not a bug."""
    found: list[type[BaseException]] = [sqlite3.Error, MemoryError, OverflowError]
    if "safetensors" in sys.modules:
        found.append(sys.modules["safetensors"].SafetensorError)
    if "PIL.Image" in sys.modules:
        found.append(sys.modules["PIL.Image"].DecompressionBombError)
    return tuple(found)


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is an allocation that failed: MemoryError, torch's (CUDA) OutOfMemoryError, or the
    RuntimeError of torch's CPU allocator."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()
                                              or "std::bad_alloc" in text)


def option_of(path, args: argparse.Namespace, flags: dict[str, str]) -> str | None:
    """The option whose path is `path` or one of its folders (the longest such), if any."""
    try:
        target = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return None
    best, length = None, -1
    for option, value in path_values(args, flags):
        base = os.path.abspath(value)
        if (target == base or target.startswith(base.rstrip(os.sep) + os.sep)) and len(base) > length:
            best, length = option, len(base)
    return best


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_number(err: BaseException) -> int | None:
    """The errno of an OSError, or the one a library's message quotes ("... (os error 28)")."""
    if isinstance(err, OSError) and isinstance(err.errno, int):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found[1]) if found else None


def writing(args: argparse.Namespace, flags: dict[str, str]) -> str:
    """'--out PATH: ' when the command has one output (what a full or read-only disk concerns), else ''."""
    outputs = [(option, path) for option, path in path_values(args, flags)
               if option.split()[-1].lstrip("-").replace("-", "_") in OUTPUT_OPTIONS]
    return f"{outputs[0][0]} {shown_path(outputs[0][1])}: " if len(outputs) == 1 else ""


def describe(err: BaseException, args: argparse.Namespace, flags: dict[str, str]) -> str | None:
    """The one line for an error of the machine or of a library (see the module docstring), or None."""
    if out_of_memory(err):
        asked = re.search(r"allocate (\d+) bytes", str(err))
        detail = f"an allocation of {asked[1]} bytes failed" if asked else "an allocation failed"
        return f"out of memory ({detail}); reduce the sizes asked for (--n, --batch-size, --hidden, ...)"
    number = error_number(err)
    where = writing(args, flags) if number in WRITE_ERRNOS else ""
    if isinstance(err, OSError):
        reason = err.strerror or first_line(err)
        code = errno.errorcode.get(number) if number is not None else None
        reason = f"{reason} ({code})" if code and code not in reason else reason
        if err.filename is None:
            return where + reason
        names = " -> ".join(shown_path(os.fsdecode(f)) for f in (err.filename, err.filename2) if f is not None)
        option = option_of(err.filename, args, flags)
        return f"{option + ' ' if option else ''}{names}: {reason}"
    if isinstance(err, OverflowError):
        return f"a number is too large for this machine ({first_line(err)})"
    if isinstance(err, library_errors()):
        return f"{where}{type(err).__module__.split('.')[0]}: {first_line(err)}"
    return None
