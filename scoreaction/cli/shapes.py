"""`scoreaction shapes ...`: the shapes world's captions, ground-truth scenes and checker (docs/shapes.md).

    shapes prompts   print the captions of a split (train, heldout, all), one category or all
    shapes render    one ground-truth PNG per line of a prompt file: line N -> DIR/N.png, N zero-padded
                     to 6 digits (000001.png), seed (--seed, N)
    shapes check     score a folder of images against a prompt file: per image, per category, overall
    shapes validate  the checker's validation figures (scoreaction/shapes/validation.py)
    shapes accuracy  a pipeline's checker accuracy per category on the train and heldout splits, sampled by
                     stock diffusers (shapes/pretrain.evaluate); --record writes it into a shapes folder's record

`check` matches images to prompt lines by name: IMAGE = N.EXT or N-K.EXT (K-th image of line N, any
number per line), N the 1-based line number (any zero padding), EXT png, jpg or jpeg; other names are
refused, files of other extensions and hidden files ignored. Every line needs at least one image.
Each action's options are a dataclass below; each also takes `--config FILE` and `--set key=value`.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import (Options, check_choice, check_positive_int, check_seed, check_text, option,
                                require)
from scoreaction.errors import OutputError, ScoreactionError
from scoreaction.shapes.grammar import CATEGORIES
from scoreaction.shapes.scenes import check_size

IMAGE_NAME = re.compile(r"^(?P<line>\d+)(-(?P<k>\d+))?\.(png|jpe?g)$", re.IGNORECASE)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def image_name(line: int) -> str:
    return f"{line:06d}.png"


@dataclass
class PromptsOptions(Options):
    split: str = option("all", help="train, heldout or all")
    category: str | None = option(None, help="one category: " + ", ".join(CATEGORIES) + " (default: all)")

    def __post_init__(self):
        check_choice("split", self.split, ("train", "heldout", "all"))
        if self.category is not None:
            check_choice("category", self.category, CATEGORIES)


@dataclass
class RenderOptions(Options):
    prompts: str | None = option(None, help="captions of the shapes grammar, one per line; required")
    out: str | None = option(None, help="a new (or empty) folder for the PNGs; required")
    size: int = option(32, help="image side in pixels, 32 to 1024")
    seed: int = option(0, help="line N's scene is drawn from the seed (SEED, N)")

    def __post_init__(self):
        for flag, value in (("--prompts", self.prompts), ("--out", self.out)):
            require(flag, value)
            check_text(flag.lstrip("-"), value)
        check_size(self.size)
        check_seed("seed", self.seed)


@dataclass
class CheckOptions(Options):
    images: str | None = option(None, help="the images, named by prompt line (N.png or N-K.png); required")
    prompts: str | None = option(None, help="captions of the shapes grammar, one per line; required")

    def __post_init__(self):
        for flag, value in (("--images", self.images), ("--prompts", self.prompts)):
            require(flag, value)
            check_text(flag.lstrip("-"), value)


@dataclass
class ValidateOptions(Options):
    n: int = option(300, help="scenes per category")
    seed: int = option(0, help="random seed")
    size: int = option(32, help="image side in pixels")
    degraded: bool = option(False, help="also on noisy, shifted, blurred, JPEG and resampled scenes")

    def __post_init__(self):
        check_positive_int("n", self.n)
        check_seed("seed", self.seed)
        check_size(self.size)
        if not isinstance(self.degraded, bool):
            raise ScoreactionError(f"degraded must be true or false, found {self.degraded!r}")


@dataclass
class AccuracyOptions(Options):
    model: str = option("shapes", help="a StableDiffusionPipeline folder, or shapes (the shipped one)")
    per_category: int = option(50, help="captions per category of each split")
    steps: int = option(20, help="DDIM steps of the pipeline's own scheduler")
    guidance: float = option(5.0, help="classifier-free guidance")
    seed: int = option(0, help="captions drawn and noise from this seed")
    record: bool = option(False, help="write the figures into the folder's pretrain.json (a shapes model's "
                                      "record, e.g. after a change of the checker)")

    def __post_init__(self):
        check_text("model", self.model)
        for name in ("per_category", "steps"):
            check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        if not 0 < self.guidance <= 100:
            raise ScoreactionError(f"guidance must be in (0, 100], found {self.guidance!r}")


def read_options(args: argparse.Namespace, cls):
    """The action's options: defaults < --config < flags < --set, validated by `cls`."""
    return cls.from_dict(assemble(args), f"for shapes {args.shapes_command}")


def cmd_prompts(args) -> int:
    from scoreaction.shapes.grammar import captions

    opts = read_options(args, PromptsOptions)
    for caption in captions(opts.split, opts.category):
        print(caption)
    return 0


def cmd_render(args) -> int:
    from scoreaction.io import atomic_folder, save_png
    from scoreaction.outputs import check_output_folder
    from scoreaction.shapes.grammar import read_captions
    from scoreaction.shapes.scenes import render

    opts = read_options(args, RenderOptions)
    lines = read_captions(opts.prompts)
    out = check_output_folder(opts.out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"--out {str(out)!r} is a folder that is not empty; expected a new or empty folder")
    with atomic_folder(out) as tmp:
        for number, caption in enumerate(lines, 1):
            save_png(tmp / image_name(number), render(caption, seed=[opts.seed, number], size=opts.size))
    print(f"wrote {len(lines)} images to {str(out)!r}")
    return 0


def match_images(folder: Path, n_lines: int) -> list[tuple[Path, int]]:
    """(image path, 1-based line) for the images of `folder` (module docstring), sorted by line, then K."""
    if not folder.is_dir():
        raise ScoreactionError(f"--images {str(folder)!r} is not a folder")
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        match = IMAGE_NAME.match(path.name)
        if not match or not 1 <= int(match["line"]) <= n_lines:
            raise ScoreactionError(f"image {path.name!r} in {str(folder)!r} is not named by a prompt line: "
                                   f"expected N.png or N-K.png with N from 1 to {n_lines}")
        found.append((int(match["line"]), int(match["k"] or -1), path))
    missing = sorted(set(range(1, n_lines + 1)) - {line for line, _, _ in found})
    if missing:
        raise ScoreactionError(f"--images {str(folder)!r} has no image for prompt line {missing[0]} "
                               f"({len(missing)} lines without one); expected {image_name(missing[0])}")
    return [(path, line) for line, _, path in sorted(found)]


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise ScoreactionError(f"image {str(path)!r} is not a readable image ({type(err).__name__})") from None


def cmd_check(args) -> int:
    from scoreaction.shapes.checker import score, summarise
    from scoreaction.shapes.grammar import parse, read_captions

    opts = read_options(args, CheckOptions)
    lines = read_captions(opts.prompts)
    specs = [parse(caption) for caption in lines]
    images = [(path, line, read_image(path)) for path, line in match_images(Path(opts.images), len(lines))]
    rows = []
    for path, line, pixels in images:
        result = score(pixels, specs[line - 1])
        rows.append({"file": path.name, "line": line, "prompt": lines[line - 1],
                     "category": specs[line - 1].category, "binary": result.binary, "partial": result.partial,
                     "checks": [list(check) for check in result.checks]})
    summary = summarise([r["category"] for r in rows], [r["binary"] for r in rows], [r["partial"] for r in rows])
    if args.json:
        print(json.dumps({"images": rows, **summary}, indent=2))
        return 0
    for r in rows:
        failed = "; ".join(what for what, credit in r["checks"] if credit < 1)
        print(f"{r['file']:<14} {r['category']:<13} {r['binary']:.0f} {r['partial']:.3f}  {r['prompt']}"
              + (f"  [{failed}]" if failed else ""))
    print(f"\n{'category':<14} accuracy  images")
    for category, accuracy in summary["per_category"].items():
        print(f"{category:<14} {accuracy:8.3f}  {summary['n'][category]:6d}")
    print(f"{'overall':<14} {summary['overall']:8.3f}  {len(rows):6d}   (GenEval: mean over categories; "
          f"mean partial score {summary['partial']:.3f})")
    return 0


def cmd_validate(args) -> int:
    from scoreaction.shapes.validation import DEGRADATIONS, table, validate

    opts = read_options(args, ValidateOptions)
    results = validate(opts.n, opts.seed, opts.size, tuple(DEGRADATIONS) if opts.degraded else ("clean",))
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def cmd_accuracy(args) -> int:
    from scoreaction.models.pipeline_load import load_pipeline, model_folder
    from scoreaction.shapes import pretrain

    opts = read_options(args, AccuracyOptions)
    folder = model_folder(opts.model)
    if opts.record and not (folder / pretrain.RECORD).is_file():
        raise ScoreactionError(f"--record writes into a shapes model's {pretrain.RECORD}; {str(folder)!r} has none")
    load_pipeline(str(folder))  # checked component by component first: bad folders are one line
    cfg = pretrain.ShapesPretrainConfig(eval_per_category=opts.per_category, eval_steps=opts.steps,
                                        eval_guidance=opts.guidance)
    metrics = pretrain.evaluate(folder, cfg, opts.seed)
    if opts.record:
        pretrain.write_metrics(folder, metrics, "scoreaction shapes accuracy " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in opts.to_dict().items() if k not in ("record",)) + " --record")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for split in ("train", "heldout"):
            m = metrics[split]
            per = ", ".join(f"{c} {v:.3f}" for c, v in m["per_category"].items())
            print(f"{split}: overall {m['overall']:.3f} ({per}); partial {m['partial']:.3f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("shapes", help="the shapes world: captions, ground-truth scenes, the GenEval-style checker")
    ssub = p.add_subparsers(dest="shapes_command", metavar="ACTION", parser_class=type(p), required=True)

    def add(name: str, help: str, run, cls, json_flag: bool = False) -> None:
        q = ssub.add_parser(name, help=help, description=help)
        add_options(q, cls)
        add_config_args(q)
        if json_flag:
            q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(run=run)

    add("prompts", "print the captions of a split of the grammar", cmd_prompts, PromptsOptions)
    add("render", "one ground-truth PNG per line of a prompt file: line N -> OUT/00000N.png", cmd_render,
        RenderOptions)
    add("check", "score images (N.png or N-K.png for prompt line N) against a prompt file: per image, per "
        "category and overall (GenEval)", cmd_check, CheckOptions, json_flag=True)
    add("validate", "the checker's accuracy on ground truth and on other captions of each category", cmd_validate,
        ValidateOptions, json_flag=True)
    add("accuracy", "a pipeline's checker accuracy per category (train and heldout captions, stock diffusers "
        "sampling)", cmd_accuracy, AccuracyOptions, json_flag=True)
