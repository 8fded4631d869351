"""`scoreaction shapes ...`: render -> check end to end (ground truth scores 1, another prompt file
does not), and a fault table: bad input is one line, exit code 2, and no file created or changed."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from scoreaction.shapes.grammar import captions

ERROR_LINE = re.compile(r"^scoreaction( [a-z-]+)*: error: \S")
PROMPTS = ["a circle", "a circle and a triangle", "three red squares", "two triangles", "a purple square",
           "a white triangle above a blue circle", "a red circle and a green square"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prompt files good and bad, a rendered image folder and damaged copies of it."""
    root = tmp_path_factory.mktemp("world")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "other.txt").write_text("\n".join(PROMPTS[1:] + PROMPTS[:1]) + "\n")  # each line's image is another's
    (root / "empty-line.txt").write_text("a circle\n\na square\n")
    (root / "outside.txt").write_text("a circle\na red hexagon\n")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("a circle \xe9\n".encode("latin-1"))
    from scoreaction.cli import main
    assert main(["shapes", "render", "--prompts", str(root / "prompts.txt"), "--out", str(root / "images")]) == 0
    for name, change in {"missing": lambda d: (d / "000003.png").unlink(),
                         "unreadable": lambda d: (d / "000002.png").write_bytes(b"not a png"),
                         "truncated": lambda d: (d / "000002.png").write_bytes((d / "000002.png").read_bytes()[:60]),
                         "misnamed": lambda d: shutil.copy(d / "000001.png", d / "grid.png"),
                         "beyond": lambda d: shutil.copy(d / "000001.png", d / "000099.png")}.items():
        shutil.copytree(root / "images", root / name)
        change(root / name)
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    (root / "afile").write_text("x")
    return root


def test_render_then_check_scores_ground_truth_one_and_another_prompt_file_low(world, tmp_path, capsys):
    assert sorted(p.name for p in (world / "images").iterdir()) == [f"{i:06d}.png" for i in range(1, 8)]
    code, out, err = run_cli(capsys, "shapes", "check", "--images", world / "images", "--prompts",
                             world / "prompts.txt", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["overall"] == 1.0 and report["partial"] == 1.0 and len(report["images"]) == 7
    assert set(report["per_category"]) == {"single_object", "two_object", "counting", "colors", "position",
                                           "color_attr"}
    assert [r["line"] for r in report["images"]] == list(range(1, 8))
    code, out, _ = run_cli(capsys, "shapes", "check", "--images", world / "images", "--prompts", world / "other.txt",
                           "--json")
    assert code == 0 and sum(r["binary"] for r in json.loads(out)["images"]) <= 1
    code, out, _ = run_cli(capsys, "shapes", "check", "--images", world / "images", "--prompts", world / "prompts.txt")
    assert code == 0 and "overall" in out and "000007.png" in out
    # the same seed renders the same files; several images per line (N-K.png) are all scored
    again = tmp_path / "again"
    assert run_cli(capsys, "shapes", "render", "--prompts", world / "prompts.txt", "--out", again)[0] == 0
    assert snapshot(again) == snapshot(world / "images")
    shutil.copy(again / "000001.png", again / "1-2.png")
    code, out, _ = run_cli(capsys, "shapes", "check", "--images", again, "--prompts", world / "prompts.txt", "--json")
    assert code == 0 and [r["line"] for r in json.loads(out)["images"]] == [1, 1, 2, 3, 4, 5, 6, 7]


def test_render_takes_a_config_file(world, tmp_path, capsys):
    config = tmp_path / "render.yaml"
    config.write_text(f"prompts: {world / 'prompts.txt'}\nout: {tmp_path / 'big'}\nsize: 48\n")
    code, _, err = run_cli(capsys, "shapes", "render", "--config", config, "--set", "seed=3")
    assert code == 0, err
    from PIL import Image
    with Image.open(tmp_path / "big" / "000001.png") as image:
        assert image.size == (48, 48)


def test_prompts_lists_a_split(capsys):
    code, out, _ = run_cli(capsys, "shapes", "prompts", "--split", "heldout", "--category", "colors")
    assert code == 0 and out.splitlines() == captions("heldout", "colors")


FAULTS = [  # (argv with {w} for the world folder and {t} for the working folder, fragment of the error)
    ("render --prompts {w}/outside.txt --out {t}/o", "line 2: caption 'a red hexagon' is outside the shapes grammar"),
    ("render --prompts {w}/empty-line.txt --out {t}/o", "line 2 is empty"),
    ("render --prompts {w}/empty.txt --out {t}/o", "is empty"),
    ("render --prompts {w}/latin1.txt --out {t}/o", "not UTF-8"),
    ("render --prompts {w}/nothing.txt --out {t}/o", "does not exist"),
    ("render --prompts {w}/prompts.txt --out {w}/full", "not empty"),
    ("render --prompts {w}/prompts.txt --out {w}/afile", "afile"),
    ("render --prompts {w}/prompts.txt --out {t}/o --size 16", "from 32"),
    ("render --prompts {w}/prompts.txt --out {t}/o --seed -1", "seed must be an integer >= 0"),
    ("render --prompts {w}/prompts.txt --out {t}/o --set sizes=64", "sizes"),
    ("render --prompts {w}/prompts.txt", "--out"),
    ("check --images {w}/missing --prompts {w}/prompts.txt", "no image for prompt line 3"),
    ("check --images {w}/unreadable --prompts {w}/prompts.txt", "000002.png' is not a readable image"),
    ("check --images {w}/truncated --prompts {w}/prompts.txt", "000002.png' is not a readable image"),
    ("check --images {w}/misnamed --prompts {w}/prompts.txt", "'grid.png'"),
    ("check --images {w}/beyond --prompts {w}/prompts.txt", "'000099.png'"),
    ("check --images {w}/nowhere --prompts {w}/prompts.txt", "not a folder"),
    ("check --images {w}/images --prompts {w}/outside.txt", "outside the shapes grammar"),
    ("check --images {w}/images --prompts {w}/empty-line.txt", "line 2 is empty"),
    ("prompts --split test", "split must be one of"),
    ("prompts --category colours", "category must be one of"),
    ("validate --n 0", "n must be a positive integer"),
    ("validate --size 8", "from 32"),
]


@pytest.mark.parametrize("argv, fragment", FAULTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    before, here = snapshot(world), snapshot(tmp_path)
    code, out, err = run_cli(capsys, "shapes", *argv.format(w=world, t=tmp_path).split())
    assert code == 2 and err.count("\n") == 1 and ERROR_LINE.match(err), err
    assert fragment in err, err
    assert snapshot(world) == before and snapshot(tmp_path) == here
