"""The caption grammar: every caption parses back to its spec, categories follow the form, text outside
the grammar is a one-line error naming the caption and what was expected, and the held-out split
uses combinations no training caption uses."""

import pytest

from scoreaction.errors import ScoreactionError
from scoreaction.shapes.grammar import (CATEGORIES, COLOURS, HELD_OUT, NUMBERS, SHAPES, Group, Spec, captions,
                                        category, check_spec, parse, specs, split)

CASES = [
    ("a circle", "single_object", (Group("circle"),), None),
    ("a circle and a square", "two_object", (Group("circle"), Group("square")), None),
    ("three green circles", "counting", (Group("circle", "green", 3),), None),
    ("one triangle", "counting", (Group("triangle", None, 1),), None),
    ("four squares", "counting", (Group("square", None, 4),), None),
    ("a purple square", "colors", (Group("square", "purple"),), None),
    ("a red square left of a blue circle", "position", (Group("square", "red"), Group("circle", "blue")), "left of"),
    ("a triangle below a square", "position", (Group("triangle"), Group("square")), "below"),
    ("a red circle and a green square", "color_attr", (Group("circle", "red"), Group("square", "green")), None),
    ("  A Photo of a Red  Circle. ", "colors", (Group("circle", "red"),), None),
]


@pytest.mark.parametrize("caption, cat, objects, relation", CASES)
def test_captions_parse_to_their_spec_and_category(caption, cat, objects, relation):
    spec = parse(caption)
    assert spec == Spec(cat, objects, relation)
    assert category(caption) == cat and parse(spec.caption) == spec


def test_every_caption_of_the_grammar_parses_back_to_its_spec():
    all_specs = specs()
    assert len({s.caption for s in all_specs}) == len(all_specs) == len(captions())
    for spec in all_specs:
        assert parse(spec.caption) == check_spec(spec)
    assert {s.category for s in all_specs} == set(CATEGORIES)
    assert sum(s.category == "single_object" for s in all_specs) == len(SHAPES)
    assert sum(s.category == "counting" for s in all_specs) == len(NUMBERS) * (len(COLOURS) + 1) * len(SHAPES)


BAD = [
    ("a red hexagon", "expected a shape (circle, square, triangle) after 'a red', found 'hexagon'"),
    ("five red circles", "expected 'a' or a number (one, two, three, four) at the start, found 'five'"),
    ("two red circle", "expected a shape (circles, squares, triangles) after 'two red'"),
    ("a red circles", "found 'circles'"),
    ("a red circle near a blue square", "expected 'and', a relation"),
    ("a circle and a circle", "two different shapes"),
    ("a red circle and a square", "a colour or neither"),
    ("a red circle and a red square", "two different colours"),
    ("three circles and a square", "a number only in a caption of one phrase"),
    ("a circle and two squares", "after 'a circle and', found 'two'"),
    ("a circle left a square", "expected 'of' after 'a circle left'"),
    ("a circle and a square and a triangle", "expected the end"),
    ("", "found the end"),
    ("a red\ncircle and\nsquare", "outside the shapes grammar"),
]


@pytest.mark.parametrize("caption, fragment", BAD)
def test_text_outside_the_grammar_is_one_line_naming_caption_and_expectation(caption, fragment):
    with pytest.raises(ScoreactionError) as info:
        parse(caption)
    message = str(info.value)
    assert "\n" not in message and repr(caption) in message and fragment in message, message


@pytest.mark.parametrize("bad", [3, None, Spec("colors", (Group("circle"),)), Spec("counting", (Group("hexagon"),))])
def test_non_captions_and_inconsistent_specs_are_refused(bad):
    with pytest.raises(ScoreactionError):
        check_spec(bad) if isinstance(bad, Spec) else parse(bad)


def independent_combinations(spec: Spec) -> set:
    """The combinations of a spec, computed here from scratch: bindings, counts, relations (both directions
    folded into left of / above)."""
    out = {("binding", g.colour, g.shape) for g in spec.objects if g.colour}
    if spec.category == "counting":
        out.add(("count", spec.objects[0].count, spec.objects[0].shape))
    if spec.relation:
        a, b = spec.objects[0].shape, spec.objects[1].shape
        out.add({"left of": ("relation", a, "left of", b), "right of": ("relation", b, "left of", a),
                 "above": ("relation", a, "above", b), "below": ("relation", b, "above", a)}[spec.relation])
    return out


def test_held_out_captions_use_combinations_that_no_training_caption_uses():
    train, held = specs("train"), specs("heldout")
    assert len(train) + len(held) == len(specs()) and not {s.caption for s in train} & {s.caption for s in held}
    seen = set().union(*(independent_combinations(s) for s in train))
    assert not seen & HELD_OUT
    for spec in held:
        assert independent_combinations(spec) - seen, spec.caption  # something never seen in training
    words_in_training = {w for s in train for w in s.caption.split()}
    assert {w for s in held for w in s.caption.split()} <= words_in_training
    # each held-out kind is there, and every category keeps training captions
    assert {c[0] for c in HELD_OUT} == {"binding", "count", "relation"}
    assert {s.category for s in train} == set(CATEGORIES)
    assert {s.category for s in held} == {"counting", "colors", "position", "color_attr"}


def test_the_split_is_fixed_and_reads_relations_in_both_directions():
    assert split("a yellow circle") == "heldout" and split("a red circle") == "train"
    assert split("three circles") == "heldout" and split("three squares") == "train"
    assert split("a circle left of a triangle") == split("a triangle right of a circle") == "heldout"
    assert split("a triangle left of a circle") == "train"
    assert captions("train") == captions("train") and captions("heldout")[:3] == [
        s.caption for s in specs("heldout")[:3]]


@pytest.mark.parametrize("which, cat", [("test", None), ("train", "colours")])
def test_bad_split_or_category_is_refused(which, cat):
    with pytest.raises(ScoreactionError):
        specs(which, cat)
