"""A GenEval-style checker of images against captions of the shapes grammar: deterministic, on the CPU.

Detection (`detect`), in place of GenEval's object detector:
  1. colour: each pixel takes the nearest of the palette and the background (Euclidean RGB, 0-255);
     a palette pixel farther than MAX_DISTANCE from its colour is background;
  2. objects: connected components (8-neighbour) of each colour, smaller than `min_area` ignored
     (MIN_AREA pixels at 32 x 32, scaled with the image's area);
  3. shape: from the moments of the object's coverage (`coverage`: each pixel's share of the colour
     against the background, over the component and its one-pixel fringe), which blur changes little
     (`classify`); a blob whose soft IoU with its shape's fitted template is below MIN_FIT has no
     shape and counts as no object.

Checks (`evaluate`), GenEval's `evaluate` with the detections' area for its confidence: for each object
group of the caption, the `count` largest objects of its shape are "found"; the caption holds when
  - at least `count` objects of the shape exist;
  - every found object has the group's colour (where the caption names one);
  - (position) each found object of the first group bears the relation to each of the second, by
    GenEval's relative position of boxes (geometry.relations: offset shrunk by 0.1 x the extents, a
    component past 0.5 of the offset's length);
  - (counting) no more than `count` objects of the shape exist;
  - nothing else: the image holds no more objects (of any shape or none, at least `min_area` pixels) than
    the caption names. GenEval's detector ignores clutter below its confidence threshold; the scenes of
    this world hold exactly the objects their caption names, and without this check an image of noise,
    whose many blobs include some shape, would pass single_object and two_object.
The binary score is 1 when every check holds (GenEval's 'correct'); the partial score is the mean credit
of the checks: found/count for the first, right colours/count for the second, 1 or 0 for the relation and at-most-count, named/found for nothing-else.
`summarise` aggregates binary scores as GenEval reports them: accuracy per category, and their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scoreaction.errors import ScoreactionError
from scoreaction.shapes.geometry import pixel_centres, relations, shape_mask
from scoreaction.shapes.grammar import CATEGORIES, SHAPES, Spec, as_spec
from scoreaction.shapes.scenes import BACKGROUND, PALETTE

MAX_DISTANCE = 110.0  # RGB distance (0-255) beyond which a pixel is no palette colour
MIN_AREA = 6  # pixels at 32 x 32: the smallest rendered object (a triangle of side 7) covers about 25
MIN_FIT = 0.5  # soft IoU with its shape's template below which a blob is no shape
TRIANGLE_SKEW = -0.15  # skew_y below which a blob is a triangle (exact shapes: -0.57 and 0)
SQUARE_RHO = 0.8  # rho from which a blob is a square (exact shapes: 1 and 2/3)
COLOUR_NAMES = tuple(PALETTE)
REFERENCE = np.array([PALETTE[c] for c in COLOUR_NAMES] + [BACKGROUND], dtype=np.float32)

try:
    from scipy import ndimage
except ImportError:  # scipy is optional: a numpy labelling below gives the same components
    ndimage = None


@dataclass(frozen=True)
class Detection:
    """One object found: shape (None: a blob of no shape), palette colour, area in pixels, box
    (x0, y0, x1, y1) in pixels with x1, y1 exclusive, and its IoU with the shape's template."""

    shape: str | None
    colour: str
    area: int
    box: tuple[int, int, int, int]
    fit: float


@dataclass(frozen=True)
class Score:
    """binary: 1.0 if every check holds, else 0.0; partial: the checks' mean credit; checks: (what, credit)."""

    binary: float
    partial: float
    checks: tuple[tuple[str, float], ...]


def as_pixels(image) -> np.ndarray:
    """An image (H, W, 3), uint8 or float in [0, 1] (clipped), as float32 values 0-255."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 8:
        raise ScoreactionError(f"expected an RGB image of shape (H, W, 3), found shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise ScoreactionError(f"expected a uint8 image or floats in [0, 1], found {x.dtype}")
    return np.round(np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255)


def colour_map(pixels: np.ndarray, max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """Per pixel the index of its palette colour (COLOUR_NAMES), or -1 for background."""
    d2 = ((pixels[:, :, None, :] - REFERENCE) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    far = np.take_along_axis(d2, nearest[..., None], -1)[..., 0] > max_distance ** 2
    return np.where((nearest == len(COLOUR_NAMES)) | far, -1, nearest)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-neighbour connected components of a boolean mask: labels 1..n in raster order of each
    component's first pixel (0 outside), and n. scipy.ndimage.label where scipy is installed."""
    if ndimage is not None:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        return labels, int(n)
    return label_numpy(mask)


def label_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """`label` in numpy: each pixel takes the smallest raster index among its 8 neighbours in the mask
    until nothing changes, then the component minima are numbered in order."""
    H, W = mask.shape
    big = H * W
    current = np.where(mask, np.arange(big).reshape(H, W), big)
    while True:
        padded = np.pad(current, 1, constant_values=big)
        neighbours = np.min([padded[1 + di:1 + di + H, 1 + dj:1 + dj + W]
                             for di in (-1, 0, 1) for dj in (-1, 0, 1)], axis=0)
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, current):
            break
        current = updated
    roots, labels = np.unique(current, return_inverse=True)
    labels = labels.reshape(H, W) + 1
    labels[~mask] = 0
    return labels, int(len(roots) - (not mask.all()))


def coverage(pixels: np.ndarray) -> np.ndarray:
    """(H, W, K): how much of each palette colour a pixel holds, read as a mix of that colour and the
    background: the projection of pixel - background on colour - background, clipped to [0, 1]."""
    ink = REFERENCE[:-1] - REFERENCE[-1]
    alpha = ((pixels - REFERENCE[-1]) @ ink.T) / (ink ** 2).sum(-1)
    return np.clip(alpha, 0.0, 1.0)


def dilate(mask: np.ndarray) -> np.ndarray:
    """A boolean mask grown by one pixel (8 neighbours)."""
    H, W = mask.shape
    padded = np.pad(mask, 1)
    return np.any([padded[1 + di:1 + di + H, 1 + dj:1 + dj + W] for di in (-1, 0, 1) for dj in (-1, 0, 1)], axis=0)


def moments(weights: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """(cx, cy, var_x, var_y, skew_y, rho) of weights (H, W) over the pixel centres: centroid, variances
    (+ 1/12, the continuous correction), the third standardised moment of y, and
    rho = E[X^2 Y^2] / (E[X^2] E[Y^2]) of the centred coordinates."""
    xs, ys = pixel_centres(*weights.shape)
    m = weights.sum()
    cx, cy = (weights * xs).sum() / m, (weights * ys).sum() / m
    X, Y = xs - cx, ys - cy
    vx, vy = (weights * X ** 2).sum() / m + 1 / 12, (weights * Y ** 2).sum() / m + 1 / 12
    skew = (weights * Y ** 3).sum() / m / vy ** 1.5
    rho = (weights * X ** 2 * Y ** 2).sum() / m / (vx * vy)
    return float(cx), float(cy), float(vx), float(vy), float(skew), float(rho)


def fitted_box(shape: str, cx: float, cy: float, vx: float, vy: float) -> tuple[float, float, float, float]:
    """The box of the uniform `shape` with this centroid and these variances: square var = side^2 / 12,
    circle var = radius^2 / 4, triangle (apex up) var_x = base^2 / 24, var_y = height^2 / 18 with the
    centroid at 2/3 of the height."""
    if shape == "square":
        sx, sy = np.sqrt(3 * vx), np.sqrt(3 * vy)
        return cx - sx, cy - sy, cx + sx, cy + sy
    if shape == "circle":
        rx, ry = 2 * np.sqrt(vx), 2 * np.sqrt(vy)
        return cx - rx, cy - ry, cx + rx, cy + ry
    w, h = np.sqrt(24 * vx), np.sqrt(18 * vy)
    return cx - w / 2, cy - 2 * h / 3, cx + w / 2, cy + h / 3


def classify(weights: np.ndarray) -> tuple[str | None, float]:
    """(shape, fit) of an object's coverage `weights` (H, W) in [0, 1], with room around it. The shape
    from moments, which blur changes little: a triangle (apex up) has skew_y about -0.57, circles and
    squares 0; a square has rho = 1 (its x and y are independent), a circle 2/3 (`moments`). fit is the
    soft IoU (sum of minima over sum of maxima) of the weights with that shape's template fitted to
    their moments (`fitted_box`); below MIN_FIT the blob is no shape (None)."""
    cx, cy, vx, vy, skew, rho = moments(weights)
    shape = "triangle" if skew < TRIANGLE_SKEW else "square" if rho >= SQUARE_RHO else "circle"
    xs, ys = pixel_centres(*weights.shape)
    template = shape_mask(shape, fitted_box(shape, cx, cy, vx, vy), xs, ys)
    fit = float(np.minimum(weights, template).sum() / np.maximum(weights, template).sum())
    return (shape if fit >= MIN_FIT else None), fit


def detect(image, min_area: float | None = None, max_distance: float = MAX_DISTANCE) -> list[Detection]:
    """The objects of an image (H, W, 3), uint8 or float in [0, 1], largest first (ties in raster order)."""
    pixels = as_pixels(image)
    H, W = pixels.shape[:2]
    min_area = MIN_AREA * H * W / 1024 if min_area is None else min_area
    colours = colour_map(pixels, max_distance)
    alpha = coverage(pixels)
    nearest_ink = ((pixels[:, :, None, :] - REFERENCE[:-1]) ** 2).sum(-1).argmin(-1)
    found = []
    for k, name in enumerate(COLOUR_NAMES):
        mask = colours == k
        if mask.sum() < min_area:
            continue
        labels, n = label(mask)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for i in np.flatnonzero(areas[1:] >= min_area) + 1:
            rows, cols = np.nonzero(labels == i)
            y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            pad = max(2, (y1 - y0 + x1 - x0) // 4)
            window = np.s_[max(y0 - pad, 0):y1 + pad, max(x0 - pad, 0):x1 + pad]
            own = labels[window] == i  # with its fringe: unlabelled neighbours nearest to its colour
            near = own | (dilate(own) & (labels[window] == 0) & (nearest_ink[window] == k))
            shape, fit = classify(np.where(near, alpha[window][..., k], 0.0))
            found.append(Detection(shape, name, int(areas[i]), (int(x0), int(y0), int(x1), int(y1)), fit))
    return sorted(found, key=lambda d: (-d.area, d.box[1], d.box[0]))


def evaluate(detections: list[Detection], caption_or_spec: str | Spec) -> Score:
    """The caption's checks on detected objects (module docstring)."""
    spec = as_spec(caption_or_spec)
    by_shape = {s: [d for d in sorted(detections, key=lambda d: -d.area) if d.shape == s] for s in SHAPES}
    checks, groups = [], []
    for g in spec.objects:
        objects = by_shape[g.shape]
        found = objects[:g.count]
        checks.append((f"{g.count} {g.shape}: found {len(objects)}", min(len(objects), g.count) / g.count))
        if g.colour:
            right = sum(d.colour == g.colour for d in found)
            checks.append((f"{g.colour} {g.shape}: {right} of {g.count}", right / g.count))
        groups.append(found)
    if spec.relation:
        holds = bool(groups[0] and groups[1]) and all(
            spec.relation in relations(a.box, b.box) for a in groups[0] for b in groups[1])
        checks.append((f"{spec.objects[0].shape} {spec.relation} {spec.objects[1].shape}", float(holds)))
    if spec.category == "counting":
        g = spec.objects[0]
        n = len(by_shape[g.shape])
        checks.append((f"at most {g.count} {g.shape}: found {n}", float(n <= g.count)))
    named = sum(g.count for g in spec.objects)
    checks.append((f"nothing else: {len(detections)} objects for {named} named",
                   min(1.0, named / len(detections)) if detections else 1.0))
    credits = [c for _, c in checks]
    return Score(float(all(c == 1.0 for c in credits)), float(np.mean(credits)), tuple(checks))


def score(image, caption_or_spec: str | Spec) -> Score:
    """The checker on one image (H, W, 3), uint8 or float in [0, 1]."""
    spec = as_spec(caption_or_spec)
    return evaluate(detect(image), spec)


def summarise(categories: list[str], binary: list[float], partial: list[float] | None = None) -> dict:
    """GenEval's report of binary scores: accuracy per category (those present, in CATEGORIES order),
    'overall' their mean, 'n' images per category; 'partial' the mean partial score if given."""
    if len(categories) != len(binary) or (partial is not None and len(partial) != len(binary)):
        raise ScoreactionError(f"summarise needs one category per score, found {len(categories)} categories "
                               f"for {len(binary)} scores")
    cats = np.asarray(categories)
    values = np.asarray(binary, dtype=float)
    per = {c: float(values[cats == c].mean()) for c in CATEGORIES if (cats == c).any()}
    out = {"overall": float(np.mean(list(per.values()))) if per else float("nan"), "per_category": per,
           "n": {c: int((cats == c).sum()) for c in per}}
    if partial is not None:
        out["partial"] = float(np.mean(partial)) if len(partial) else float("nan")
    return out
