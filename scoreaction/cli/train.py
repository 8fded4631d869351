"""`scoreaction train` and `scoreaction evaluate`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from scoreaction import distributed
from scoreaction.cli.common import add_run_switches, check_folder_path, print_table, set_threads
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import Options, check_positive_int, option
from scoreaction.evaluation import objective, solver_gain
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
    if "out" in values:
        check_folder_path(str(values["out"]))
    try:
        if args.resume:
            trainer = Trainer.from_checkpoint(args.resume, values, progress=not args.quiet)
        else:
            trainer = Trainer(TrainConfig.from_dict(values, "for training"), progress=not args.quiet)
        last = trainer.run()
    finally:
        distributed.shutdown()
    if trainer.world.main:
        print(f"run folder {trainer.run_dir} (checkpoints/, metrics.jsonl, config.json)")
        print_table(last, SUMMARY_KEYS)
    return 0


@dataclass
class EvaluateConfig(Options):
    checkpoint: str | None = option(None, help="a checkpoint folder or a run folder (required)")
    solver: str = option("em", help="solver: " + ", ".join(SOLVERS))
    steps: int = option(200, help="solver steps")
    grid: str = option("uniform", help="time grid: " + ", ".join(GRIDS))
    eta: float | None = option(None, help="stochasticity of Eq. E3 (default: the solver's own)")
    n: int = option(4096, help="number of samples")
    objective: bool = option(False, help="also J(theta) by 200-step Euler-Maruyama rollouts")

    def __post_init__(self):
        if self.checkpoint is None:
            raise ValueError("--checkpoint is required (a checkpoint folder or a run folder)")
        get_solver(self.solver)
        check_positive_int("steps", self.steps)
        check_positive_int("n", self.n)


def cmd_evaluate(args: argparse.Namespace) -> int:
    set_threads(args)
    cfg = EvaluateConfig.from_dict(assemble(args), "for evaluate")
    trainer = Trainer.from_checkpoint(cfg.checkpoint, progress=False)
    policy, task = trainer.policy, trainer.task
    seed = trainer.config.seed + EVAL_SEED_OFFSET
    result = {"checkpoint": cfg.checkpoint, "step": trainer.step,
              **solver_gain(policy, task, cfg.solver, cfg.steps, n=cfg.n, seed=seed, grid=cfg.grid, eta=cfg.eta,
                            dtype=trainer.dtype)}
    if cfg.objective:
        result.update({f"J_{k}": v for k, v in objective(policy, task, n=cfg.n, seed=seed, dtype=trainer.dtype).items()})
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
    p.add_argument("--resume", metavar="DIR", help="continue a run from its latest checkpoint (or a checkpoint folder)")
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
