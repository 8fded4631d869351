"""Files the library writes and reads back: atomic folders and files, checked state-dict loading.

A reader (a resuming run, a sampler, another process) sees the old version of a file or folder or the
new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Build a folder beside its final name, then rename it into place (replacing an old one), so that
    readers see the old folder or the new one, never half of either. Yields the folder to fill."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and os.replace: readers see old or new, never half."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_matching(module, tensors: dict, what: str, *,
                  allow_extra: bool = True) -> None:
    """Load `tensors` into `module` after checking every key and shape; a mismatch is a one-line
    ValueError starting with `what` (e.g. "checkpoint 'DIR' does not match the policy")."""
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or (extra and not allow_extra):
        raise ValueError(f"{what}: " + (f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"))
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ValueError(f"{what}: {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(value.shape)}")
    module.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()})
