"""GenEval-style accuracy of a text-to-image pipeline on the shapes grammar: sample captions per category,
generate with the pipeline's own sampler, score with the checker, report as GenEval (checker.summarise).

    draw_captions(split, per_category, seed)      `per_category` captions of each category of a split
    prompt_set(split, per_category, seed)         as many distinct captions (fewer where a category has fewer)
    pipeline_accuracy(pipe, captions, ...)         summarise(...) of the pipeline's images of those captions
"""

from __future__ import annotations

import numpy as np
import torch

from scoreaction.config import check_positive, check_positive_int, check_seed
from scoreaction.shapes.checker import score, summarise
from scoreaction.shapes.grammar import category
from scoreaction.shapes.scenes import pool


def draw_captions(split: str = "train", per_category: int = 50, seed: int = 0) -> list[str]:
    """`per_category` captions of each category of `split` ('train', 'heldout', 'all'), drawn uniformly with
    replacement within the category from numpy's default_rng(seed); categories in CATEGORIES order."""
    check_positive_int("per_category", per_category)
    rng = np.random.default_rng(seed)
    out = []
    for specs in pool(split).values():
        out += [specs[i].caption for i in rng.integers(len(specs), size=per_category)]
    return out


def prompt_set(split: str = "train", per_category: int = 8, seed: int = 0) -> list[str]:
    """Up to `per_category` distinct captions of each category of `split` (all of a smaller category), drawn
    without replacement from numpy's default_rng(seed); categories in CATEGORIES order. The built-in prompt lists
    shapes-train and shapes-heldout of the diffusers task are prompt_set(split, 8, 0)."""
    check_positive_int("per_category", per_category)
    rng = np.random.default_rng(seed)
    out = []
    for specs in pool(split).values():
        out += [specs[i].caption for i in sorted(rng.permutation(len(specs))[:per_category])]
    return out


@torch.no_grad()
def pipeline_accuracy(pipe, captions: list[str], *, steps: int = 20, guidance: float = 5.0, seed: int = 0,
                      size: int = 32, batch: int = 64) -> dict:
    """The checker's report (per-category binary accuracy, overall, partial) on one image per caption, made by
    `pipe` (a StableDiffusionPipeline) in batches of `batch` with `steps` of its scheduler and classifier-free
    guidance `guidance`; image i's noise from torch.Generator seed (seed + i // batch)."""
    check_positive_int("steps", steps)
    check_positive_int("batch", batch)
    check_positive("guidance", guidance)
    check_seed("seed", seed)
    binary, partial = [], []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                      output_type="np", generator=torch.Generator().manual_seed(seed + start // batch)).images
        for image, caption in zip(images, chunk):
            s = score(np.clip(image, 0.0, 1.0), caption)
            binary.append(s.binary)
            partial.append(s.partial)
    report = summarise([category(c) for c in captions], binary, partial)
    report.update({"steps": steps, "guidance": guidance, "seed": seed})
    return report


__all__ = ["draw_captions", "pipeline_accuracy", "prompt_set"]
