"""Files the library writes and reads back: atomic folders and files, checked state-dict loading.

A reader (a resuming run, a sampler, another process) sees the old version of a file or folder or the
new one, never half of either; a process killed at any moment leaves the old version or the new one
under the name, plus at most a temporary beside it:

    .NAME.tmp-PID   a file or folder being written (removed by `remove_stale` once PID has ended)
    .NAME.old-PID   the previous folder NAME during its replacement (`atomic_folder`); if a kill left
                    NAME missing, this is the intact old version, and `remove_stale` puts it back

Every writer here first removes what killed writers of the same NAME left (`remove_stale`).

Outputs of the command line follow one policy (`check_output`): an output that exists is replaced only
if it is the kind of thing the command writes (recognised by its files, see `Output`) and the user
asked (`--overwrite`); an output is never one of the command's inputs, nor a symbolic link. A folder
that a process keeps writing (a training run) is locked meanwhile (`FolderLock`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from scoreaction.errors import OutputError, ScoreactionError

STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, replace: bool = False):
    """Build a folder beside its final name, then rename it into place, so that readers see the old
    folder or the new one, never half of either. Yields the folder to fill.

    An existing folder at NAME (other than an empty one) is replaced only with `replace=True`: two renames
    (POSIX cannot swap two folders atomically), the old one to `.NAME.old-PID`, the new one to NAME; it is
    deleted only after. A kill between the renames leaves NAME missing and the intact old folder at
    `.NAME.old-PID`, which readers that care (see train/checkpoint.py) fall back to and `remove_stale`
    restores. An existing file at NAME is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{str(folder)!r} is a file; expected a folder (or a new name)")
    remove_stale(folder.parent, names=(folder.name,))
    if not replace and folder.is_dir() and _entries(folder):
        raise OutputError(f"{str(folder)!r} exists; it is replaced only when asked (replace=True)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
    except BaseException:
        _remove(tmp)
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        _remove(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    _remove(old)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and os.replace: readers see old or new, never half."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yield a file handle on `.NAME.tmp-PID` beside `path`; when the block ends, flush it to disk and rename
    it over `path` (an error in the block leaves `path` as it was). Temporaries that killed writers of the same
    name left are removed first."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{str(p)!r} is a folder; expected a file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(p.parent, names=(p.name,))
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        fsync_path(p.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename in it), to disk. A file that cannot be flushed (a full
    disk, an I/O error) raises its OSError; a folder that cannot be opened or flushed for that (some
    platforms and file systems do not allow it) is passed over."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not folder or err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: str | os.PathLike, names=None) -> list[str]:
    """Remove the temporaries that killed writers left in `folder` (see the module docstring): those
    of processes that no longer run, and this process's own; only those of `names` if given. A
    `.NAME.old-PID` folder whose NAME is missing is renamed back to NAME instead. Returns the names
    removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        match = STALE.match(entry.name)
        if not match or (names is not None and match["name"] not in names):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue  # another writer is at work
        target = folder / match["name"]
        if match["kind"] == "old" and entry.is_dir() and not target.exists():
            os.replace(entry, target)
        else:
            _remove(entry)
        done.append(entry.name)
    if done:
        fsync_path(folder)
    return done


# --- outputs: what a command may replace -----------------------------------------------------------
LOCK = ".lock"  # the lock file of a folder being written (FolderLock); not content


def _entries(folder: Path) -> list[str]:
    """The names in a folder, its lock file left out."""
    return sorted(e.name for e in folder.iterdir() if e.name != LOCK)


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
    `--overwrite` replaces only what such a command made, never a folder with files of the user's beside."""

    name: str
    folder: bool
    recognise: Callable[[Path], bool]
    allowed: Callable[[Path], bool] | None = None

    def recognises(self, path: Path) -> bool:
        if path.is_dir() != self.folder:
            return False
        try:
            return bool(self.recognise(path)) and not self.foreign(path)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return False

    def foreign(self, folder: Path) -> list[str]:
        """The names in a folder of this kind that such a command does not write (temporaries left out)."""
        if self.allowed is None:
            return []
        return [n for n in _entries(folder) if not STALE.match(n) and not self.allowed(folder / n)]


def named(*names: str, folders: bool = False) -> Callable[[Path], bool]:
    """Which entries a folder kind may hold: these names (and with `folders`, any folder)."""
    return lambda entry: entry.name in names or (folders and entry.is_dir() and not entry.is_symlink())


PNG = b"\x89PNG\r\n\x1a\n"
RUN = Output("training run folder (config.json, checkpoints/)", True, holds("config.json", "checkpoints/"),
             named("config.json", "checkpoints", "metrics.jsonl", "resumes.jsonl", "tensorboard"))
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
        names = _entries(path)
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
        if same or (kind.folder and p.is_dir() and Path(source).resolve().is_relative_to(p.resolve())):
            where = "is" if same else "holds"
            raise OutputError(f"{what} {str(p)!r} {where} an input of this command ({str(source)!r}); "
                              f"write the output elsewhere")
    p = (check_output_folder if kind.folder else check_output_file)(p, what)
    if not p.exists() or (p.is_dir() and not _entries(p)):
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
    return p


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
    folder = Path(folder)
    remove_stale(folder.parent, names=(folder.name,))
    if fresh and folder.is_dir() and _entries(folder):
        check_output(folder, kind, overwrite=overwrite, what=what)
        with FolderLock(folder, what):
            aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, aside)
        folder.mkdir()
        lock = FolderLock(folder, what)
        _remove(aside)
        fsync_path(folder.parent)
        return lock
    check_output_folder(folder, what)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder, what)
    if fresh and _entries(folder):  # another writer made it meanwhile
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


def load_matching(module, tensors: dict, what: str, *,
                  allow_extra: bool = True) -> None:
    """Load `tensors` into `module` after checking every key and shape; a mismatch is a one-line
    ScoreactionError starting with `what` (e.g. "checkpoint 'DIR' does not match the policy")."""
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or (extra and not allow_extra):
        found = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise ScoreactionError(f"{what}: {found}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ScoreactionError(f"{what}: {key!r} has shape {tuple(tensors[key].shape)}, "
                                   f"expected {tuple(value.shape)}")
    module.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()})


def image_grid(images, per_row: int = 10, value_range: tuple[float, float] = (-1.0, 1.0), pad: int = 1):
    """Images (N, C, H, W) with C = 1 or 3 -> one uint8 canvas (rows x cols, (H + pad) x (W + pad) each)
    as a numpy array (H', W') or (H', W', 3); values outside `value_range` are clipped."""
    import numpy as np

    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ScoreactionError(f"images must have shape (N, 1 or 3, H, W), found {tuple(x.shape)}")
    lo, hi = value_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    n, c, h, w = x.shape
    cols = min(per_row, n)
    rows = -(-n // cols)
    canvas = np.ones((c, rows * (h + pad) + pad, cols * (w + pad) + pad))
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    canvas = (canvas * 255).round().astype(np.uint8)
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_png(path: str | os.PathLike, array, scale: int = 1) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically, each pixel `scale` x `scale`."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.asarray(array))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
