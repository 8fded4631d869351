"""`scoreaction tasks`, `scoreaction sample`, `scoreaction reference`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from scoreaction.cli.common import add_config_args, build_config, fmt_vec, save_npz
from scoreaction.config import Options, check_choice, check_nonnegative, check_positive_int, section
from scoreaction.evaluation import reference_of
from scoreaction.metrics import fit_gaussian, gaussian_kl, mean_and_se
from scoreaction.samplers import GRIDS, SOLVERS, get_solver, make_grid
from scoreaction.tasks import TASKS, make_task

POLICIES = ("pretrained", "optimal")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SampleConfig(Options):
    solver: str = "em"
    steps: int = 100
    grid: str = "uniform"
    eta: float | None = None  # None: the solver's default (em: 1, ddim/heun/dpm2: 0)
    n: int = 10_000
    seed: int = 0
    policy: str = "pretrained"
    dtype: str = "float64"
    out: str = "samples.npz"

    def __post_init__(self):
        get_solver(self.solver)
        check_choice("grid", self.grid, GRIDS)
        check_positive_int("steps", self.steps)
        check_positive_int("n", self.n)
        if self.eta is not None:
            check_nonnegative("eta", self.eta)
        check_choice("policy", self.policy, POLICIES)
        check_choice("dtype", self.dtype, DTYPES)


def task_from_config(config: dict):
    options = section(config, "task")
    name = options.pop("name", "gaussian")
    return make_task(name, options)


def cmd_tasks(args: argparse.Namespace) -> int:
    for name, (_, config_cls, description) in TASKS.items():
        print(f"{name:10s} {description}")
        if args.verbose:
            defaults = {f.name: getattr(config_cls(), f.name) for f in fields(config_cls)}
            print(f"{'':10s} defaults: {json.dumps(defaults)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    config = build_config(args, {"task.name": args.task, "sample.solver": args.solver, "sample.steps": args.steps,
                                 "sample.grid": args.grid, "sample.eta": args.eta, "sample.n": args.n,
                                 "sample.seed": args.seed, "sample.policy": args.policy, "sample.out": args.out})
    task = task_from_config(config)
    cfg = SampleConfig.from_dict(section(config, "sample"), "in section 'sample'")
    solver = get_solver(cfg.solver)
    eta = solver.default_eta if cfg.eta is None else float(cfg.eta)
    if cfg.policy == "optimal":
        if not hasattr(task, "optimal_score"):
            raise ValueError(f"policy 'optimal' needs a task with an exact optimum, found {task.name!r}")
        task.require_tilt()
    score = task.optimal_score if cfg.policy == "optimal" else task.pretrained

    gen = torch.Generator().manual_seed(cfg.seed)
    cond = task.sample_conditions(cfg.n, generator=gen) if hasattr(task, "sample_conditions") else None
    x = task.prior_sample(cfg.n, generator=gen, dtype=DTYPES[cfg.dtype])
    ts = make_grid(cfg.grid, task.path, cfg.steps, generator=gen)
    with tqdm(total=cfg.steps, desc=f"{cfg.solver} x {cfg.steps}", disable=args.quiet, leave=False) as bar:
        with torch.no_grad():
            x_T = solver.sample(task.path, score, x, ts, cond=cond, eta=eta, generator=gen,
                                callback=lambda _: bar.update())
    rewards = task.reward(x_T, cond)
    extra = {} if cond is None else {"conditions": cond.numpy()}
    save_npz(cfg.out, samples=x_T.numpy(), rewards=rewards.numpy(), times=ts.numpy(), **extra,
             config={**config, "sample": {**vars(cfg), "eta": eta}})

    r_mean, r_se = mean_and_se(rewards)
    print(f"task {task.name} {task.shape}  policy {cfg.policy}  solver {cfg.solver} (order {solver.order})  "
          f"steps {cfg.steps}  grid {cfg.grid}  eta {eta:g}  n {cfg.n}")
    print(f"mean reward     {r_mean:.4f} +- {r_se:.4f}")
    ref = reference_of(task)
    if ref is not None:
        which = "star" if cfg.policy == "optimal" else "pre"
        print(f"exact E[r]      {ref['E_star_r' if which == 'star' else 'E_pre_r']:.4f}   "
              f"(p_{which}; J* = {ref['J_star']:.4f}, E_pre[r] = {ref['E_pre_r']:.4f})")
        mean, cov = fit_gaussian(x_T)
        print(f"sample mean     {fmt_vec(mean)}")
        print(f"exact mean      {fmt_vec(ref[f'p_{which}_mean'])}")
        print(f"Gaussian-fit KL to p_{which}: {gaussian_kl(mean, cov, ref[f'p_{which}_mean'], ref[f'p_{which}_cov']):.5f}")
    print(f"wrote {cfg.out}")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    config = build_config(args, {"task.name": args.task})
    ref = task_from_config(config).reference()
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
    p.set_defaults(run=cmd_tasks)

    p = sub.add_parser("sample", help="sample a task's pretrained (or exact optimal) policy with any solver")
    p.add_argument("--task", help=f"one of {sorted(TASKS)} (default gaussian)")
    p.add_argument("--solver", help=f"one of {sorted(SOLVERS)} (default em)")
    p.add_argument("--steps", type=int, help="number of solver steps (default 100)")
    p.add_argument("--grid", help=f"time grid, one of {sorted(GRIDS)} (default uniform)")
    p.add_argument("--eta", type=float, help="stochasticity of Eq. E3 (default: the solver's own)")
    p.add_argument("--n", type=int, help="number of samples (default 10000)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--policy", help="pretrained (default) or optimal (the exact optimum of Eq. E8)")
    p.add_argument("--out", help="output .npz (default samples.npz)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("reference", help="print a task's exact references: J*, E_pre[r], moments of p_pre and p*")
    p.add_argument("--task", help=f"one of {sorted(TASKS)} (default gaussian)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p)
    p.set_defaults(run=cmd_reference)
