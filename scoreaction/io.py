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


def image_grid(images, per_row: int = 10, value_range: tuple[float, float] = (-1.0, 1.0), pad: int = 1):
    """Images (N, C, H, W) with C = 1 or 3 -> one uint8 canvas (rows x cols, (H + pad) x (W + pad) each)
    as a numpy array (H', W') or (H', W', 3); values outside `value_range` are clipped."""
    import numpy as np

    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), found {tuple(x.shape)}")
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
