"""`scoreaction train` and `scoreaction evaluate`."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch

from scoreaction import distributed
from scoreaction.cli.common import add_run_switches, check_sizes, print_table, set_threads
from scoreaction.cli.options import add_config_args, add_options, assemble, checkpoint_overrides, section
from scoreaction.config import Options, check_samples, option
from scoreaction.errors import ScoreactionError
from scoreaction.evaluation import objective, solver_gain
from scoreaction.outputs import RUN, FolderLock, check_output, same_path
from scoreaction.samplers import GRIDS, SOLVERS, get_solver
from scoreaction.tasks import TASKS
from scoreaction.train import TrainConfig, Trainer
from scoreaction.train.loop import EVAL_SEED_OFFSET

SUMMARY_KEYS = ("step", "trajectories", "reward_mean", "path_kl", "J", "eval_reward", "eval_path_kl", "eval_J",
                "eval_J_se", "eval_fraction", "eval_gaussian_kl", "eval_sliced_w2", "eval_sliced_w2_floor", "peak_rss_mb")


def cmd_train(args: argparse.Namespace) -> int:
    set_threads(args)
    values = assemble(args)
    if args.task is not None:
        values.setdefault("task", {})["name"] = args.task
    try:
        if args.resume:
            check_resume_out(args.resume, values.get("out"), args.overwrite)
            trainer = Trainer.from_checkpoint(args.resume, values, progress=not args.quiet, overwrite=args.overwrite)
        else:
            config = TrainConfig.from_dict(values, "for training")
            check_output(config.out, RUN, overwrite=args.overwrite, hint=f" (or --resume {config.out} to continue it)")
            FolderLock.check(config.out, "run folder")
            trainer = Trainer(config, progress=not args.quiet, overwrite=args.overwrite)
        last = trainer.run()
    finally:
        distributed.shutdown()
    if trainer.world.main:
        print(f"run folder {trainer.run_dir} (checkpoints/, metrics.jsonl, config.json)")
        print_table(last, SUMMARY_KEYS)
    return 0


def check_resume_out(resume: str, out: str | None, overwrite: bool) -> None:
    """Before anything loads: a resume writes into the run folder it is pointed at (RUN for RUN/checkpoints/NAME),
    or into `out` if given, which is then that run folder or a new one; the folder must not be in use."""
    from scoreaction.train.checkpoint import resolve, run_folder

    run = run_folder(resume)
    if out is not None and (run is None or not same_path(out, run)):
        check_output(out, RUN, overwrite=overwrite)
    target = out if out is not None else run
    if target is not None:
        FolderLock.check(target, "run folder")
    if run is not None and (out is None or same_path(out, run)):
        resolve(resume, writing=True)  # damaged newer checkpoints of the run it writes into are kept aside


@dataclass
class EvaluateConfig(Options):
    checkpoint: str | None = option(None, help="a checkpoint folder or a run folder (required)")
    solver: str = option("em", help="solver: " + ", ".join(SOLVERS))
    steps: int | None = option(None, help="solver steps (default: the run's evaluation steps: eval_steps, else the "
                                          "task's, e.g. 200 for gaussian, 20 for diffusers)")
    grid: str = option("uniform", help="time grid: " + ", ".join(GRIDS))
    eta: float | None = option(None, help="stochasticity of Eq. E3 (default: the solver's own)")
    n: int | None = option(None, help="number of samples (default: the run's evaluation samples: eval_n, else the "
                                      "task's, e.g. 4096 for gaussian, 16 images for diffusers)")
    objective: bool = option(False, help="also J(theta) by Euler-Maruyama rollouts of as many steps")

    def __post_init__(self):
        if self.checkpoint is None:
            raise ValueError("--checkpoint is required (a checkpoint folder or a run folder)")
        get_solver(self.solver)
        check_sizes(self.n, self.steps)


def cmd_evaluate(args: argparse.Namespace) -> int:
    set_threads(args)
    values = assemble(args)
    overrides = checkpoint_overrides(section(values, "task"), "evaluate")
    cfg = EvaluateConfig.from_dict({k: v for k, v in values.items() if k != "task"}, "for evaluate")
    trainer = Trainer.from_checkpoint(cfg.checkpoint, overrides, progress=False)
    policy, task = trainer.policy, trainer.task
    cfg.n, cfg.steps = cfg.n or trainer.eval_n, cfg.steps or trainer.eval_steps  # the run's evaluation defaults
    check_samples("n", cfg.n, task.shape, torch.finfo(trainer.dtype).bits // 8, copies=4)
    seed = trainer.config.seed + EVAL_SEED_OFFSET
    result = {"checkpoint": cfg.checkpoint, "step": trainer.step, "n": cfg.n,
              **solver_gain(policy, task, cfg.solver, cfg.steps, n=cfg.n, seed=seed, grid=cfg.grid, eta=cfg.eta,
                            dtype=trainer.dtype)}
    if cfg.objective:
        result.update({f"J_{k}": v for k, v in objective(policy, task, cfg.steps, n=cfg.n, seed=seed,
                                                          dtype=trainer.dtype).items()})
    bad = ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise ScoreactionError(f"evaluating {cfg.checkpoint!r} gave non-finite values ({bad}): its policy's samples "
                               f"or rewards overflow")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a task's pretrained model with an RL algorithm",
                       description="Options of the run; the task's and the algorithm's own options go through "
                                   "--set task.KEY=VALUE and --set algo.KEY=VALUE (or a --config file).")
    p.add_argument("--task", help=f"task name, one of {sorted(TASKS)} (default gaussian): --set task.name=...")
    p.add_argument("--resume", metavar="DIR", help="continue a run from its latest checkpoint (or a checkpoint "
                                                   "folder); it writes into that run folder (RUN for "
                                                   "RUN/checkpoints/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out (only a run "
                                                           "folder: config.json and checkpoints/)")
    add_options(p, TrainConfig)
    add_config_args(p)
    add_run_switches(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="reward gain of a checkpoint over the pretrained model under any solver")
    add_options(p, EvaluateConfig)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p)
    add_run_switches(p, quiet=False)
    p.set_defaults(run=cmd_evaluate)
