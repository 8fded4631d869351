"""Procedural scenes of the shapes world: flat-coloured circles, squares and triangles on a dark background,
the ground truth of any caption of the grammar, deterministic from a seed.

A scene holds exactly the objects its caption names (1 to 4), each a whole-pixel mask (no anti-aliasing)
of one palette colour; an object without a colour in the caption gets a random one. Sides are drawn
uniformly from SIDES (in 32-pixel units, by the number of objects) and rounded to whole pixels, corners
uniformly on whole pixels inside a 1-pixel margin, and the objects' boxes keep a 2-pixel gap, so each
object is one connected blob whose bounding box is its box. For
position captions the pair is placed so that GenEval's rule finds the caption's relation with room to
spare and no other relation (`relation_fits`). Squares are axis-aligned and triangles point up.

    render(caption, seed, size)   one caption's scene, uint8 (size, size, 3)
    sample_scene(rng, size)       (scene, caption) for a caption drawn from a split: training pairs
    sample_batch(n, seed, size)   n such pairs at once, as an array (n, size, size, 3) and a list
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from scoreaction.errors import ScoreactionError
from scoreaction.shapes.geometry import relative_offsets, shape_mask
from scoreaction.shapes.grammar import CATEGORIES, COLOURS, SPLITS, Spec, as_spec, specs

PALETTE = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 235), "yellow": (235, 215, 40),
           "purple": (170, 50, 210), "white": (240, 240, 240)}
BACKGROUND = (16, 16, 24)
SIDES = {1: (9.0, 15.0), 2: (8.0, 13.0), 3: (7.0, 11.0), 4: (7.0, 10.0)}  # object side range, 32-pixel units
MARGIN, GAP = 1.0, 2.0  # pixels (32-pixel units) to the border and between boxes
CANDIDATES = 64  # positions tried at once per object
AXIS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


@dataclass(frozen=True)
class Placed:
    """One drawn object: shape, palette colour and box (x0, y0, x1, y1) in pixels."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]


def check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 1024:
        raise ScoreactionError(f"image size must be an integer from 32 to 1024 pixels, found {size!r}")
    return int(size)


def relation_fits(boxes_a: np.ndarray, boxes_b: np.ndarray, relation: str) -> np.ndarray:
    """Whether A RELATION B holds with room to spare, per pair of boxes (..., 4): GenEval's revised
    offset beyond 0.7 (it asks 0.5) on the relation's axis, and the raw offset's other component below
    0.3 of its length, so that no other relation holds."""
    axis, sign = AXIS[relation]
    main = relative_offsets(boxes_a, boxes_b, 0.1)[..., axis] * sign
    other = relative_offsets(boxes_a, boxes_b, 0.0)[..., 1 - axis]
    return (main > 0.7) & (np.abs(other) < 0.3)


def separated(a: np.ndarray, b: np.ndarray, gap: float) -> np.ndarray:
    """Whether boxes a and b (..., 4) keep `gap` pixels apart on at least one axis, elementwise."""
    return ((a[..., 2] + gap <= b[..., 0]) | (b[..., 2] + gap <= a[..., 0])
            | (a[..., 3] + gap <= b[..., 1]) | (b[..., 3] + gap <= a[..., 1]))


def apart(candidates: np.ndarray, placed: list[np.ndarray], gap: float) -> np.ndarray:
    """Which candidate boxes (K, 4) keep `gap` pixels from every placed box."""
    ok = np.ones(len(candidates), dtype=bool)
    for box in placed:
        ok &= separated(candidates, box, gap)
    return ok


def random_boxes(rng: np.random.Generator, side: int, size: int, margin: int) -> np.ndarray:
    """CANDIDATES square boxes (K, 4) of `side` pixels at whole-pixel corners uniformly inside the margin."""
    corner = rng.integers(margin, size - margin - side + 1, (CANDIDATES, 2)).astype(float)
    return np.concatenate([corner, corner + side], axis=1)


def layout(spec: Spec, rng: np.random.Generator, size: int = 32) -> list[Placed]:
    """The objects of a spec's scene: shapes, colours and non-overlapping boxes drawn from rng."""
    shapes = [g.shape for g in spec.objects for _ in range(g.count)]
    colours = [g.colour or COLOURS[rng.integers(len(COLOURS))] for g in spec.objects for _ in range(g.count)]
    scale = size / 32
    lo, hi = SIDES[len(shapes)]
    margin, gap = round(MARGIN * scale), GAP * scale
    for attempt in range(200):
        shrink = 0.98 ** attempt  # a crowded draw retries with slightly smaller objects
        sides = np.round(rng.uniform(lo, hi, len(shapes)) * scale * shrink).astype(int)
        boxes: list[np.ndarray] = []
        if spec.relation:
            a, b = random_boxes(rng, sides[0], size, margin), random_boxes(rng, sides[1], size, margin)
            ok = separated(a, b, gap) & relation_fits(a, b, spec.relation)
            if not ok.any():
                continue
            i = int(np.argmax(ok))
            boxes = [a[i], b[i]]
        else:
            for side in sides:
                cand = random_boxes(rng, side, size, margin)
                ok = apart(cand, boxes, gap)
                if not ok.any():
                    break
                boxes.append(cand[int(np.argmax(ok))])
        if len(boxes) == len(shapes):
            return [Placed(s, c, tuple(float(v) for v in box)) for s, c, box in zip(shapes, colours, boxes)]
    raise AssertionError(f"no layout found for {spec.caption!r} at size {size}")  # the sides leave room


def draw(objects: list[Placed], size: int = 32) -> np.ndarray:
    """The scene image: uint8 (size, size, 3), each object a flat mask of its palette colour."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        i0, j0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
        i1, j1 = min(int(np.ceil(y1)), size), min(int(np.ceil(x1)), size)
        xs, ys = np.arange(j0, j1)[None, :] + 0.5, np.arange(i0, i1)[:, None] + 0.5
        window = image[i0:i1, j0:j1]
        window[shape_mask(obj.shape, obj.box, xs, ys)] = PALETTE[obj.colour]
    return image


def render(spec_or_caption: str | Spec, seed=0, size: int = 32) -> np.ndarray:
    """Ground truth of a caption (or spec): uint8 (size, size, 3). `seed` is anything
    numpy.random.default_rng takes (an int, a sequence of ints, a Generator); the same seed, caption
    and size give the same image."""
    spec, size = as_spec(spec_or_caption), check_size(size)
    return draw(layout(spec, np.random.default_rng(seed), size), size)


@functools.cache
def pool(which: str) -> dict[str, tuple[Spec, ...]]:
    """The specs of a split ('train', 'heldout' or 'all'), by category (categories without any left out)."""
    if which not in SPLITS + ("all",):
        raise ScoreactionError(f"split must be one of train, heldout, all; found {which!r}")
    by_category = {c: tuple(specs(which, c)) for c in CATEGORIES}
    return {c: s for c, s in by_category.items() if s}


def sample_scene(rng: np.random.Generator, size: int = 32, split: str = "train") -> tuple[np.ndarray, str]:
    """(scene, caption) with the category uniform over those of the split and the caption uniform
    within it, so that each category weighs the same whatever its number of captions."""
    groups = pool(split)
    names = list(groups)
    choices = groups[names[rng.integers(len(names))]]
    spec = choices[rng.integers(len(choices))]
    return draw(layout(spec, rng, check_size(size)), size), spec.caption


def sample_batch(n: int, seed=0, size: int = 32, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """n pairs of `sample_scene` from one seed: images uint8 (n, size, size, 3) and their captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, check_size(size), size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        images[i], caption = sample_scene(rng, size, split)
        captions.append(caption)
    return images, captions
