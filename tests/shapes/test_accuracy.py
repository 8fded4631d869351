"""A pipeline's accuracy on the grammar: captions drawn per category from a split, each image scored against its
own caption (a pipeline that draws the ground truth scores 1, one that draws another caption's scene 0)."""

from types import SimpleNamespace

import numpy as np
import pytest

from scoreaction.shapes.accuracy import draw_captions, pipeline_accuracy
from scoreaction.shapes.grammar import CATEGORIES, category, split
from scoreaction.shapes.scenes import render


@pytest.mark.parametrize("which, categories", [("train", CATEGORIES),
                                                ("heldout", ("counting", "colors", "position", "color_attr"))])
def test_captions_are_drawn_per_category_from_the_split(which, categories):
    texts = draw_captions(which, 7, seed=3)
    assert [category(t) for t in texts] == [c for c in categories for _ in range(7)]
    assert {split(t) for t in texts} == {which}
    assert texts == draw_captions(which, 7, seed=3) != draw_captions(which, 7, seed=4)


class RenderingPipeline:
    """Stands in for a StableDiffusionPipeline: the scene of each caption (or of `swap[caption]`), as float images."""

    def __init__(self, swap=None):
        self.swap, self.calls = swap or {}, []

    def __call__(self, prompts, num_inference_steps, guidance_scale, height, width, output_type, generator):
        self.calls.append((len(prompts), num_inference_steps, guidance_scale, height, output_type))
        images = [render(self.swap.get(p, p), seed=i, size=height) / 255.0 for i, p in enumerate(prompts)]
        return SimpleNamespace(images=np.stack(images).astype(np.float32))


@pytest.mark.parametrize("swapped, expected", [(False, 1.0), (True, 0.0)])
def test_each_image_is_scored_against_its_own_caption(swapped, expected):
    texts = ["a red circle", "two squares", "a blue square left of a yellow triangle", "a circle and a square"]
    other = dict(zip(texts, ["a green triangle", "four triangles", "a red circle below a white square",
                             "a triangle"])) if swapped else {}
    pipe = RenderingPipeline(other)
    report = pipeline_accuracy(pipe, texts, steps=3, guidance=2.0, batch=3)
    assert pipe.calls == [(3, 3, 2.0, 32, "np"), (1, 3, 2.0, 32, "np")]
    assert report["overall"] == expected and set(report["per_category"].values()) == {expected}
    assert report["n"] == {"two_object": 1, "counting": 1, "colors": 1, "position": 1}
    assert report["steps"] == 3 and report["guidance"] == 2.0


def test_prompt_sets_hold_distinct_captions_per_category():
    from scoreaction.shapes.accuracy import prompt_set
    from scoreaction.shapes.grammar import captions

    texts = prompt_set("train", 8, seed=0)
    assert len(set(texts)) == len(texts) == 3 + 6 + 8 * 4  # single_object and two_object have 3 and 6 captions
    assert [category(t) for t in texts] == sorted((category(t) for t in texts), key=CATEGORIES.index)
    assert set(prompt_set("train", 1000)) == set(captions("train")) and prompt_set("train", 8, 1) != texts
