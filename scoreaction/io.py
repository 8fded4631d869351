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
import os
import re
import shutil
from pathlib import Path

from scoreaction.errors import OutputError, ScoreactionError

STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
LOCK = ".lock"  # the lock file of a folder being written (outputs.FolderLock); not content


def folder_entries(folder: Path) -> list[str]:
    """The names in a folder, its lock file left out."""
    return sorted(e.name for e in folder.iterdir() if e.name != LOCK)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, replace: bool = False):
    """Build a folder beside its final name, then rename it into place, so that readers see the old
    folder or the new one, never half of either. Yields the folder to fill.

    An existing folder at NAME (other than an empty one) is replaced only with `replace=True`: two renames
    (POSIX cannot swap two folders atomically), the old one to `.NAME.old-PID`, the new one to NAME; it is
    deleted only after. A kill between the renames leaves NAME missing and the intact old folder at
    `.NAME.old-PID`, which readers that care (see train/checkpoint.py) fall back to and `remove_stale`
    restores. An existing file at NAME is refused."""
    folder = Path(os.path.abspath(folder))  # "." and ".." have no name to put a temporary beside
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{str(folder)!r} is a file; expected a folder (or a new name)")
    remove_stale(folder.parent, names=(folder.name,))
    if not replace and folder.is_dir() and folder_entries(folder):
        raise OutputError(f"{str(folder)!r} exists; it is replaced only when asked (replace=True)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
    except BaseException:
        remove_path(tmp)
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        remove_path(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    remove_path(old)


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


def remove_path(path: Path) -> None:
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
            remove_path(entry)
        done.append(entry.name)
    if done:
        fsync_path(folder)
    return done


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
