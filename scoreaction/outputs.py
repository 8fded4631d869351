"""What a command may write over: output kinds recognised by their files, the one output check every command
makes (`check_output`), and the lock of a folder being written (`FolderLock`, `claim_folder`).

An existing output is replaced only when it is the kind the command writes and the user said `--overwrite`;
an output that is an input, a symbolic link, or a folder holding anything else is refused (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from scoreaction.errors import OutputError
from scoreaction.io import LOCK, STALE, folder_entries, fsync_path, remove_path, remove_stale

# --- outputs: what a command may replace -----------------------------------------------------------


def holds(*names: str) -> Callable[[Path], bool]:
    """A test that a folder holds every one of `names` ("NAME/" a folder, else a file)."""
    def test(folder: Path) -> bool:
        return all((folder / n.rstrip("/")).is_dir() if n.endswith("/") else (folder / n).is_file() for n in names)
    return test


def starts_with(*prefixes: bytes) -> Callable[[Path], bool]:
    """A test that a file begins with one of `prefixes` (its magic number)."""
    def test(path: Path) -> bool:
        with open(path, "rb") as fh:
            head = fh.read(max(len(p) for p in prefixes))
        return any(head.startswith(p) for p in prefixes)
    return test


def _safetensors_with(*keys: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(path.stat().st_size - 8, 2**24):
                return False
            header = json.loads(fh.read(n))
        return isinstance(header, dict) and all(k in header for k in keys)
    return test


def _jsonl_header(fmt: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        with open(path, "rb") as fh:
            head = json.loads(fh.readline(4096))
        return isinstance(head, dict) and head.get("format") == fmt
    return test


def _npz_with(name: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                return name in archive.namelist()
        except zipfile.BadZipFile:
            return False
    return test


@dataclass(frozen=True)
class Output:
    """A kind of output: its name in messages, whether it is a folder, how an existing one is recognised (its
    marker files or magic number) and, for a folder, which names it may hold (`allowed`; None: any), so that
    `--overwrite` replaces only what such a command made, never a folder with files of the user's beside.
    `allowed(entry)` says whether an entry is one such a command writes: True or False, or for a folder the
    paths inside it that are not (an empty list: none; see `tree`)."""

    name: str
    folder: bool
    recognise: Callable[[Path], bool]
    allowed: Callable[[Path], bool | list[str]] | None = None

    def recognises(self, path: Path) -> bool:
        if path.is_dir() != self.folder:
            return False
        try:
            return bool(self.recognise(path)) and not self.foreign(path)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return False

    def foreign(self, folder: Path) -> list[str]:
        """The paths in a folder of this kind, at any depth, that such a command does not write (temporaries
        left out)."""
        return [] if self.allowed is None else _foreign(folder, self.allowed)


def _foreign(folder: Path, allowed: Callable[[Path], bool | list[str]]) -> list[str]:
    found = []
    for name in folder_entries(folder):
        if STALE.match(name):
            continue
        verdict = allowed(folder / name)
        if verdict is False:
            found.append(name)
        elif verdict is not True:
            found += [f"{name}/{inner}" for inner in verdict]
    return found


def named(*names: str, folders: bool = False) -> Callable[[Path], bool]:
    """Which entries a folder kind may hold: these names (and with `folders`, any folder)."""
    return lambda entry: entry.name in names or (folders and entry.is_dir() and not entry.is_symlink())


def tree(spec: dict) -> Callable[[Path], bool | list[str]]:
    """Which entries a folder kind may hold, at every depth: `spec` maps a regular expression of names to None
    (a file of that name) or to the spec of a folder of that name. For a folder, the verdict is the list of
    paths inside it that the spec does not allow."""
    def allowed(entry: Path) -> bool | list[str]:
        for pattern, inner in spec.items():
            if re.fullmatch(pattern, entry.name):
                if entry.is_symlink() or entry.is_dir() != (inner is not None):
                    return False
                return True if inner is None else _foreign(entry, tree(inner))
        return False
    return allowed


PNG = b"\x89PNG\r\n\x1a\n"
CHECKPOINT_FILES = {r"model\.safetensors": None, r"train\.safetensors": None, r"state\.json": None}
RUN = Output("training run folder (config.json, checkpoints/)", True, holds("config.json", "checkpoints/"),
             tree({r"config\.json|metrics\.jsonl|resumes\.jsonl": None,
                   "checkpoints": {"latest": None, r"step-\d+": CHECKPOINT_FILES},
                   "tensorboard": {r"events\.out\.tfevents\..+": None}}))
REWARD_MODEL = Output("reward model folder (reward.json, model.safetensors)", True,
                      holds("reward.json", "model.safetensors"), named("reward.json", "model.safetensors"))
EXPORTED_PIPELINE = Output("exported LoRA or pipeline folder", True,
                           lambda p: holds("pytorch_lora_weights.safetensors")(p) or holds("model_index.json")(p),
                           named("pytorch_lora_weights.safetensors", "model_index.json", folders=True))
DIGITS_MODEL = Output("pretrained digits model folder (config.json, unet.safetensors, classifier.safetensors)",
                      True, holds("config.json", "unet.safetensors", "classifier.safetensors"),
                      named("config.json", "unet.safetensors", "classifier.safetensors"))
SAMPLES = Output("samples file (.npz of `sample`, or a PNG)", False,
                 lambda p: starts_with(PNG)(p) or _npz_with("samples.npy")(p))
COMPARISONS = Output("comparisons file (safetensors with left, right, choice)", False,
                     _safetensors_with("left", "right", "choice"))
STORE_EXPORT = Output("preference store export (JSON lines)", False, _jsonl_header("scoreaction-preferences"))
STORE = Output("preference store (SQLite)", False, starts_with(b"SQLite format 3\x00"))
KNOWN = (RUN, REWARD_MODEL, EXPORTED_PIPELINE, DIGITS_MODEL, SAMPLES, COMPARISONS, STORE_EXPORT, STORE)


def describe(path: Path) -> str:
    """What an existing path is, for messages: a kind of output it is recognised as, or its size."""
    for kind in KNOWN:
        if kind.recognises(path):
            return "a " + kind.name.split(" (")[0]
        if kind.folder and path.is_dir() and kind.recognise(path):
            extra = kind.foreign(path)
            return f"a {kind.name.split(' (')[0]} with other files in it ({', '.join(repr(n) for n in extra[:3])})"
    if path.is_dir():
        names = folder_entries(path)
        return f"a folder of {len(names)} entries ({', '.join(repr(n) for n in names[:3])}{', ...' * (len(names) > 3)})"
    return f"a file of {path.stat().st_size} bytes"


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder (hard links and `..` included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_output(path: str | os.PathLike, kind: Output, *, overwrite: bool = False, inputs: Iterable = (),
                 what: str = "--out", hint: str = "") -> Path:
    """The output policy of every command, before any work: `path` is not a symbolic link, not one of
    `inputs` (and, for a folder, holds none of them), has no file on the way to it, and is either new
    (an empty folder counts as new), or an existing `kind` with `overwrite` given. Anything else is a one-line
    OutputError naming the path and what it is. Returns the path."""
    p = Path(path)
    if p.is_symlink():
        raise OutputError(f"{what} {str(p)!r} is a symbolic link; outputs are never written through a link "
                          f"(give the path it points to)")
    for source in inputs:
        if source is None:
            continue
        same = same_path(p, source)
        inside = Path(source).is_dir() and p.resolve().is_relative_to(Path(source).resolve())
        if same or inside or (kind.folder and p.is_dir() and Path(source).resolve().is_relative_to(p.resolve())):
            where = "is" if same else "lies inside" if inside else "holds"
            raise OutputError(f"{what} {str(p)!r} {where} an input of this command ({str(source)!r}); "
                              f"write the output elsewhere")
    store = sqlite_sidecar_of(p)
    if store is not None:
        raise OutputError(f"{what} {str(p)!r} is the name SQLite gives a journal of the store {str(store)!r} beside "
                          f"it (it deletes or replays such a file when the store opens); choose another name")
    p = (check_output_folder if kind.folder else check_output_file)(p, what)
    if not p.exists() or (p.is_dir() and not folder_entries(p)):
        return p
    extra = kind.foreign(p) if kind.folder and kind.recognise(p) else []
    if extra:
        raise OutputError(f"{what} {str(p)!r} already exists and holds files that no {kind.name.split(' (')[0]} "
                          f"holds ({', '.join(repr(n) for n in extra[:3])}); it is never replaced (choose a new name)")
    if not kind.recognises(p):
        raise OutputError(f"{what} {str(p)!r} already exists and is {describe(p)}, not a {kind.name}; "
                          f"it is never replaced (choose a new name)")
    if not overwrite:
        raise OutputError(f"{what} {str(p)!r} already exists (a {kind.name.split(' (')[0]}); pass --overwrite to "
                          f"replace it{hint}")
    if p.is_dir() and Path.cwd().resolve().is_relative_to(p.resolve()):
        raise OutputError(f"{what} {str(p)!r} holds the current folder ({os.getcwd()!r}); a folder is never "
                          f"replaced from inside it (run the command from outside it)")
    return p


SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def sqlite_sidecar_of(path: Path) -> Path | None:
    """The SQLite database beside `path` whose write-ahead log, shared memory or rollback journal `path` would
    be (NAME-wal, NAME-shm, NAME-journal), if NAME exists and is one."""
    for suffix in SQLITE_SIDECARS:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            base = path.with_name(path.name[:-len(suffix)])
            try:
                if base.is_file() and STORE.recognise(base):
                    return base
            except OSError:
                return None
    return None


class FolderLock:
    """An exclusive lock on a folder while this process writes it: `fcntl.flock` on FOLDER/.lock, which holds
    the writer's process id. The system releases it when the process ends, however it ends (kill -9 too).
    A second writer gets a one-line OutputError naming the process that holds it."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        import fcntl

        self.folder = Path(folder)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"{what} {str(self.folder)!r} is in use by process {holder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    @staticmethod
    def check(folder: str | os.PathLike, what: str = "folder") -> None:
        """Refuse, as the constructor would, if another process holds the folder's lock; creates nothing."""
        import fcntl

        try:
            fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
        except OSError:
            return  # no lock file (or no folder): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{what} {str(folder)!r} is in use by process {_lock_holder(fd)}") from None
        finally:
            os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text if text.isdigit() else "(unknown)"


def claim_folder(folder: str | os.PathLike, kind: Output, *, fresh: bool, overwrite: bool = False,
                 what: str = "folder") -> FolderLock:
    """Create (or take) `folder` for a process that writes it over time, and lock it (FolderLock; the caller
    releases it). `fresh`: the folder must be new or empty, or an existing `kind` with `overwrite`, which is then
    moved aside (`.NAME.old-PID`), replaced by an empty folder and deleted. Checked again under the lock, so
    that two writers starting at once cannot both take a new folder."""
    folder = Path(os.path.abspath(folder))  # "." and ".." have no name to put a temporary beside
    remove_stale(folder.parent, names=(folder.name,))
    if fresh and folder.is_dir() and folder_entries(folder):
        check_output(folder, kind, overwrite=overwrite, what=what)
        with FolderLock(folder, what):
            aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, aside)
        folder.mkdir()
        lock = FolderLock(folder, what)
        remove_path(aside)
        fsync_path(folder.parent)
        return lock
    check_output_folder(folder, what)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder, what)
    if fresh and folder_entries(folder):  # another writer made it meanwhile
        lock.release()
        check_output(folder, kind, overwrite=False, what=what)
    return lock


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """An output path where a file will be written: not an existing folder, and its folder (created if
    missing) not an existing file. Returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a folder; expected a file name")
    _check_parents(p, what)
    return p


def check_output_folder(path: str | os.PathLike, what: str = "output") -> Path:
    """An output path where a folder will be written: not an existing file, and no file on the way to it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a file; expected a folder")
    _check_parents(p, what)
    return p


def _check_parents(p: Path, what: str) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what} {str(p)!r} cannot be created: {str(parent)!r} is a file, not a folder")
            return
