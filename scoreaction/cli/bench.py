"""`scoreaction bench`: optimality, solver robustness and cost of every algorithm on the exact tasks
(experiments/finetune_bench.py), `--task digits` (experiments/digits_bench.py), or `--task diffusers`: the cost of
an update on a diffusers pipeline beside TRL's DDPOTrainer (experiments/diffusers_bench.py), or `--task t2i`: GenEval
accuracy of the shipped shapes model fine-tuned by ctrl, ddpo, grpo and TRL's DDPOTrainer (experiments/t2i.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from scoreaction.cli.common import add_run_switches
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import Options, check_positive_int, check_seed, option
from scoreaction.outputs import check_output_folder

BENCH_TASKS = ("exact", "efficiency", "digits", "diffusers", "t2i")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class BenchOptions(Options):
    task: str = option("exact", help="exact: the gaussian and mixture benchmark; efficiency: its multi-seed sample "
                                     "efficiency (trajectories to 80/90/95 % closed, 95 % intervals); digits: ctrl "
                                     "against ddpo, dpok and grpo on a learned image reward; diffusers: seconds and "
                                     "memory per update on a diffusers pipeline, beside TRL's DDPOTrainer; t2i: "
                                     "GenEval accuracy of the shapes model fine-tuned by ctrl, ddpo, grpo and TRL")
    only: str | None = option(None, help="with task exact: comma-separated subset of optimality,robustness,cost; "
                                         "with task efficiency: of methods,settings")
    seeds: int = option(5, help="with task efficiency and t2i: seeds per cell (seed+1 ... seed+N; t2i --quick: 2 "
                                "unless given)")
    methods: str | None = option(None, help="with task efficiency: comma-separated methods of its methods section "
                                            "(default all), their runs replacing those in efficiency.json; with task "
                                            "t2i: of ctrl,ddpo,grpo,trl")
    quick: bool = option(False, help="tiny budgets, under a minute: a smoke test")
    seed: int = option(0, help="random seed")
    workers: int = option(2, help="processes for the training runs (diffusers measures one configuration at a time)")
    device: str = option("auto", help="with task diffusers: auto (cuda if there is one), cpu or cuda")
    preset: str = option("tiny", help="with task diffusers: tiny (tiny-sd, CPU-sized) or sd15 (the SD-1.5 "
                                      "architecture with random weights, 512 px, 50 steps, bf16: a GPU)")
    out: str | None = option(None, help="output folder (default docs/benchmarks; with --quick a fresh temporary one)")

    def __post_init__(self):
        if self.task not in BENCH_TASKS:
            raise ValueError(f"--task must be one of {list(BENCH_TASKS)}, found {self.task!r}")
        check_seed("seed", self.seed)
        check_positive_int("workers", self.workers)
        if self.only is not None and self.task not in ("exact", "efficiency"):
            raise ValueError(f"--only applies to --task exact and efficiency, not to --task {self.task}")
        check_positive_int("seeds", self.seeds)
        if self.task not in ("efficiency", "t2i") and self.seeds != 5:
            raise ValueError(f"--seeds applies to --task efficiency and t2i, not to --task {self.task}")
        if self.methods is not None and self.task not in ("efficiency", "t2i"):
            raise ValueError(f"--methods applies to --task efficiency and t2i, not to --task {self.task}")
        if self.task in ("efficiency", "t2i") and self.seeds < 2:
            raise ValueError(f"--seeds must be at least 2 for an interval over seeds, found {self.seeds}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {list(DEVICES)}, found {self.device!r}")
        if self.preset not in ("tiny", "sd15"):
            raise ValueError(f"--preset must be one of ['tiny', 'sd15'], found {self.preset!r}")
        if self.task != "diffusers" and (self.device != "auto" or self.preset != "tiny"):
            raise ValueError(f"--device and --preset apply to --task diffusers, not to --task {self.task}")
        if self.quick and self.preset != "tiny":
            raise ValueError("--quick runs the tiny pipeline: leave out --preset sd15")

    def resolved_device(self) -> str:
        """cpu or cuda; cuda without a GPU, or the 512-px preset without one, is an error."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device cuda was asked for, but torch {torch.__version__} finds no CUDA GPU here")
        device = "cuda" if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()) else "cpu"
        if self.preset == "sd15" and device != "cuda":
            raise ValueError("--preset sd15 (512 px, 50 steps, bf16) needs a GPU: run it with --device cuda on one")
        return device

    def sections(self) -> tuple:
        if self.task == "efficiency":
            from scoreaction.experiments.efficiency import SECTIONS
        else:
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
        check_output_folder(opts.out, "--out")
    out = opts.out or (tempfile.mkdtemp(prefix="scoreaction-bench-") if opts.quick else "docs/benchmarks")
    if opts.task == "diffusers":
        from scoreaction.experiments import diffusers_bench as bench

        device = opts.resolved_device()
        if not bench.trl_installed():
            print(f"scoreaction: {bench.TRL_MISSING}", file=sys.stderr)
        if opts.quick:
            config = bench.DiffusersBenchConfig.quick_config(out, seed=opts.seed, device=device, command=opts.command())
        else:
            config = bench.DiffusersBenchConfig(out=out, command=opts.command(), preset=opts.preset, device=device,
                                                seed=opts.seed)
    elif opts.task == "efficiency":
        from scoreaction.experiments import efficiency as bench

        if opts.quick:
            config = bench.EfficiencyConfig.quick_config(out, command=opts.command())
        else:
            config = bench.EfficiencyConfig(out=out, sections=opts.sections(), command=opts.command(),
                                            seeds=tuple(range(opts.seed + 1, opts.seed + 1 + opts.seeds)),
                                            workers=opts.workers,
                                            **({} if opts.methods is None else
                                               {"methods": tuple(m.strip() for m in opts.methods.split(","))}))
    elif opts.task == "t2i":
        from scoreaction.experiments import t2i as bench

        seeds = list(range(opts.seed + 1, opts.seed + 1 + opts.seeds))
        methods = None if opts.methods is None else [m.strip() for m in opts.methods.split(",") if m.strip()]
        if "trl" in (methods or bench.METHODS) and not bench.trl_installed():
            print(f"scoreaction: {bench.TRL_MISSING}", file=sys.stderr)
        if opts.quick:
            config = bench.T2IConfig.quick_config(out, seeds=seeds[:2] if opts.seeds == 5 else seeds, methods=methods,
                                                  command=opts.command())
        else:
            config = bench.T2IConfig(out=out, command=opts.command(), seeds=seeds, workers=opts.workers,
                                     **({} if methods is None else {"methods": methods}))
    elif opts.task == "digits":
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
