"""The checker's validation: its binary accuracy on ground-truth scenes of each category, and how often
it passes a scene against a different caption of the same category, on clean and degraded scenes.

    python -m scoreaction.shapes.validation   (or `scoreaction shapes validate`)

For each category, `n` captions are drawn uniformly from the whole grammar with their scenes (seeds
(seed, i)); the "other" caption is drawn uniformly from the captions of the category that the first does
not imply: not the same in canonical form, nor the same with the colours dropped (a scene of "three red
circles" is one of "three circles").
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from scoreaction.shapes.checker import detect, evaluate
from scoreaction.shapes.grammar import CATEGORIES, Group, Spec, canonical, specs
from scoreaction.shapes.scenes import layout, draw, check_size


def box_blur(image: np.ndarray) -> np.ndarray:
    """The mean over each pixel's 3 x 3 neighbourhood (edges repeated)."""
    x = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    H, W = image.shape[:2]
    return np.mean([x[i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=0).round().astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resample(image: np.ndarray) -> np.ndarray:
    """Down to half size and back up, bilinear: the blur of a decoder that works at half resolution."""
    H, W = image.shape[:2]
    small = Image.fromarray(image).resize((W // 2, H // 2), Image.BILINEAR)
    return np.asarray(small.resize((W, H), Image.BILINEAR))


DEGRADATIONS = {
    "clean": lambda x, rng: x,
    "noise": lambda x, rng: np.clip(x + rng.normal(0, 15, x.shape), 0, 255).astype(np.uint8),  # sigma 15 / 255
    "shift": lambda x, rng: np.clip(x.astype(int) + rng.integers(-30, 31, 3), 0, 255).astype(np.uint8),
    "blur": lambda x, rng: box_blur(x),
    "jpeg": lambda x, rng: jpeg(x),
    "resample": lambda x, rng: resample(x),
}


def uncoloured(spec: Spec) -> Spec:
    return replace(spec, objects=tuple(Group(g.shape, None, g.count) for g in spec.objects))


def implied(a: Spec, b: Spec) -> bool:
    """Whether every scene of caption a is one of caption b by meaning: b is a, or a without colours."""
    return canonical(b) in (canonical(a), canonical(uncoloured(a)))


def validate(n: int = 300, seed: int = 0, size: int = 32, degradations=("clean",)) -> dict:
    """{degradation: {category: {"own": accuracy, "other": pass rate on another caption}}}."""
    size = check_size(size)
    out = {}
    for name in degradations:
        rng = np.random.default_rng([seed, len(out)])
        rows = {}
        for c, category in enumerate(CATEGORIES):
            pool = specs("all", category)
            own = other = 0.0
            for i in range(n):
                a = pool[rng.integers(len(pool))]
                b = a
                while implied(a, b):
                    b = pool[rng.integers(len(pool))]
                image = DEGRADATIONS[name](draw(layout(a, np.random.default_rng([seed, c, i]), size), size), rng)
                found = detect(image)
                own += evaluate(found, a).binary
                other += evaluate(found, b).binary
            rows[category] = {"own": own / n, "other": other / n}
        out[name] = rows
    return out


def table(results: dict) -> str:
    """The figures as a Markdown table: own accuracy / other-caption pass rate per category."""
    lines = ["| scenes | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{rows[c]['own']:.3f} / {rows[c]['other']:.3f}"
                                                for c in CATEGORIES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(validate(degradations=tuple(DEGRADATIONS))))
