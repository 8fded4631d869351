"""The captions of the shapes world: a small grammar covering GenEval's six categories, its parser, and a
train / held-out split of its prompts.

    caption  := phrase | phrase " and " phrase | phrase " " RELATION " " phrase
    phrase   := "a" [COLOUR] SHAPE | NUMBER [COLOUR] SHAPE "s"    ("one" takes the singular)
    SHAPE    := circle | square | triangle
    COLOUR   := red | green | blue | yellow | purple | white
    NUMBER   := one | two | three | four
    RELATION := left of | right of | above | below

The category follows from the caption's form, as in GenEval (Ghosh et al. 2023), where single objects,
pairs and counts name classes only and the colour categories add colours:

    single_object  "a circle"                             one shape, no colour
    two_object     "a circle and a square"                two different shapes, no colours
    counting       "three circles", "three green circles" a number (alone), colour optional
    colors         "a purple square"                      one shape with a colour
    position       "a red square left of a blue circle"   two different shapes, colours on both or neither
    color_attr     "a red circle and a green square"      two different shapes with two different colours

`parse` also accepts upper case, extra spaces, a final "." and GenEval's "a photo of " in front.

The split: a caption is held out when it uses one of the combinations in HELD_OUT (see `combinations`):
a colour-shape binding, a count of a shape, or a relation between two shapes (read in either direction:
"a circle left of a triangle" is "a triangle right of a circle"). Every other caption is a training
caption, so no training caption uses a held-out combination, while each word of a held-out caption
appears in training captions. single_object and two_object captions combine nothing of these kinds and
are all training captions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from scoreaction.errors import ScoreactionError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS = ("train", "heldout")

# (kind, ...) tuples as `combinations` returns them; relations in their canonical direction (left of, above)
HELD_OUT = frozenset({
    ("binding", "yellow", "circle"), ("binding", "green", "square"), ("binding", "purple", "triangle"),
    ("count", 3, "circle"), ("count", 2, "square"), ("count", 4, "triangle"),
    ("relation", "circle", "left of", "triangle"), ("relation", "square", "above", "circle"),
    ("relation", "triangle", "above", "square"),
})
CONVERSE = {"right of": "left of", "below": "above"}


@dataclass(frozen=True)
class Group:
    """`count` objects of one shape, all of `colour` (None: any colour)."""

    shape: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: its category, its object groups and, for position, the relation
    objects[0] RELATION objects[1]. Construct it with `parse` or check it with `check_spec`."""

    category: str
    objects: tuple[Group, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        """The caption's canonical text, which `parse` maps back to this spec."""
        phrases = [phrase(g, numbered=self.category == "counting") for g in self.objects]
        if self.relation:
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        return " and ".join(phrases)


def phrase(group: Group, numbered: bool = False) -> str:
    words = [NUMBERS[group.count - 1] if numbered else "a"]
    words += [group.colour] if group.colour else []
    words.append(group.shape + ("s" if group.count > 1 else ""))
    return " ".join(words)


def normalise(caption: str) -> str:
    text = " ".join(caption.lower().split()).removesuffix(".").rstrip()
    return text.removeprefix("a photo of ")


class _Words:
    """The words of one caption and a cursor, with errors that say what was expected where."""

    def __init__(self, caption: str):
        self.caption, self.words, self.i = caption, normalise(caption).split(), 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def fail(self, expected: str):
        done = " ".join(self.words[:self.i])
        where = f"after {done!r}" if done else "at the start"
        found = "the end" if self.peek() is None else repr(self.peek())
        raise ScoreactionError(f"caption {self.caption!r} is outside the shapes grammar: expected {expected} "
                               f"{where}, found {found}")

    def take(self, options, expected: str) -> str:
        word = self.peek()
        if word not in options:
            self.fail(expected)
        self.i += 1
        return word


def outside(caption: str, why: str):
    raise ScoreactionError(f"caption {caption!r} is outside the shapes grammar: {why}")


def _phrase(words: _Words, numbers: bool) -> tuple[Group, bool]:
    """One phrase: (its group, whether it began with a number)."""
    first = words.take(("a",) + (NUMBERS if numbers else ()),
                       "'a' or a number (one, two, three, four)" if numbers else "'a' (a number only alone)")
    count = 1 if first == "a" else NUMBERS.index(first) + 1
    colour = words.take(COLOURS, "") if words.peek() in COLOURS else None
    nouns = SHAPES if count == 1 else tuple(s + "s" for s in SHAPES)
    expected = ("a shape" if colour else "a colour or a shape") + f" ({', '.join(nouns)})"
    noun = words.take(nouns, expected)
    return Group(noun.removesuffix("s") if count > 1 else noun, colour, count), first != "a"


def parse(caption: str) -> Spec:
    """The spec of a caption of the grammar (module docstring); any other text is a one-line
    ScoreactionError naming the caption and what was expected where."""
    if not isinstance(caption, str):
        raise ScoreactionError(f"a caption must be text, found {type(caption).__name__}")
    words = _Words(caption)
    first, numbered = _phrase(words, numbers=True)
    if numbered:
        if words.peek() is not None:
            words.fail("the end (a number only in a caption of one phrase)")
        return Spec("counting", (first,))
    word, relation = words.peek(), None
    if word is None:
        return Spec("colors" if first.colour else "single_object", (first,))
    if word in ("left", "right"):
        words.i += 1
        words.take(("of",), "'of'")
        relation = f"{word} of"
    elif word in ("above", "below"):
        words.i += 1
        relation = word
    elif word != "and":
        words.fail("'and', a relation (left of, right of, above, below) or the end")
    else:
        words.i += 1
    second, _ = _phrase(words, numbers=False)
    if words.peek() is not None:
        words.fail("the end")
    if first.shape == second.shape:
        outside(caption, f"two objects need two different shapes, found {first.shape} twice")
    if (first.colour is None) != (second.colour is None):
        outside(caption, "give both objects a colour or neither")
    if relation:
        return Spec("position", (first, second), relation)
    if first.colour is None:
        return Spec("two_object", (first, second))
    if first.colour == second.colour:
        outside(caption, f"two coloured objects need two different colours, found {first.colour} twice")
    return Spec("color_attr", (first, second))


def read_captions(path) -> list[str]:
    """The captions of a prompt file, one per line (a final newline allowed), each checked by `parse`:
    a missing or non-UTF-8 file, an empty file, an empty line or a caption outside the grammar is a
    one-line ScoreactionError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScoreactionError(f"prompt file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ScoreactionError(f"prompt file {str(path)!r} is a folder; expected a file of captions") from None
    except UnicodeDecodeError:
        raise ScoreactionError(f"prompt file {str(path)!r} is not UTF-8 text") from None
    lines = text.splitlines()
    if not lines:
        raise ScoreactionError(f"prompt file {str(path)!r} is empty; expected one caption per line")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ScoreactionError(f"prompt file {str(path)!r} line {number} is empty; expected one caption "
                                   "per line")
        try:
            parse(line)
        except ScoreactionError as err:
            raise ScoreactionError(f"prompt file {str(path)!r} line {number}: {err}") from None
    return [line.strip() for line in lines]


def as_spec(caption_or_spec: str | Spec) -> Spec:
    """The spec of a caption, or a spec checked by `check_spec`."""
    return check_spec(caption_or_spec) if isinstance(caption_or_spec, Spec) else parse(caption_or_spec)


def check_spec(spec: Spec) -> Spec:
    """A spec built by hand, checked: it must be the parse of its own caption. Returns it."""
    if not isinstance(spec, Spec) or not all(isinstance(g, Group) for g in spec.objects):
        raise ScoreactionError(f"expected a shapes Spec of Groups, found {spec!r}")
    try:
        parsed = parse(spec.caption)
    except (ScoreactionError, IndexError, TypeError, AttributeError):
        parsed = None
    if parsed != spec:
        raise ScoreactionError(f"spec {spec!r} is not one of the grammar (its caption parses to {parsed!r})")
    return spec


def category(caption_or_spec: str | Spec) -> str:
    """The GenEval category of a caption: one of CATEGORIES."""
    return as_spec(caption_or_spec).category


def canonical(spec: Spec) -> Spec:
    """The spec with the same meaning in one form: pairs sorted, relations read as left of / above."""
    a = spec.objects
    if spec.relation in CONVERSE:
        return Spec(spec.category, (a[1], a[0]), CONVERSE[spec.relation])
    if len(a) == 2 and not spec.relation:
        return Spec(spec.category, tuple(sorted(a, key=lambda g: (g.shape, g.colour or ""))))
    return spec


def combinations(caption_or_spec: str | Spec) -> frozenset:
    """The combinations a caption uses, as the split reads them: ("binding", colour, shape) per coloured
    object, ("count", n, shape) for counting, ("relation", shape, "left of" | "above", shape) for position
    in the canonical direction."""
    spec = canonical(as_spec(caption_or_spec))
    found = {("binding", g.colour, g.shape) for g in spec.objects if g.colour}
    if spec.category == "counting":
        found.add(("count", spec.objects[0].count, spec.objects[0].shape))
    if spec.relation:
        found.add(("relation", spec.objects[0].shape, spec.relation, spec.objects[1].shape))
    return frozenset(found)


def split(caption_or_spec: str | Spec) -> str:
    """'heldout' if the caption uses a combination of HELD_OUT, else 'train'."""
    return "heldout" if combinations(caption_or_spec) & HELD_OUT else "train"


@functools.cache
def _all_specs() -> tuple[Spec, ...]:
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    specs = [Spec("single_object", (Group(s),)) for s in SHAPES]
    specs += [Spec("two_object", (Group(a), Group(b))) for a, b in pairs]
    specs += [Spec("counting", (Group(s, c, n),)) for n in range(1, 5) for c in (None,) + COLOURS for s in SHAPES]
    specs += [Spec("colors", (Group(s, c),)) for c in COLOURS for s in SHAPES]
    colour_pairs = [(None, None)] + [(c, d) for c in COLOURS for d in COLOURS]
    specs += [Spec("position", (Group(a, c), Group(b, d)), r)
              for r in RELATIONS for a, b in pairs for c, d in colour_pairs]
    specs += [Spec("color_attr", (Group(a, c), Group(b, d)))
              for a, b in pairs for c in COLOURS for d in COLOURS if c != d]
    return tuple(specs)


def specs(which: str = "all", category: str | None = None) -> list[Spec]:
    """Every spec of the grammar in a fixed order; `which` 'train', 'heldout' or 'all'; one category or all."""
    if which not in SPLITS + ("all",):
        raise ScoreactionError(f"split must be one of train, heldout, all; found {which!r}")
    if category is not None and category not in CATEGORIES:
        raise ScoreactionError(f"category must be one of {', '.join(CATEGORIES)}; found {category!r}")
    return [s for s in _all_specs() if (category is None or s.category == category)
            and (which == "all" or split(s) == which)]


def captions(which: str = "all", category: str | None = None) -> list[str]:
    """The captions of `specs(which, category)`."""
    return [s.caption for s in specs(which, category)]


__all__ = ["SHAPES", "COLOURS", "NUMBERS", "RELATIONS", "CATEGORIES", "HELD_OUT", "Group", "Spec", "parse",
           "category", "canonical", "combinations", "split", "specs", "captions", "check_spec", "as_spec",
           "read_captions"]
