"""`scoreaction train` and `scoreaction evaluate`."""

from __future__ import annotations

import argparse
import json

from scoreaction.algorithms import ALGORITHMS
from scoreaction.cli.common import add_config_args, add_threads_arg, build_config, set_threads
from scoreaction.config import apply_overrides
from scoreaction.evaluation import objective, solver_gain
from scoreaction.samplers import SOLVERS
from scoreaction.train import TrainConfig, Trainer
from scoreaction.train.loop import EVAL_SEED_OFFSET

SUMMARY_KEYS = ("step", "trajectories", "reward_mean", "path_kl", "J", "eval_reward", "eval_path_kl", "eval_J",
                "eval_J_se", "eval_fraction", "eval_gaussian_kl", "eval_sliced_w2", "eval_sliced_w2_floor", "peak_rss_mb")


def cmd_train(args: argparse.Namespace) -> int:
    set_threads(args)
    flat = {"algorithm": args.algorithm, "updates": args.updates, "out": args.out, "seed": args.seed}
    if args.resume:
        overrides = apply_overrides({k: v for k, v in flat.items() if v is not None}, args.overrides)
        trainer = Trainer.from_checkpoint(args.resume, overrides, progress=not args.quiet)
    else:
        config = build_config(args, {"task.name": args.task})
        config.update({k: v for k, v in flat.items() if v is not None})
        config = apply_overrides(config, args.overrides)
        trainer = Trainer(TrainConfig.from_dict(config, "for training"), progress=not args.quiet)
    last = trainer.run()
    print(f"run folder {trainer.run_dir} (checkpoints/, metrics.jsonl, config.json)")
    for key in SUMMARY_KEYS:
        if key in last:
            value = last[key]
            print(f"{key:22s} {value:.5g}" if isinstance(value, float) else f"{key:22s} {value}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    set_threads(args)
    trainer = Trainer.from_checkpoint(args.checkpoint, progress=False)
    policy, task = trainer.policy, trainer.task
    seed = trainer.config.seed + EVAL_SEED_OFFSET
    result = {"checkpoint": args.checkpoint, "step": trainer.step,
              **solver_gain(policy, task, args.solver, args.steps, n=args.n, seed=seed, grid=args.grid, eta=args.eta,
                            dtype=trainer.dtype)}
    if args.objective:
        result.update({f"J_{k}": v for k, v in objective(policy, task, n=args.n, seed=seed, dtype=trainer.dtype).items()})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:22s} {value:.5g}" if isinstance(value, float) else f"{key:22s} {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a task's pretrained model with an RL algorithm")
    p.add_argument("--task", help="task name (default gaussian); options via --set task.KEY=VALUE")
    p.add_argument("--algorithm", help=f"one of {sorted(ALGORITHMS)} (default ctrl); options via --set algo.KEY=VALUE")
    p.add_argument("--updates", type=int, help="number of policy updates")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--out", help="run folder (default runs/train)")
    p.add_argument("--resume", metavar="DIR", help="continue a run from its latest checkpoint (or a checkpoint folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_threads_arg(p)
    add_config_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="reward gain of a checkpoint over the pretrained model under any solver")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder or a run folder")
    p.add_argument("--solver", default="em", help=f"one of {sorted(SOLVERS)} (default em)")
    p.add_argument("--steps", type=int, default=200, help="solver steps (default 200)")
    p.add_argument("--grid", default="uniform", help="time grid (default uniform)")
    p.add_argument("--eta", type=float, help="stochasticity (default: the solver's own)")
    p.add_argument("--n", type=int, default=4096, help="number of samples (default 4096)")
    p.add_argument("--objective", action="store_true", help="also J(theta) by 200-step Euler-Maruyama rollouts")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_threads_arg(p)
    p.set_defaults(run=cmd_evaluate)
