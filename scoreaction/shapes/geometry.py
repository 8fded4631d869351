"""The geometry shared by the renderer and the checker: the three shapes as pixel masks of a box, and
GenEval's relative position of two boxes.

Boxes are (x0, y0, x1, y1) in pixels, continuous, x to the right and y down (x1, y1 exclusive for a box
of whole pixels); a pixel (row i, column j) is inside a shape when its centre (j + 0.5, i + 0.5) is.
"""

from __future__ import annotations

import numpy as np


def shape_mask(shape: str, box, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask over the grid of pixel centres xs (1, W) and ys (H, 1): a square filling the box, a
    circle (ellipse) inscribed in it, or a triangle with its apex at the top centre and its base on
    the bottom edge."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    if shape == "circle":
        return ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
    if shape == "triangle":
        return (ys >= y0) & (ys <= y1) & (np.abs(xs - cx) <= (ys - y0) / h * (w / 2))
    raise ValueError(f"unknown shape {shape!r}")


def pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs (1, W), ys (H, 1)): the centres of a grid's pixels."""
    return np.arange(width)[None, :] + 0.5, np.arange(height)[:, None] + 0.5


def relative_offsets(boxes_a, boxes_b, threshold: float = 0.1) -> np.ndarray:
    """GenEval's revised offset of box A from box B over the offset's length, (..., 2) as (dx, dy), for
    boxes (..., 4): the centre offset, shrunk on each axis by `threshold` x the two boxes' summed extent
    on that axis (to zero at most). Coincident centres give (0, 0)."""
    a, b = np.asarray(boxes_a, dtype=float), np.asarray(boxes_b, dtype=float)
    offset = (a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2
    dims = (a[..., 2:] - a[..., :2]) + (b[..., 2:] - b[..., :2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    length = np.linalg.norm(offset, axis=-1, keepdims=True)
    return np.where(np.abs(revised).max(-1, keepdims=True) < 1e-3, 0.0, revised / np.maximum(length, 1e-12))


def relations(box_a, box_b, threshold: float = 0.1, cut: float = 0.5) -> set[str]:
    """Where box A lies relative to box B, as GenEval's `relative_position`: "left of" / "above" where
    the revised offset (`relative_offsets`) has a component below -cut, "right of" / "below" above +cut."""
    dx, dy = relative_offsets(box_a, box_b, threshold)
    return {name for name, hit in (("left of", dx < -cut), ("right of", dx > cut), ("above", dy < -cut),
                                   ("below", dy > cut)) if hit}
