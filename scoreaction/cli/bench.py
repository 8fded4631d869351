"""`scoreaction bench`: optimality, solver robustness and cost of every algorithm (see scoreaction/bench.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from scoreaction.experiments.finetune_bench import REPORT, SECTIONS, BenchConfig, run


def parse_sections(text: str) -> tuple:
    sections = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"--only takes a comma-separated subset of {','.join(SECTIONS)}, found {text!r}")
    return sections


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (for the report's header), rebuilt from the parsed options."""
    words = ["scoreaction", "bench"]
    for flag in ("task", "only", "out"):
        if getattr(args, flag):
            words += [f"--{flag}", str(getattr(args, flag))]
    if args.quick:
        words.append("--quick")
    if args.seed:
        words += ["--seed", str(args.seed)]
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    command = command_line(args)
    if args.task == "digits":
        return bench_digits(args, command)
    if args.task is not None:
        raise ValueError(f"--task must be 'digits' (the default benchmark covers gaussian and mixture), found "
                         f"{args.task!r}")
    sections = parse_sections(args.only) if args.only else SECTIONS
    if args.quick:
        out = args.out or tempfile.mkdtemp(prefix="scoreaction-bench-")
        config = BenchConfig.quick_config(out, seed=args.seed, sections=sections, command=command)
    else:
        config = BenchConfig(out=args.out or "docs/benchmarks", sections=sections, seed=args.seed, command=command,
                             workers=args.workers)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    run(config, log=log)
    print(Path(config.out) / REPORT)
    return 0


def bench_digits(args: argparse.Namespace, command: str) -> int:
    from scoreaction.experiments import digits_bench as bd

    if args.only:
        raise ValueError("--only applies to the gaussian and mixture benchmark, not to --task digits")
    if args.quick:
        config = bd.DigitsBenchConfig.quick_config(args.out or tempfile.mkdtemp(prefix="scoreaction-bench-"),
                                                   seed=args.seed, command=command)
    else:
        config = bd.DigitsBenchConfig(out=args.out or "docs/benchmarks", command=command, workers=args.workers,
                                      setup={"seed": args.seed})
    bd.run(config, log=(lambda message: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(Path(config.out) / bd.REPORT)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark every algorithm: optimality, solver robustness, cost")
    p.add_argument("--out", help="output folder (default docs/benchmarks; with --quick a fresh temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, under a minute: a smoke test")
    p.add_argument("--task", help="digits: ctrl against ddpo, dpok and grpo on a learned image reward "
                                  "(default: the gaussian and mixture benchmark)")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for the training runs (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=cmd_bench)
