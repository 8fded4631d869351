"""Multi-seed sample efficiency of the fine-tuning algorithms on the exact tasks (issue 11).

Clock: RL-time grids throughout, as in the trainer. Two sections, every cell run with several seeds:

    methods    every algorithm at its benchmarked setting (`METHODS`) on gaussian d=2, gaussian d=16 and mixture
               (beta_KL = 1): the paired fraction of the achievable improvement closed against sampled
               trajectories, and the trajectories needed to close 80, 90 and 95 % of it.
    solvers    the fraction of the reward gain under 20 EM steps that a policy trained there keeps under other
               solvers and step counts (finetune_bench's robustness section), over seeds, beside the exact optimal
               control's: ctrl with the plain and the x0-scaled residual (models/residual.py), and ddpo.
    settings   ctrl against the best reward-only baseline (ddpo) where the continuous-time view should matter:
               coarse training grids (K = 5, 10), random and EDM grids, higher dimension (d = 64, 256), small
               and large beta_KL. Every run trains on its own grid and is scored on a 200-step uniform grid,
               so every cell is also "trained at K, scored at K = 200".

The fraction closed of a policy is paired with the exact optimal control a* (Eq. E8): both roll out from the same
prior draws with the same Brownian increments on the 200-step evaluation grid, and
    fraction = 1 + mean(J_theta - J_a*) / (J* - E_pre[r]),
whose standard error is 10-50 times smaller than the plain Monte-Carlo one (finetune_bench's docstring).

Statistics: over seeds, the mean and a 95 % Student-t interval, mean ± t_{0.975, n-1} sd / sqrt(n). Trajectories
to a level are read off each seed's curve by linear interpolation at the first evaluation that reaches it; a seed
that never reaches it within the budget makes the cell "not reached". Two cells differ only where their
intervals do not overlap.

`run(config)` runs the sections and writes efficiency.json, efficiency.md and efficiency_*.png
(efficiency_report.py renders them from the JSON alone).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scoreaction.config import Options, check_positive_int, option
from scoreaction.experiments.common import executor, first_reach, interval, machine_info
from scoreaction.experiments.finetune_config import ROBUSTNESS_BASE, ROBUSTNESS_SOLVERS, Variant
from scoreaction.experiments.finetune_jobs import SCRATCH, EvalPlan, optimal_policy, robustness_gains
from scoreaction.io import atomic_write_bytes
from scoreaction.samplers import make_grid
from scoreaction.tasks import make_task
from scoreaction.train import TrainConfig, Trainer

REPORT, RESULTS, PREFIX = "efficiency.md", "efficiency.json", "efficiency_"
FORMAT = "scoreaction-efficiency-1"
SECTIONS = ("methods", "solvers", "settings")
LEVELS = (0.8, 0.9, 0.95)
EVAL_SEED, FINAL_SEED, ROBUST_SEED = 10_000, 20_000, 30_000  # evaluation draws: every run of a task (paired)

# Each algorithm at its benchmarked setting: the learning rates of docs/benchmarks/tuning-notes.md (a sweep on
# seed 0; the reported runs use other seeds), and for every one the linear decay to 0 over the run, which took
# both algorithms it was tried on (ctrl, ddpo) from about 0.97-0.98 to 0.99 closed on gaussian d=2.
METHODS = {v.name: v for v in (
    Variant("ctrl", "ctrl", "random", lr_decay=True),
    # ctrl with the residual read as an x0 correction (K_s times the net, K_s the posterior gain of
    # models/residual.py), which fades in the noise as the optimal correction does (E21): the shipped default.
    Variant("ctrl-x0", "ctrl", "random", lr_decay=True, task={"residual": "x0"}),
    Variant("ddpo", "ddpo", lr_decay=True),
    Variant("grpo", "grpo", algo={"lr": 3e-4}, lr_decay=True),
    Variant("dpok", "dpok", algo={"lr": 3e-3}, lr_decay=True),
    Variant("ctpg", "ctpg", algo={"lr": 1e-2}, lr_decay=True),
    Variant("draft", "draft", algo={"lr": 3e-3}, lr_decay=True),
    Variant("adjoint", "adjoint", lr_decay=True),  # its defaults: lr 3e-3 from the same sweep (algorithms/adjoint.py)
)}
SOLVER_METHODS = {name: METHODS[name] for name in ("ctrl", "ctrl-x0", "ddpo")}
SOLVER_TASK = "gaussian-d2"
REWARD_ONLY = ("ddpo", "grpo", "dpok", "ctpg")  # the black-box setting of human-preference rewards
REWARD_GRADIENT = ("draft", "adjoint")  # methods that differentiate the reward
TASKS = {
    "gaussian-d2": {"name": "gaussian", "dim": 2, "beta_kl": 1.0},
    "gaussian-d16": {"name": "gaussian", "dim": 16, "beta_kl": 1.0},
    "mixture": {"name": "mixture", "beta_kl": 1.0},
}


@dataclass(frozen=True)
class Setting:
    """A change to the base configuration (gaussian d=2, beta_KL = 1, K = 20, each method's own grid)."""

    name: str
    task: dict = field(default_factory=lambda: dict(TASKS["gaussian-d2"]))
    steps: int = 20
    grid: str | None = None  # None: each method's own grid


def _gaussian(dim: int = 2, beta_kl: float = 1.0) -> dict:
    return {"name": "gaussian", "dim": dim, "beta_kl": beta_kl}


SETTINGS = {s.name: s for s in (
    Setting("K=5", steps=5),
    Setting("K=10", steps=10),
    Setting("uniform grid", grid="uniform"),
    Setting("random grid", grid="random"),
    Setting("EDM grid", grid="edm"),
    Setting("d=64", task=_gaussian(dim=64)),
    Setting("d=256", task=_gaussian(dim=256)),
    Setting("beta_KL=0.1", task=_gaussian(beta_kl=0.1)),
    Setting("beta_KL=10", task=_gaussian(beta_kl=10.0)),
)}
SETTINGS_METHODS = ("ctrl", "ddpo")


@dataclass
class EfficiencyConfig(Options):
    """What `run` does. `EfficiencyConfig.quick_config(out)` is a smoke-test budget."""

    out: str = option("docs/benchmarks", help="output folder of efficiency.md, efficiency.json and the plots")
    sections: tuple = option(factory=lambda: SECTIONS, flag=False, help=f"a subset of {', '.join(SECTIONS)}")
    seeds: tuple = option(factory=lambda: (1, 2, 3, 4, 5), flag=False,
                          help="training seeds of every cell (the learning rates were swept on seed 0)")
    command: str = option("scoreaction bench --task efficiency", help="the command line, printed in the report")
    quick: bool = option(False, help="smoke-test budgets: the report says its numbers mean nothing")
    methods: tuple = option(factory=lambda: tuple(METHODS), flag=False, help="algorithms of the methods section")
    tasks: tuple = option(factory=lambda: tuple(TASKS), flag=False, help=f"tasks, among {', '.join(TASKS)}")
    settings: tuple = option(factory=lambda: tuple(SETTINGS), flag=False, help="settings of the settings section")
    batch_size: int = option(256, help="rollouts per update")
    updates: int = option(200, help="updates per run in the methods section")
    settings_updates: int = option(100, help="updates per run in the settings section")
    dense: int = option(20, help="a curve has a point after each of the first `dense` updates")
    eval_every: int = option(10, help="and every `eval_every` updates after them")
    eval_n: int = option(2048, help="samples per point of a curve")
    final_n: int = option(16384, help="samples of the final evaluation")
    settings_eval_n: int = option(1024, help="samples per point of a curve in the settings section (d = 256 is costly)")
    settings_final_n: int = option(8192, help="samples of the final evaluation in the settings section")
    robust_n: int = option(16384, help="samples per solver in the solvers section")
    eval_steps: int = option(200, help="Euler-Maruyama steps of every evaluation (a uniform grid)")
    reference_n: int | None = option(None, help="Monte-Carlo size of the mixture's reference (default: the task's)")
    workers: int = option(2, help="processes for the training runs")
    threads: int = option(1, help="torch threads per process")

    def __post_init__(self):
        for name, pool in (("sections", SECTIONS), ("methods", METHODS), ("tasks", TASKS), ("settings", SETTINGS)):
            setattr(self, name, tuple(getattr(self, name)))
            bad = sorted(set(getattr(self, name)) - set(pool))
            if bad or (name == "sections" and not self.sections):
                found = list(getattr(self, name))
                raise ValueError(f"{name} must be a non-empty subset of {list(pool)}, found {found}")
        self.seeds = tuple(self.seeds)
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds must be at least two distinct integers >= 0, found {list(self.seeds)}")
        for name in ("batch_size", "updates", "settings_updates", "dense", "eval_every", "eval_n", "final_n",
                     "settings_eval_n", "settings_final_n", "robust_n", "eval_steps", "workers", "threads"):
            check_positive_int(name, getattr(self, name))

    @classmethod
    def quick_config(cls, out: str, command: str = "scoreaction bench --task efficiency --quick") -> EfficiencyConfig:
        """Tiny budgets, every code path (the numbers mean nothing)."""
        return cls(out=out, command=command, quick=True, seeds=(1, 2), methods=("ctrl", "ddpo"),
                   tasks=("gaussian-d2",), settings=("K=5", "d=64"), batch_size=32, updates=3, settings_updates=2,
                   dense=2, eval_every=1, eval_n=128, final_n=256, settings_eval_n=64, settings_final_n=128,
                   robust_n=64, eval_steps=20, reference_n=4096, workers=1)


# --- jobs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceJob:
    key: str
    task: dict
    eval_n: int
    final_n: int
    eval_steps: int
    reference_n: int | None
    robust_n: int = 0  # > 0: also a*'s solver fractions (the solvers section)


@dataclass
class Reference:
    key: str
    reference: dict  # Task.compute_reference(): J_star, E_pre_r, ...
    j_opt_eval: torch.Tensor  # a*'s per-sample J on the curve draws
    j_opt_final: torch.Tensor  # ... and on the final draws
    solvers: dict[str, float] | None = None  # a*'s fraction of its EM-20 gain kept under each solver

    @property
    def improvement(self) -> float:
        return self.reference["J_star"] - self.reference["E_pre_r"]


@dataclass(frozen=True)
class RunJob:
    section: str
    cell: str  # the task (methods) or the setting (settings)
    method: str
    seed: int
    task: dict
    steps: int
    grid: str | None
    updates: int
    eval_n: int
    final_n: int

    @property
    def reference_key(self) -> str:
        """The reference it is paired with: its task and evaluation sizes."""
        return "-".join(f"{k}={v}" for k, v in sorted(self.task.items())) + f"-n={self.eval_n},{self.final_n}"


@dataclass
class Run:
    """One seed of one cell: the curve (trajectories, paired fraction) and the final paired fraction."""

    section: str
    cell: str
    method: str
    seed: int
    trajectories: list[int]
    fraction: list[float]
    final: float
    final_se: float
    path_kl: float
    train_cpu_seconds: float
    wall_seconds: float
    solvers: dict[str, float] | None = None  # the solvers section: the fraction of the EM-20 gain kept per solver


@torch.no_grad()
def per_sample_objective(policy, task, steps: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample J = r(X_T) - beta_KL * path KL and the path KL, (n,) float64 each, on a uniform grid, in chunks
    of about 2^18 numbers per state (a rollout keeps every state: 16384 samples of d = 256 would hold 3 GB).
    Chunk i draws its starts and noise from seed + i, so two policies evaluated with one seed are paired."""
    chunk = max(256, 2**18 // task.dim)
    js, kls = [], []
    for i, start in enumerate(range(0, n, chunk)):
        gen = torch.Generator().manual_seed(seed + i)
        x0, cond = task.start(min(chunk, n - start), generator=gen)
        traj = policy.rollout(x0, make_grid("uniform", task.path, steps), cond, generator=gen)
        js.append((task.reward(traj.x_final, cond) - task.beta_kl * traj.path_kl).double())
        kls.append(traj.path_kl.double())
    return torch.cat(js), torch.cat(kls)


def reference_job(job: ReferenceJob) -> Reference:
    """The task's exact reference, and a*'s per-sample J on the curve and final draws (to pair every run with)."""
    options = dict(job.task)
    task = make_task(options.pop("name"), options)
    ref = task.compute_reference(n=job.reference_n)
    task.use_reference(ref)
    a_star = optimal_policy(task)
    return Reference(job.key, ref, per_sample_objective(a_star, task, job.eval_steps, job.eval_n, EVAL_SEED)[0],
                     per_sample_objective(a_star, task, job.eval_steps, job.final_n, FINAL_SEED)[0],
                     solver_fractions(a_star, task, job.robust_n) if job.robust_n else None)


def solver_fractions(policy, task, n: int) -> dict[str, float]:
    """The paired reward gain over the pretrained model under each solver of finetune_bench's robustness table, as
    a fraction of the gain under 20 EM steps; the same draws and noise for every policy (hence paired with a*)."""
    plan = EvalPlan(eval_n=0, final_n=0, eval_steps=0, eval_seed=0, final_seed=0, robust_n=n, robust_seed=ROBUST_SEED,
                    robust_solvers=ROBUSTNESS_SOLVERS, robust_base=ROBUSTNESS_BASE)
    return {f"{g.solver} {g.steps}": g.fraction for g in robustness_gains(policy, task, plan)}


def paired_fraction(j: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """1 + mean(J_theta - J_a*) / (J* - E_pre[r]) and its standard error, on the same draws and noise."""
    j_opt = ref.j_opt_eval if len(j) == len(ref.j_opt_eval) else ref.j_opt_final
    diff = j - j_opt
    return 1.0 + float(diff.mean()) / ref.improvement, float(diff.std()) / math.sqrt(len(diff)) / ref.improvement


def run_job(args: tuple[RunJob, Reference, EfficiencyConfig]) -> Run:
    """Train one method with one seed: its paired curve (after each of the first `dense` updates, then every
    `eval_every`) and its final paired fraction."""
    job, ref, cfg = args
    start = time.perf_counter()
    variant = METHODS[job.method]
    settings = dict(steps=job.steps, batch_size=cfg.batch_size, updates=job.updates, seed=job.seed, eval_every=0,
                    eval_steps=cfg.eval_steps, tensorboard=False, out=SCRATCH)
    config = variant.train_config(job.task, **settings)
    if job.grid is not None:
        config["grid"] = job.grid
    trainer = Trainer(TrainConfig.from_dict(config), progress=False)
    trainer.task.use_reference(ref.reference)
    policy, task = trainer.policy, trainer.task
    trajectories, fractions, cpu = [0], [0.0], 0.0  # the pretrained model closes nothing, by definition
    for update in range(1, job.updates + 1):
        c = time.process_time()
        trainer.update()
        cpu += time.process_time() - c
        if update <= cfg.dense or update % cfg.eval_every == 0 or update == job.updates:
            j, _ = per_sample_objective(policy, task, cfg.eval_steps, job.eval_n, EVAL_SEED)
            trajectories.append(trainer.trajectories)
            fractions.append(paired_fraction(j, ref)[0])
    saved, policy.reference = policy.reference, True  # the path KL, even where training skips the reference
    j, kl = per_sample_objective(policy, task, cfg.eval_steps, job.final_n, FINAL_SEED)
    policy.reference = saved
    final, se = paired_fraction(j, ref)
    solvers = solver_fractions(policy, task, cfg.robust_n) if job.section == "solvers" else None
    return Run(job.section, job.cell, job.method, job.seed, trajectories, fractions, final, se,
               float(kl.mean()), cpu, time.perf_counter() - start, solvers)


# --- statistics -------------------------------------------------------------------------------------------------
def trajectories_to(run: Run, level: float) -> float | None:
    """Sampled trajectories at which the run's curve first reaches `level`, interpolated linearly; None if never."""
    return first_reach(run.trajectories, run.fraction, level)


@dataclass
class CellStats:
    """A cell's figures over seeds: (mean, 95 % half-width), None where some seed never reached a level."""

    seeds: int
    final: tuple[float, float]
    to_level: dict[str, tuple[float, float] | None]
    reached: dict[str, int]
    cpu_seconds: tuple[float, float]
    path_kl: tuple[float, float]


def cell_stats(runs: list[Run]) -> CellStats:
    to_level, reached = {}, {}
    for level in LEVELS:
        hits = [trajectories_to(r, level) for r in runs]
        reached[str(level)] = sum(h is not None for h in hits)
        to_level[str(level)] = interval(hits) if all(h is not None for h in hits) else None
    return CellStats(len(runs), interval([r.final for r in runs]), to_level, reached,
                     interval([r.train_cpu_seconds for r in runs]), interval([r.path_kl for r in runs]))


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (mean, half-width) intervals do not overlap."""
    return abs(a[0] - b[0]) > a[1] + b[1]


# --- the run ----------------------------------------------------------------------------------------------------
@dataclass
class EfficiencyResults:
    """Every run of every section. A section run again replaces its runs and its header; the others stay."""

    format: str
    headers: dict[str, dict]  # section -> {command, date, machine, config, wall_seconds}
    references: dict[str, dict]  # cell -> {J_star, E_pre_r, improvement}
    runs: list[Run]

    def cells(self, section: str) -> dict[tuple[str, str], list[Run]]:
        out: dict[tuple[str, str], list[Run]] = {}
        for r in self.runs:
            if r.section == section:
                out.setdefault((r.cell, r.method), []).append(r)
        return out

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str).replace("NaN", "null"))

    @classmethod
    def from_json(cls, data: dict) -> EfficiencyResults:
        if data.get("format") != FORMAT:
            raise ValueError(f"expected results of format {FORMAT!r}, found {data.get('format')!r}")
        return cls(**{**data, "runs": [Run(**r) for r in data["runs"]]})


def jobs_of(cfg: EfficiencyConfig) -> list[RunJob]:
    jobs = []
    if "methods" in cfg.sections:
        jobs += [RunJob("methods", key, m, s, TASKS[key], 20, None, cfg.updates, cfg.eval_n, cfg.final_n)
                 for key in cfg.tasks for m in cfg.methods for s in cfg.seeds]
    if "solvers" in cfg.sections:
        jobs += [RunJob("solvers", SOLVER_TASK, m, s, TASKS[SOLVER_TASK], 20, None, cfg.updates, cfg.eval_n,
                        cfg.final_n) for m in SOLVER_METHODS for s in cfg.seeds]
    if "settings" in cfg.sections:
        jobs += [RunJob("settings", name, m, s, SETTINGS[name].task, SETTINGS[name].steps, SETTINGS[name].grid,
                        cfg.settings_updates, cfg.settings_eval_n, cfg.settings_final_n)
                 for name in cfg.settings for m in SETTINGS_METHODS for s in cfg.seeds]
    return jobs


def _expected_cost(job: RunJob) -> float:
    per_update = {"ctrl": 2.0, "draft": 2.0, "adjoint": 2.0, "grpo": 1.3, "ddpo": 1.0, "ctpg": 0.8, "dpok": 0.6}
    size = job.task.get("dim", 8) / 16 + (2.0 if job.task["name"] == "mixture" else 1.0)
    return per_update.get(job.method, 1.5) * job.updates * job.steps * size


def previous(out: Path) -> EfficiencyResults | None:
    """The results already in `out`, if any (of this format)."""
    try:
        return EfficiencyResults.from_json(json.loads((out / RESULTS).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def run(cfg: EfficiencyConfig, log: Callable[[str], None] | None = None) -> EfficiencyResults:
    """Run the chosen sections; merge them into efficiency.json in cfg.out (the other sections' runs stay); write
    efficiency.md and the PNGs."""
    from scoreaction.experiments.efficiency_report import write_report

    log = log or (lambda message: None)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"command": cfg.command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine_info(cfg), "config": cfg.to_dict()}
    jobs = jobs_of(cfg)
    with executor(cfg) as pool:
        robust_n = {j.reference_key: cfg.robust_n for j in jobs if j.section == "solvers"}
        ref_jobs = list({j.reference_key: ReferenceJob(j.reference_key, j.task, j.eval_n, j.final_n, cfg.eval_steps,
                                                       cfg.reference_n, robust_n.get(j.reference_key, 0))
                         for j in jobs}.values())
        refs = {r.key: r for r in pool.map(reference_job, ref_jobs)}
        log(f"{len(refs)} references in {time.perf_counter() - start:.0f} s; {len(jobs)} runs")
        jobs.sort(key=lambda j: -_expected_cost(j))  # longest first: the pool ends together
        runs = []
        for r in pool.map(run_job, [(j, refs[j.reference_key], cfg) for j in jobs]):
            runs.append(r)
            log(f"[{len(runs)}/{len(jobs)}] {r.section} {r.cell} {r.method} seed {r.seed}: final {r.final:.4f}, "
                f"{r.train_cpu_seconds:.0f} CPU s")
    header["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    header["wall_seconds"] = time.perf_counter() - start
    results = previous(out) if not cfg.quick else None
    results = results or EfficiencyResults(FORMAT, {}, {}, [])
    done = {(j.section, j.method) for j in jobs}
    results.runs = [r for r in results.runs if (r.section, r.method) not in done] + runs
    order = {name: i for i, name in enumerate((*TASKS, *SETTINGS, *METHODS, *SOLVER_METHODS))}
    results.runs.sort(key=lambda r: (SECTIONS.index(r.section), order.get(r.cell, 99), order.get(r.method, 99),
                                     r.seed))
    partial = set(cfg.methods) != set(METHODS)  # a run of some methods adds to the section's earlier runs
    results.headers.update({(f"{section} ({', '.join(cfg.methods)})" if partial and section == "methods" else section):
                            header for section in cfg.sections})
    for j in jobs:
        ref = refs[j.reference_key].reference
        results.references[j.cell] = {"J_star": ref["J_star"], "E_pre_r": ref["E_pre_r"],
                                      "improvement": ref["J_star"] - ref["E_pre_r"]}
        if j.section == "solvers":
            results.references["solvers"] = refs[j.reference_key].solvers
    atomic_write_bytes(out / RESULTS, json.dumps(results.to_json(), indent=1).encode())
    write_report(results, out)
    log(f"wrote {out / REPORT} in {header['wall_seconds']:.0f} s")
    return results
