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
from scoreaction.config import Options, check_positive_int, check_samples, option
from scoreaction.errors import ScoreactionError
from scoreaction.evaluation import objective, prompt_gain, solver_gain
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
    checkpoint: str | None = option(None, help="a checkpoint folder or a run folder (or --pretrained)")
    pretrained: bool = option(False, help="evaluate the task's pretrained model (--task and task.* options, "
                                          "e.g. --task diffusers --set task.model=shapes) with --prompts")
    solver: str = option("em", help="solver: " + ", ".join(SOLVERS))
    steps: int | None = option(None, help="solver steps (default: the run's evaluation steps: eval_steps, else the "
                                          "task's, e.g. 200 for gaussian, 20 for diffusers)")
    grid: str = option("uniform", help="time grid: " + ", ".join(GRIDS))
    eta: float | None = option(None, help="stochasticity of Eq. E3 (default: the solver's own)")
    n: int | None = option(None, help="number of samples (default: the run's evaluation samples: eval_n, else the "
                                      "task's, e.g. 4096 for gaussian, 16 images for diffusers)")
    objective: bool = option(False, help="also J(theta) by Euler-Maruyama rollouts of as many steps")
    prompts: str | None = option(None, help="text-to-image: a prompt file (one per line) or built-in list "
                                            "(shapes-train, shapes-heldout, ...) to evaluate on, each prompt "
                                            "--per-prompt times, paired with the pretrained model; shapes "
                                            "captions also get GenEval's accuracy per category")
    per_prompt: int = option(4, help="images per prompt with --prompts")

    def __post_init__(self):
        if (self.checkpoint is None) == (not self.pretrained):
            raise ValueError("expected --checkpoint (a checkpoint folder or a run folder) or --pretrained (with "
                             "--prompts), found " + ("both" if self.pretrained else "neither"))
        if self.pretrained and (self.prompts is None or self.objective):
            raise ValueError("--pretrained evaluates a text-to-image task's pretrained model on --prompts: give "
                             "--prompts FILE" + (" and leave out --objective" if self.objective else ""))
        get_solver(self.solver)
        check_sizes(self.n, self.steps)
        check_positive_int("per_prompt", self.per_prompt)
        if self.prompts is not None and self.n is not None:
            raise ValueError("--n counts samples of the run's own prompts; with --prompts give --per-prompt")


def cmd_evaluate(args: argparse.Namespace) -> int:
    set_threads(args)
    values = assemble(args)
    if args.task is not None:
        values.setdefault("task", {})["name"] = args.task
    task_options = section(values, "task")
    cfg = EvaluateConfig.from_dict({k: v for k, v in values.items() if k != "task"}, "for evaluate")
    if cfg.pretrained:
        result = evaluate_pretrained(cfg, task_options)
    else:
        if args.task is not None:
            raise ValueError("evaluate --checkpoint uses the run's own task: leave out --task")
        result = evaluate_checkpoint(cfg, checkpoint_overrides(task_options, "evaluate"))
    bad = ", ".join(f"{k} {v}" for k, v in flat(result).items() if isinstance(v, float) and not math.isfinite(v)
                    and not k.endswith("se"))
    if bad:
        raise ScoreactionError(f"evaluating {cfg.checkpoint or 'the pretrained model'!r} gave non-finite values "
                               f"({bad}): its samples or rewards overflow")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(flat(result))
    return 0


def evaluate_checkpoint(cfg: EvaluateConfig, overrides: dict) -> dict:
    trainer = Trainer.from_checkpoint(cfg.checkpoint, overrides, progress=False)
    policy, task = trainer.policy, trainer.task
    cfg.n, cfg.steps = cfg.n or trainer.eval_n, cfg.steps or trainer.eval_steps  # the run's evaluation defaults
    check_samples("n", cfg.n, task.shape, torch.finfo(trainer.dtype).bits // 8, copies=4)
    seed = trainer.config.seed + EVAL_SEED_OFFSET
    result = {"checkpoint": cfg.checkpoint, "step": trainer.step}
    if cfg.prompts is not None:
        return {**result, **on_prompts(policy, task, cfg, seed, trainer.dtype)}
    result.update({"n": cfg.n, **solver_gain(policy, task, cfg.solver, cfg.steps, n=cfg.n, seed=seed, grid=cfg.grid,
                                            eta=cfg.eta, dtype=trainer.dtype)})
    if cfg.objective:
        result.update({f"J_{k}": v for k, v in objective(policy, task, cfg.steps, n=cfg.n, seed=seed,
                                                          dtype=trainer.dtype).items()})
    return result


def evaluate_pretrained(cfg: EvaluateConfig, task_options: dict) -> dict:
    from scoreaction.tasks import make_task

    task = make_task(task_options.get("name", "gaussian"), {k: v for k, v in task_options.items() if k != "name"})
    cfg.steps = cfg.steps or task.eval_steps
    return {"model": getattr(task.config, "model", task.name), **on_prompts(None, task, cfg, EVAL_SEED_OFFSET)}


def on_prompts(policy, task, cfg: EvaluateConfig, seed: int, dtype=torch.float32) -> dict:
    """`evaluation.prompt_gain` on the prompts of --prompts (a text-to-image task only)."""
    from scoreaction.tasks.diffusers import read_prompts

    if not hasattr(task, "add_prompts"):
        raise ValueError(f"--prompts evaluates a text-to-image task; task {task.name!r} has no prompts")
    texts = list(dict.fromkeys(read_prompts(cfg.prompts)))
    check_samples("per_prompt", len(texts) * cfg.per_prompt, task.shape, 4, copies=4)
    return {"prompt_file": cfg.prompts, **prompt_gain(policy, task, texts, cfg.per_prompt, cfg.solver, cfg.steps,
                                                      seed, grid=cfg.grid, eta=cfg.eta, dtype=dtype)}


def flat(result: dict, prefix: str = "") -> dict:
    """Nested results as one level of 'a.b' keys (the table's rows)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    p.add_argument("--task", help="with --pretrained: the task whose pretrained model is evaluated")
    add_options(p, EvaluateConfig)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p)
    add_run_switches(p, quiet=False)
    p.set_defaults(run=cmd_evaluate)
