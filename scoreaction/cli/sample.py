"""`scoreaction tasks`, `scoreaction sample`, `scoreaction reference`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scoreaction.cli.common import add_run_switches, check_sizes, fmt_vec, save_npz, set_threads
from scoreaction.cli.options import add_config_args, add_options, assemble, checkpoint_overrides, section
from scoreaction.config import (
    Options,
    check_choice,
    check_flag,
    check_nonnegative,
    check_samples,
    check_seed,
    option,
)
from scoreaction.errors import ScoreactionError
from scoreaction.io import image_grid, save_png
from scoreaction.metrics import fit_gaussian, gaussian_kl, mean_and_se
from scoreaction.outputs import SAMPLES, check_output
from scoreaction.samplers import GRIDS, SOLVERS, get_solver
from scoreaction.tasks import TASKS, make_task, task_config
from scoreaction.train.config import check_device, resolve_device
from scoreaction.train.loop import cast_floating

POLICIES = ("pretrained", "optimal", "finetuned")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SampleConfig(Options):
    checkpoint: str | None = option(None, help="a fine-tuned run (or checkpoint folder) to sample; its task is used")
    policy: str | None = option(None, help="pretrained, optimal (the exact optimum of Eq. E8) or finetuned "
                                           "(default: finetuned with --checkpoint, else pretrained)")
    solver: str = option("em", help="solver: " + ", ".join(SOLVERS))
    steps: int | None = option(None, help="solver steps (default: the task's, Task.sample_steps: 100; digits 50, "
                                          "diffusers 20)")
    grid: str = option("uniform", help="time grid: " + ", ".join(GRIDS) + ", or scheduler (a diffusers pipeline's "
                                       "own timesteps)")
    prompt: str | None = option(None, help="text-to-image tasks: sample this prompt (default: the task's prompts)")
    eta: float | None = option(None, help="stochasticity of Eq. E3 (default: the solver's own; em 1, others 0)")
    n: int | None = option(None, help="number of samples (default: the task's, Task.sample_n: 10000 for gaussian "
                                      "and mixture, 1000 for digits, 8 images for diffusers)")
    seed: int = option(0, help="random seed")
    dtype: str | None = option(None, help="float32 or float64 (default: the run's; without a checkpoint float64 "
                                          "for exact tasks, else float32)")
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps")
    out: str = option("samples.npz", help="output .npz (image tasks also write a PNG grid beside it), or .png "
                                         "(image tasks: the grid only)")
    overwrite: bool = option(False, help="replace existing samples files (an .npz of sample, or a PNG) of that name")

    def __post_init__(self):
        get_solver(self.solver)
        check_seed("seed", self.seed)
        check_choice("grid", self.grid, (*GRIDS, "scheduler"))
        check_device(self.device)
        check_sizes(self.n, self.steps)
        if self.eta is not None:
            check_nonnegative("eta", self.eta)
        if self.policy is None:
            self.policy = "finetuned" if self.checkpoint else "pretrained"
        check_choice("policy", self.policy, POLICIES)
        if self.policy == "finetuned" and not self.checkpoint:
            raise ValueError("policy 'finetuned' needs --checkpoint RUN")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, DTYPES)
        if not str(self.out).endswith((".npz", ".png")):
            raise ValueError(f"out must be a .npz or .png file name, found {self.out!r}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must be a non-empty text")
        check_flag("overwrite", self.overwrite)


def cmd_tasks(args: argparse.Namespace) -> int:
    for name, entry in TASKS.items():
        print(f"{name:10s} {entry.description}")
        if args.verbose:
            print(f"{'':10s} defaults: {json.dumps(entry.config().to_dict())}")
    return 0


def load_sampler(cfg: SampleConfig, task_options: dict):
    """(task, score function, dtype, what it is) for the config: a checkpoint's fine-tuned policy, the pretrained
    model, or the exact optimum."""
    if cfg.checkpoint:
        from scoreaction.train import Trainer

        overrides = checkpoint_overrides(task_options, "sample --checkpoint")
        trainer = Trainer.from_checkpoint(cfg.checkpoint, {"device": cfg.device, **overrides}, progress=False)
        task, dtype = trainer.task, DTYPES[cfg.dtype] if cfg.dtype else trainer.dtype
        cast_floating(trainer.policy, dtype)
        what = f"{cfg.checkpoint} (step {trainer.step})"
        score = trainer.policy.score if cfg.policy == "finetuned" else task.pretrained
    else:
        task, what = make_task(task_config(task_options)).to(resolve_device(cfg.device)), cfg.policy
        dtype = DTYPES[cfg.dtype or ("float64" if task.exact else "float32")]
        score = task.pretrained
    if cfg.policy == "optimal":
        if not task.exact:
            raise ValueError(f"policy 'optimal' needs a task with an exact optimum (gaussian, mixture), found {task.name!r}")
        task.require_tilt()
        score = task.optimal_score
    return task, score, dtype, what


def cmd_sample(args: argparse.Namespace) -> int:
    set_threads(args)
    config = assemble(args)
    task_options = section(config, "task")
    if args.task is not None:
        task_options["name"] = args.task
    cfg = SampleConfig.from_dict({k: v for k, v in config.items() if k != "task"}, "for sample")
    check_output(cfg.out, SAMPLES, overwrite=cfg.overwrite, inputs=(cfg.checkpoint,))
    task, score, dtype, what = load_sampler(cfg, task_options)
    if cfg.out.endswith(".npz") and len(task.shape) == 3:  # image tasks also write the PNG grid beside it
        check_output(Path(cfg.out).with_suffix(".png"), SAMPLES, overwrite=cfg.overwrite, what="the PNG beside --out")
    cfg.n, cfg.steps = cfg.n or task.sample_n, cfg.steps or task.sample_steps  # the task's defaults
    check_samples("n", cfg.n, task.shape, torch.finfo(dtype).bits // 8)
    solver = get_solver(cfg.solver)
    eta = solver.default_eta if cfg.eta is None else float(cfg.eta)
    if cfg.out.endswith(".png") and len(task.shape) != 3:
        raise ValueError(f"out {cfg.out!r}: a PNG needs an image task, found {task.name!r} with samples of shape {task.shape}")

    gen = torch.Generator().manual_seed(cfg.seed)
    x, cond = task.start(cfg.n, generator=gen, dtype=dtype)
    if cfg.prompt is not None:
        if not hasattr(task, "add_prompts"):
            raise ValueError(f"--prompt needs a text-to-image task (diffusers), found {task.name!r}")
        cond = task.add_prompts([cfg.prompt]).repeat(cfg.n)
    device = getattr(task, "device", torch.device("cpu"))
    x, cond = x.to(device), None if cond is None else cond.to(device)
    ts = task.grid(cfg.grid, cfg.steps, generator=gen)
    with tqdm(total=cfg.steps, desc=f"{cfg.n} samples, {cfg.solver} x {cfg.steps} steps", unit="step",
              disable=args.quiet, leave=False) as bar:
        with torch.no_grad():
            x_T = solver.sample(task.path, score, x, ts, cond=cond, eta=eta, generator=gen,
                                callback=lambda _: bar.update())
        rewards = task.reward(x_T, cond)
    x_T, rewards, cond = x_T.cpu(), rewards.cpu(), None if cond is None else cond.cpu()
    bad = int((~torch.isfinite(x_T)).sum())
    if bad:
        raise ScoreactionError(f"the samples of {what} hold {bad} NaN or infinite values of {x_T.numel()} (its "
                               f"scores overflow); nothing written to {cfg.out!r}")
    written = []
    if cfg.out.endswith(".npz"):
        extra = {} if cond is None else {"conditions": cond.numpy()}
        record = {"task": task.config.to_dict(), "sample": {**dataclasses.asdict(cfg), "eta": eta}}
        save_npz(cfg.out, samples=x_T.float().numpy(), rewards=rewards.float().numpy(), times=ts.numpy(), **extra,
                 config=record)
        written.append(cfg.out)
    if len(task.shape) == 3:  # images: a PNG grid, one row per class for class-conditional tasks
        order = torch.argsort(cond, stable=True) if cond is not None else torch.arange(len(x_T))
        with torch.no_grad():
            images = task.images(x_T[order][:100].to(device))
        png = str(Path(cfg.out).with_suffix(".png"))
        save_png(png, image_grid(images.float().cpu().numpy(), per_row=10, value_range=(0.0, 1.0)),
                 scale=4 if images.shape[-1] < 64 else 1)
        written.append(png)

    r_mean, r_se = mean_and_se(rewards)
    print(f"task {task.name} {task.shape}  policy {what}  solver {cfg.solver} (order {solver.order})  "
          f"steps {cfg.steps}  grid {cfg.grid}  eta {eta:g}  n {cfg.n}")
    print(f"mean reward     {r_mean:.4f} +- {r_se:.4f}")
    ref = task.reference() if task.exact and cfg.policy != "finetuned" else None
    if ref is not None:
        which = "star" if cfg.policy == "optimal" else "pre"
        print(f"exact E[r]      {ref['E_star_r' if which == 'star' else 'E_pre_r']:.4f}   "
              f"(p_{which}; J* = {ref['J_star']:.4f}, E_pre[r] = {ref['E_pre_r']:.4f})")
        mean, cov = fit_gaussian(x_T)
        print(f"sample mean     {fmt_vec(mean)}")
        print(f"exact mean      {fmt_vec(ref[f'p_{which}_mean'])}")
        print(f"Gaussian-fit KL to p_{which}: {gaussian_kl(mean, cov, ref[f'p_{which}_mean'], ref[f'p_{which}_cov']):.5f}")
    print(f"wrote {' and '.join(written)}")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    task_options = section(assemble(args), "task")
    if args.task is not None:
        task_options["name"] = args.task
    task = make_task(task_config(task_options))
    if not task.exact:
        raise ValueError(f"task {task.name!r} has no exact reference (tasks with one: gaussian, mixture)")
    task.require_tilt()
    ref = task.reference()
    if args.json:
        print(json.dumps(ref, indent=2))
        return 0
    for key, value in ref.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            print(f"{key:12s} " + ("\n" + " " * 13).join(fmt_vec(row) for row in value))
        elif isinstance(value, list):
            print(f"{key:12s} {fmt_vec(value)}")
        elif isinstance(value, float):
            print(f"{key:12s} {value:.6f}")
        else:
            print(f"{key:12s} {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tasks", help="list the built-in tasks")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each task's default options")
    add_config_args(p)
    p.set_defaults(run=cmd_tasks)

    p = sub.add_parser("sample", help="sample a fine-tuned run, a task's pretrained model or its exact optimum "
                                      "with any solver", description="Task options go through --set task.KEY=VALUE.")
    p.add_argument("--task", help=f"one of {sorted(TASKS)} (default gaussian; not with --checkpoint)")
    add_options(p, SampleConfig)
    add_config_args(p)
    add_run_switches(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("reference", help="print a task's exact references: J*, E_pre[r], moments of p_pre and p*")
    p.add_argument("--task", help=f"one of {sorted(TASKS)} (default gaussian)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p)
    p.set_defaults(run=cmd_reference)
