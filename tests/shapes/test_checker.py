"""The GenEval-style checker: validated on ground-truth scenes of every category (>= 98 %) against
scenes of a different caption of the same category (<= 10 %), robust to noise, colour shifts, blur and
JPEG, the same with or without scipy, and GenEval's rules on hand-made detections."""

import numpy as np
import pytest

import scoreaction.shapes.checker as checker
from scoreaction.errors import ScoreactionError
from scoreaction.shapes.checker import Detection, detect, evaluate, score, summarise
from scoreaction.shapes.grammar import CATEGORIES, parse, specs
from scoreaction.shapes.scenes import PALETTE, render
from scoreaction.shapes.validation import implied, validate


def test_ground_truth_passes_and_other_captions_of_the_category_fail():
    results = validate(n=200, seed=11)["clean"]
    for category in CATEGORIES:
        assert results[category]["own"] >= 0.98, (category, results[category])
        assert results[category]["other"] <= 0.10, (category, results[category])


@pytest.mark.parametrize("degradation", ["noise", "shift", "blur", "jpeg"])
def test_degraded_scenes_still_pass_and_other_captions_still_fail(degradation):
    results = validate(n=50, seed=12, degradations=(degradation,))[degradation]
    for category in CATEGORIES:
        assert results[category]["own"] >= 0.9, (category, results[category])
        assert results[category]["other"] <= 0.10, (category, results[category])


def test_noise_passes_no_category():
    """A random model's images (smooth noise: many blobs, some of them shapes) pass nothing: nothing-else fails."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(14)
    captions = ["a circle", "a circle and a square", "two squares", "a red circle", "a square left of a circle"]
    for _ in range(40):
        image = np.clip(gaussian_filter(rng.normal(0.5, 0.5, (32, 32, 3)), (1.5, 1.5, 0)), 0, 1)
        assert detect(image), "smooth noise holds some objects"
        assert all(score(image, c).binary == 0.0 for c in captions)


def test_larger_images_are_checked_alike():
    results = validate(n=30, seed=13, size=64)["clean"]
    assert all(results[c]["own"] >= 0.96 and results[c]["other"] <= 0.1 for c in CATEGORIES), results


def test_implied_captions_are_not_counted_as_other_captions():
    assert implied(parse("three red circles"), parse("three circles"))
    assert implied(parse("a red square left of a blue circle"), parse("a blue circle right of a red square"))
    assert implied(parse("a circle and a square"), parse("a square and a circle"))
    assert not implied(parse("three circles"), parse("three red circles"))


def test_float_images_and_small_blobs_and_scipy_free_labelling_give_the_same_objects(monkeypatch):
    rng = np.random.default_rng(0)
    for i, spec in enumerate(specs("all")[::37]):
        image = render(spec, i)
        found = detect(image)
        assert detect(image.astype(np.float32) / 255) == found
        speckled = image.copy()
        for y, x in rng.integers(1, 29, (12, 2)):  # blobs of 2 x 2 pixels (< MIN_AREA) on the background
            if (speckled[y - 1:y + 3, x - 1:x + 3] == image[0, 0]).all():  # apart from objects and each other
                speckled[y:y + 2, x:x + 2] = list(PALETTE.values())[rng.integers(6)]
        assert evaluate(detect(speckled), spec).binary == 1.0, spec.caption
        monkeypatch.setattr(checker, "ndimage", None)
        assert detect(image) == found
        monkeypatch.undo()


def test_numpy_labelling_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for density in (0.2, 0.45, 0.6, 1.0, 0.0):
        mask = rng.random((23, 31)) < density
        expected, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        labels, m = checker.label_numpy(mask)
        assert m == n and np.array_equal(labels, expected)


def obj(shape, colour, x, y, side=8, area=None):
    return Detection(shape, colour, area or side * side, (x, y, x + side, y + side), 1.0)


RULES = [  # GenEval's rules with area as the detector's confidence, and nothing else: (caption, detections, binary, partial)
    ("a circle", [obj("circle", "red", 2, 2)], 1, 1),
    ("a circle", [obj("square", "red", 2, 2), obj(None, "red", 20, 20)], 0, (0 + 1 / 2) / 2),
    ("a circle", [obj("circle", "red", 2, 2), obj("square", "blue", 20, 20)], 0, (1 + 1 / 2) / 2),  # clutter
    ("a circle", [obj("circle", "red", 2, 2), obj(None, "blue", 20, 20)], 0, (1 + 1 / 2) / 2),  # a shapeless blob too
    ("a circle and a square", [obj("circle", "red", 2, 2)], 0, (1 + 0 + 1) / 3),
    ("three green circles", [obj("circle", "green", 2 + 9 * i, 2) for i in range(3)], 1, 1),
    ("three green circles", [obj("circle", "green", 2 + 9 * i, 2) for i in range(4)], 0, (1 + 1 + 0 + 3 / 4) / 4),
    ("three green circles", [obj("circle", "green", 2 + 9 * i, 2) for i in range(2)], 0, (2 / 3 + 2 / 3 + 1 + 1) / 4),
    ("three circles", [obj("circle", c, 2 + 9 * i, 2) for i, c in enumerate(("red", "blue", "white"))], 1, 1),
    # the largest circle must be the red one: a larger green circle fails the binding
    ("a red circle and a green square",
     [obj("circle", "green", 2, 2, 10), obj("circle", "red", 20, 2, 7), obj("square", "green", 2, 20)], 0,
     (1 + 0 + 1 + 1 + 2 / 3) / 5),
    ("a red circle and a green square", [obj("circle", "red", 2, 2), obj("square", "green", 20, 2)], 1, 1),
    ("a purple square", [obj("square", "blue", 2, 2)], 0, (1 + 0 + 1) / 3),
    ("a red square left of a blue circle", [obj("square", "red", 2, 10), obj("circle", "blue", 20, 10)], 1, 1),
    ("a red square right of a blue circle", [obj("square", "red", 2, 10), obj("circle", "blue", 20, 10)], 0, 5 / 6),
    ("a red square above a blue circle", [obj("square", "red", 2, 10), obj("circle", "blue", 20, 10)], 0, 5 / 6),
    ("a square below a circle", [obj("square", "red", 12, 22), obj("circle", "blue", 12, 2)], 1, 1),
    ("a square below a circle", [obj("square", "red", 12, 22)], 0, (1 + 0 + 0 + 1) / 4),
]


@pytest.mark.parametrize("caption, detections, binary, partial", RULES)
def test_checks_follow_genevals_rules(caption, detections, binary, partial):
    result = evaluate(detections, caption)
    assert result.binary == binary and result.partial == pytest.approx(partial), result.checks
    assert (result.binary == 1.0) == (result.partial == 1.0)


def test_summary_is_the_mean_over_categories_of_per_category_accuracy():
    cats = ["colors"] * 4 + ["counting"] * 2 + ["position"]
    summary = summarise(cats, [1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 0.5, 0.5, 1, 1])
    assert summary["per_category"] == {"counting": 0.5, "colors": 0.75, "position": 1.0}
    assert summary["overall"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert summary["n"] == {"counting": 2, "colors": 4, "position": 1}
    assert summary["partial"] == pytest.approx(6 / 7)
    with pytest.raises(ScoreactionError):
        summarise(["colors"], [1, 0])


@pytest.mark.parametrize("image", [np.zeros((32, 32)), np.zeros((3, 32, 32)), np.zeros((32, 32, 3), dtype=np.int64),
                                   np.zeros((4, 4, 3), dtype=np.uint8)])
def test_images_that_are_not_rgb_arrays_are_refused(image):
    with pytest.raises(ScoreactionError, match="expected"):
        score(image, "a circle")


def test_an_empty_dark_image_fails_every_caption():
    dark = np.full((32, 32, 3), 16, dtype=np.uint8)
    assert detect(dark) == []
    assert all(score(dark, s).binary == 0.0 for s in specs("all")[::50])
