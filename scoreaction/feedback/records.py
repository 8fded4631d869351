"""What the preference store holds, checked and encoded: samples as .npy bytes (never pickle), PNG
pictures as their pixels, conditions, names, item ids and answers. Used by store.py and store_io.py."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
import uuid

import numpy as np

from scoreaction.config import check_timestamp
from scoreaction.errors import ScoreactionError

CHOICES = ("left", "right", "tie", "skip")
CHOICE_VALUE = {"left": 1.0, "right": 0.0, "tie": 0.5}  # P(left preferred); 'skip' carries no label
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")


def as_array(sample) -> np.ndarray:
    """A numpy array of a numeric dtype from an array, a tensor or nested lists (C order, native endian)."""
    if hasattr(sample, "detach"):  # a torch tensor, without importing torch here
        sample = sample.detach().cpu().numpy()
    a = np.asarray(sample)
    if a.dtype.kind not in "biuf":
        raise ScoreactionError(f"a sample must be an array of numbers (bool, int or float), found dtype {a.dtype}")
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """The array of .npy bytes, never unpickled. Its header is checked against the bytes first: a shape
    whose data the bytes do not hold (e.g. 2^50 floats in a few bytes) is refused before anything is allocated."""
    fmt, buf = np.lib.format, io.BytesIO(data)
    try:
        version = fmt.read_magic(buf)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version} (expected 1.0 or 2.0)")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(buf)
    except (ValueError, TypeError, SyntaxError) as err:
        raise ScoreactionError(f"a sample is not a valid .npy array ({str(err).splitlines()[0][:200]})") from None
    if dtype.hasobject:
        raise ScoreactionError("a sample's .npy array holds Python objects; expected numbers")
    size = math.prod(shape) * dtype.itemsize
    if size != len(data) - buf.tell():
        raise ScoreactionError(f"a sample's .npy header describes shape {shape} of {dtype} ({size} bytes), but "
                               f"{len(data) - buf.tell()} bytes follow it")
    return np.load(io.BytesIO(data), allow_pickle=False)


def png_array(png: bytes | str | os.PathLike) -> np.ndarray:
    """Decode a PNG (bytes or a file) to a uint8 (H, W, C) array: PNG is lossless, so nothing is lost."""
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as im:
        if im.format != "PNG":
            raise ScoreactionError(f"expected a PNG picture, found {im.format}")
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return np.asarray(im, dtype=np.uint8)


def check_condition(condition):
    """None, a class label (int) or a prompt (str); numpy/torch integer scalars become int."""
    if condition is None or isinstance(condition, str):
        return condition
    if hasattr(condition, "item") and getattr(condition, "ndim", 1) == 0:
        condition = condition.item()
    if isinstance(condition, bool) or not isinstance(condition, int):
        raise ScoreactionError(f"a condition must be None, a class label (int) or a prompt (str), found {condition!r}")
    return condition


def check_name(name, what: str = "labeler") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ScoreactionError(f"{what} name must be 1-64 letters, digits or _.@+- (starting with a letter or digit), "
                         f"found {name!r}")
    return name


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def as_item_id(value) -> int:
    """An item id: a Python (or numpy/torch scalar) integer that fits SQLite's 64 bits."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise ScoreactionError(f"an item id must be an integer from 1 to 2^63 - 1, found {value!r}")
    return value


def check_comparison(row: dict) -> tuple:
    """(uid, left, right, choice, labeler, created, response_ms) of an answer, checked."""
    choice = row.get("choice")
    if choice not in CHOICES:
        raise ScoreactionError(f"choice must be one of {list(CHOICES)}, found {choice!r}")
    response_ms = row.get("response_ms")
    if response_ms is not None:
        if isinstance(response_ms, bool) or not isinstance(response_ms, (int, float)) or not 0 <= response_ms < 1e9:
            raise ScoreactionError(f"response_ms must be a number of milliseconds >= 0 (or null), "
                                   f"found {response_ms!r}")
        response_ms = float(response_ms)
    created = row.get("created")
    if created is not None:
        check_timestamp("created", created)
    uid = row.get("uid") or uuid.uuid4().hex
    return (uid, as_item_id(row.get("left")), as_item_id(row.get("right")), choice, check_name(row.get("labeler")),
            time.time() if created is None else float(created), response_ms)
