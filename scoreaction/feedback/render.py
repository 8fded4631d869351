"""Drawing items as PNG pictures for the labeling app (server side, with Pillow).

    image        (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4: float pixels in [-1, 1] (the
                 diffusion convention; clipped), uint8 as they are; upscaled with nearest-neighbour
    point        (d,): one sample of a point task (`gaussian`, `mixture`) is one point, drawn as a large
                 red dot over a faint cloud of every item of the same task and condition, on axes shared
                 by all of them, so the two sides of a pair are drawn on the same axes; for d > 2 the
                 first two coordinates are drawn and the caption lists them all
    point set    (N, 2): a scatter plot, on axes shared by the items of its task and condition
"""

from __future__ import annotations

import io
import json
import math
import random
import threading

import numpy as np

from scoreaction.feedback.store import PreferenceStore


def item_kind(shape: tuple) -> str:
    """'point', 'points' (an (N, 2) set), 'image' or 'unknown'; see the module docstring."""
    if len(shape) == 1 and shape[0] >= 1:
        return "point"
    if len(shape) == 2 and shape[1] == 2:
        return "points"
    if len(shape) == 2 or (len(shape) == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4))):
        return "image"
    return "unknown"


def caption(array: np.ndarray, kind: str) -> str:
    if kind == "point":
        values = ", ".join(f"{v:.3g}" for v in array[:8].tolist()) + (", ..." if array.size > 8 else "")
        return f"x = ({values})" + ("  [drawn: x1, x2]" if array.size > 2 else "")
    if kind == "points":
        return f"{array.shape[0]} points"
    if kind == "image":
        h, w = image_hwc(array).shape[:2]
        return f"{w}\u00d7{h} image"
    return f"array of shape {tuple(array.shape)}"


def image_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 pixels; floats are read as [-1, 1], channels-first wins when ambiguous."""
    a = array
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=-1.0)
        return np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * 255
    return np.clip(a, 0, 255).astype(np.uint8)


def render_image(array: np.ndarray, size: int = 288) -> bytes:
    from PIL import Image

    pixels = image_hwc(array)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    im = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode)
    scale = max(1, size // max(im.size))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return png_bytes(im)


def xy(points: np.ndarray) -> np.ndarray:
    """The first two coordinates of points (n, d); a 1-D point lies on the x axis."""
    points = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    return points[:, :2] if points.shape[1] >= 2 else np.concatenate([points, np.zeros_like(points)], 1)


def square_bounds(points: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, half-width) of a square window holding (robustly) all the points."""
    points = points[np.isfinite(points).all(1)]
    if len(points) == 0:
        return 0.0, 0.0, 1.0
    q = (0.5, 99.5) if len(points) >= 200 else (0, 100)
    lo, hi = np.percentile(points, q[0], axis=0), np.percentile(points, q[1], axis=0)
    half = max(float((hi - lo).max()) / 2 * 1.15, 1e-3)
    return float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2, half


def nice_step(span: float) -> float:
    raw = span / 7
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def render_scatter(highlight: np.ndarray | None, cloud: np.ndarray, bounds, size: int = 288) -> bytes:
    """A scatter plot: `cloud` (n, 2) as faint dots (or as the item itself when highlight is None)."""
    from PIL import Image, ImageDraw, ImageFont

    ss = 2  # supersampling: draw at 2x, then downsample for smooth dots
    S, margin_l, margin_b, pad = size * ss, 34 * ss, 22 * ss, 6 * ss
    im = Image.new("RGB", (S, S), (255, 255, 255))  # RGB + an "RGBA" draw: fills are alpha-blended
    draw = ImageDraw.Draw(im, "RGBA")
    font = ImageFont.load_default(size=11 * ss)
    cx, cy, half = bounds
    x0, x1, y0, y1 = margin_l, S - pad, pad, S - margin_b

    def to_px(p):
        return x0 + (p[:, 0] - (cx - half)) / (2 * half) * (x1 - x0), y1 - (p[:, 1] - (cy - half)) / (2 * half) * (y1 - y0)

    step = nice_step(2 * half)
    for axis in (0, 1):
        centre = (cx, cy)[axis]
        for k in range(math.ceil((centre - half) / step), math.floor((centre + half) / step) + 1):
            v = k * step
            label = f"{v:.3g}" if abs(v) > 1e-12 else "0"
            if axis == 0:
                px = x0 + (v - (cx - half)) / (2 * half) * (x1 - x0)
                draw.line([(px, y0), (px, y1)], fill=(148, 163, 184, 255) if k == 0 else (226, 232, 240, 255),
                          width=ss)
                draw.text((px, y1 + 4 * ss), label, fill=(100, 116, 139, 255), font=font, anchor="mt")
            else:
                py = y1 - (v - (cy - half)) / (2 * half) * (y1 - y0)
                draw.line([(x0, py), (x1, py)], fill=(148, 163, 184, 255) if k == 0 else (226, 232, 240, 255),
                          width=ss)
                draw.text((x0 - 4 * ss, py), label, fill=(100, 116, 139, 255), font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline=(203, 213, 225, 255), width=ss)
    px, py = to_px(cloud) if len(cloud) else (np.zeros(0), np.zeros(0))
    r, colour = (1.6 * ss, (100, 116, 139, 85)) if highlight is not None else (2.6 * ss, (37, 99, 235, 190))
    for a, b in zip(px, py):
        if x0 <= a <= x1 and y0 <= b <= y1:
            draw.ellipse([a - r, b - r, a + r, b + r], fill=colour)
    if highlight is not None:
        (a,), (b,) = to_px(highlight[None])
        a, b = min(max(a, x0), x1), min(max(b, y0), y1)  # a point outside the window sits on its edge
        for radius, fill in ((11 * ss, (220, 38, 38, 50)), (7 * ss, (255, 255, 255, 255)), (5.5 * ss, (220, 38, 38, 255))):
            draw.ellipse([a - radius, b - radius, a + radius, b + radius], fill=fill)
    return png_bytes(im.resize((size, size), Image.LANCZOS))


def render_message(text: str, size: int = 288) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (size, size), (248, 250, 252))
    ImageDraw.Draw(im).text((size / 2, size / 2), text, fill=(100, 116, 139), anchor="mm",
                            font=ImageFont.load_default(size=12))
    return png_bytes(im)


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Renderer:
    """Draws items; keeps, per task and condition, the point cloud and shared axes of its items
    (recomputed when the items of that group change)."""

    def __init__(self, store: PreferenceStore, max_cloud: int = 4000):
        self.store, self.max_cloud = store, max_cloud
        self._groups: dict = {}
        self._lock = threading.Lock()

    def group(self, meta: dict) -> tuple[np.ndarray, tuple]:
        members = self.store.items(task=meta["task"], condition=meta["condition"])
        key = (meta["task"], json.dumps(meta["condition"]))
        version = (len(members), members[-1]["id"] if members else 0)
        with self._lock:
            cached = self._groups.get(key)
        if cached and cached[0] == version:
            return cached[1], cached[2]
        ids = [m["id"] for m in members if item_kind(m["shape"]) == item_kind(meta["shape"])]
        if len(ids) > self.max_cloud:
            ids = random.Random(0).sample(ids, self.max_cloud)
        arrays = self.store.item_arrays(ids)
        points = np.concatenate([xy(a if a.ndim == 2 else a.reshape(1, -1)) for a in arrays] or [np.zeros((0, 2))])
        bounds = square_bounds(points)
        cloud = points if item_kind(meta["shape"]) == "point" else np.zeros((0, 2))
        with self._lock:
            self._groups[key] = (version, cloud, bounds)
        return cloud, bounds

    def png(self, item_id: int) -> bytes:
        meta = self.store.item(item_id)
        array = self.store.item_array(item_id)
        kind = item_kind(meta["shape"])
        if kind == "image":
            return render_image(array)
        if kind == "point":
            cloud, bounds = self.group(meta)
            return render_scatter(xy(array[None])[0], cloud, bounds)
        if kind == "points":
            _, bounds = self.group(meta)
            return render_scatter(None, xy(array), bounds)
        return render_message(f"cannot draw shape {tuple(array.shape)}")

    def describe(self, item_id: int) -> dict:
        meta = self.store.item(item_id)
        kind = item_kind(meta["shape"])
        return {"id": item_id, "kind": kind, "caption": caption(self.store.item_array(item_id), kind)}
