"""docs/maths.md defines every equation tag (E1, E2, ...) that the package's docstrings and comments cite.

Tags are collected from the string literals and comments of scoreaction/**/*.py (never from code), as
the code writes them: "Eq. E11", "Eqs. E7, E11, E12", "(E8)", "(E10, last term)", ranges "E3-E6",
and bare mentions such as "the direct KL-gradient term of E14". flake8 codes ("# noqa: E402") are not
tags; "1e-3" and hex like "0xE1" never match because a tag must stand alone as a word.
"""

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scoreaction"
MATHS = ROOT / "docs" / "maths.md"
N_TAGS = 22

TAG = r"\bE(\d{1,2})\b"
RANGE = re.compile(TAG + r"\s*(?:-|–|—|\.\.|to)\s*" + TAG)
SINGLE = re.compile(TAG)
NOQA = re.compile(r"noqa\s*:\s*[A-Z]+\d+(?:\s*,\s*[A-Z]+\d+)*")
HEADING = re.compile(r"^#{1,6}\s+E(\d{1,2})\s+—\s+\S", re.MULTILINE)
TEXT_TOKENS = {tokenize.STRING, tokenize.COMMENT} | {
    getattr(tokenize, name) for name in ("FSTRING_MIDDLE",) if hasattr(tokenize, name)}


def tags_in_text(text: str) -> set[int]:
    """Equation numbers cited in one docstring, string literal or comment; ranges expanded."""
    text = NOQA.sub("", text)
    found = set()
    for m in RANGE.finditer(text):
        lo, hi = int(m.group(1)), int(m.group(2))
        assert lo < hi, f"backwards equation range {m.group(0)!r}"
        found.update(range(lo, hi + 1))
    found.update(int(m.group(1)) for m in SINGLE.finditer(text))
    return found


def tags_in_source(source: str) -> set[int]:
    """Tags cited in the string literals and comments of Python source (identifiers are ignored)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return set().union(*(tags_in_text(tok.string) for tok in tokens if tok.type in TEXT_TOKENS))


def cited_tags() -> dict[int, list[str]]:
    """{tag number: [files citing it]} over the whole package."""
    cited: dict[int, list[str]] = {}
    for py in sorted(PACKAGE.rglob("*.py")):
        for n in tags_in_source(py.read_text(encoding="utf-8")):
            cited.setdefault(n, []).append(str(py.relative_to(ROOT)))
    return cited


def defined_tags() -> list[int]:
    """Tag numbers of the `### E<n> — title` headings of docs/maths.md, in document order."""
    return [int(n) for n in HEADING.findall(MATHS.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("text, expected", [
    ('"""The score-as-action policy (Eqs. E3-E6): transitions."""', {3, 4, 5, 6}),
    ('"""CTRL (Eqs. E7, E11, E12, E14, E15)."""', {7, 11, 12, 14, 15}),
    ("x = 1  # td (E11) or grad (E12)", {11, 12}),
    ('"""the optimum (Eq. E8), as in E21."""', {8, 21}),
    ("import torch  # noqa: E402", set()),
    ("f = lambda v: v  # noqa: E731, E501", set()),
    ("lr = 1e-3  # 0xE1 is not a tag, nor E123 or E1a", set()),
    ("E11 = 3", set()),  # an identifier in code, not a citation
])
def test_tag_extraction(text, expected):
    assert tags_in_source(text + "\n") == expected


def test_maths_doc_defines_e1_to_e22_in_order():
    assert defined_tags() == list(range(1, N_TAGS + 1))


def test_every_cited_tag_is_defined():
    cited = cited_tags()
    assert len(cited) >= 5, f"found almost no equation citations under {PACKAGE}: {sorted(cited)}"
    defined = set(defined_tags())
    missing = {f"E{n}": files for n, files in sorted(cited.items()) if n not in defined}
    assert not missing, f"tags cited in the code but not defined in docs/maths.md: {missing}"
