"""`scoreaction bench`: optimality, solver robustness and cost of every algorithm on the exact tasks
(experiments/finetune_bench.py), or `--task digits` (experiments/digits_bench.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from scoreaction.cli.common import add_run_switches, check_folder_path
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import Options, check_nonnegative_int, check_positive_int, option

BENCH_TASKS = ("exact", "digits")


@dataclass
class BenchOptions(Options):
    task: str = option("exact", help="exact: the gaussian and mixture benchmark; digits: ctrl against ddpo, dpok and "
                                     "grpo on a learned image reward")
    only: str | None = option(None, help="with task exact: comma-separated subset of optimality,robustness,cost")
    quick: bool = option(False, help="tiny budgets, under a minute: a smoke test")
    seed: int = option(0, help="random seed")
    workers: int = option(2, help="processes for the training runs")
    out: str | None = option(None, help="output folder (default docs/benchmarks; with --quick a fresh temporary one)")

    def __post_init__(self):
        if self.task not in BENCH_TASKS:
            raise ValueError(f"--task must be one of {list(BENCH_TASKS)}, found {self.task!r}")
        check_nonnegative_int("seed", self.seed)
        check_positive_int("workers", self.workers)
        if self.only is not None and self.task != "exact":
            raise ValueError("--only applies to the gaussian and mixture benchmark, not to --task digits")

    def sections(self) -> tuple:
        from scoreaction.experiments.finetune_bench import SECTIONS

        if self.only is None:
            return SECTIONS
        sections = tuple(s.strip() for s in self.only.split(",") if s.strip())
        if not sections or any(s not in SECTIONS for s in sections):
            raise ValueError(f"--only takes a comma-separated subset of {','.join(SECTIONS)}, found {self.only!r}")
        return sections

    def command(self) -> str:
        """The command as typed, rebuilt from the options (for the report's header)."""
        words = ["scoreaction", "bench"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                words += [f"--{f.name}"] if value is True else [f"--{f.name}", str(value)]
        return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    opts = BenchOptions.from_dict(assemble(args), "for bench")
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    if opts.out:
        check_folder_path(opts.out)
    out = opts.out or (tempfile.mkdtemp(prefix="scoreaction-bench-") if opts.quick else "docs/benchmarks")
    if opts.task == "digits":
        from scoreaction.experiments import digits_bench as bench

        if opts.quick:
            config = bench.DigitsBenchConfig.quick_config(out, seed=opts.seed, command=opts.command())
        else:
            config = bench.DigitsBenchConfig(out=out, command=opts.command(), workers=opts.workers,
                                             setup={"seed": opts.seed})
    else:
        from scoreaction.experiments import finetune_bench as bench

        if opts.quick:
            config = bench.BenchConfig.quick_config(out, seed=opts.seed, sections=opts.sections(),
                                                    command=opts.command())
        else:
            config = bench.BenchConfig(out=out, sections=opts.sections(), seed=opts.seed, command=opts.command(),
                                       workers=opts.workers)
    bench.run(config, log=log)
    print(Path(config.out) / bench.REPORT)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the algorithms: optimality, solver robustness, cost")
    add_options(p, BenchOptions)
    add_config_args(p)
    add_run_switches(p, threads=False)
    p.set_defaults(run=cmd_bench)
