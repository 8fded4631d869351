"""Scenes: deterministic from the seed, the objects their caption names and nothing else, whole-pixel
flat colours, and training pairs drawn only from training captions."""

import numpy as np
import pytest

from scoreaction.errors import ScoreactionError
from scoreaction.shapes.grammar import CATEGORIES, parse, split
from scoreaction.shapes.scenes import BACKGROUND, PALETTE, layout, render, sample_batch, sample_scene

ONE_PER_CATEGORY = ["a triangle", "a circle and a square", "four white triangles", "a purple square",
                    "a red square left of a blue circle", "a red circle and a green square"]


@pytest.mark.parametrize("caption", ONE_PER_CATEGORY)
def test_render_is_deterministic_from_the_seed(caption):
    a, b, c = render(caption, 7), render(caption, 7), render(caption, 8)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(render(caption, [3, 5]), render(parse(caption), [3, 5]))


@pytest.mark.parametrize("size", [32, 48, 64])
def test_scenes_hold_exactly_the_named_objects_in_flat_palette_colours(size):
    allowed = {tuple(BACKGROUND), *PALETTE.values()}
    for seed, caption in enumerate(ONE_PER_CATEGORY * 5):
        spec = parse(caption)
        objects = layout(spec, np.random.default_rng(seed), size)
        assert sorted(o.shape for o in objects) == sorted(g.shape for g in spec.objects for _ in range(g.count))
        for o, g in zip(objects, [g for g in spec.objects for _ in range(g.count)]):
            assert g.colour in (None, o.colour)
            x0, y0, x1, y1 = o.box
            assert 1 <= x0 < x1 <= size - 1 and 1 <= y0 < y1 <= size - 1
        image = render(spec, seed, size)
        assert image.shape == (size, size, 3)
        assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed  # no anti-aliasing: checkable colours


def test_sampled_training_pairs_use_training_captions_and_cover_every_category():
    images, captions = sample_batch(300, seed=1)
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert all(split(c) == "train" for c in captions)
    assert {parse(c).category for c in captions} == set(CATEGORIES)
    again, same = sample_batch(300, seed=1)
    assert np.array_equal(images, again) and captions == same
    _, held = sample_batch(100, seed=2, split="heldout")
    assert all(split(c) == "heldout" for c in held)
    image, caption = sample_scene(np.random.default_rng(0), size=64, split="all")
    assert image.shape == (64, 64, 3) and parse(caption)


@pytest.mark.parametrize("size", [31, 16, 32.0, True, 2048])
def test_sizes_below_32_or_not_integers_are_refused(size):
    with pytest.raises(ScoreactionError, match="image size must be an integer from 32"):
        render("a circle", 0, size)
