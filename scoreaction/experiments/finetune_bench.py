"""Benchmark of the fine-tuning algorithms on the exact tasks: optimality, solver robustness and cost.

Clock: RL-time grids throughout, as in the trainer. Three sections:

    optimality   every variant (ctrl, ctpg, ddpo, dpok, grpo, draft, and ctrl on a uniform grid) on
                 gaussian d=2, gaussian d=16 and mixture (beta_KL = 1), all with the same seed, batch size,
                 number of updates (hence sampled trajectories) and rollout steps K. Curves of the fraction
                 of the achievable improvement closed, (J(theta) - E_pre[r]) / (J* - E_pre[r]), and of the
                 distance to p* against sampled trajectories, evaluated by `evaluation.objective` on a
                 200-step Euler-Maruyama grid whatever grid training used; a final evaluation on more samples.
    robustness   the gaussian d=2 policies of the optimality section (trained with 20 EM steps): reward gain
                 over the pretrained model under the same sampler (`evaluation.solver_gain`) at 5..200 EM
                 steps and with heun / dpm2 on the probability-flow ODE, as a fraction of the gain at 20 EM
                 steps; the exact optimal control a* (Eq. E8) as a yardstick.
    cost         seconds and peak-RSS increase per update for each (algorithm, d, K), each in a fresh
                 subprocess.

Two estimates of the fraction closed are reported. The plain Monte-Carlo one is `objective`'s. The paired
one rolls the policy and the exact optimal control a* out from the same prior draws with the same Brownian
increments on the same 200-step grid: J(theta) - J* is estimated by the mean of the per-sample difference,
whose standard error is 10-50 times smaller because both paths see the same noise. It measures
J_200(theta) - J_200(a*) + J*, i.e. the regret against the optimum under the evaluation sampler.

Modules: finetune_config (tasks, variants, BenchConfig), finetune_jobs (the units of work), finetune_results
(the result dataclasses), finetune_report (finetune.md and the plots). `run(config)` runs the sections and
writes finetune.json, finetune.md and finetune_*.png; `finetune_report.write_report(results, out)` regenerates
the Markdown and the plots from the results alone (`BenchResults.from_json` reads finetune.json back).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from scoreaction.experiments.common import executor, machine_info
from scoreaction.experiments.finetune_config import (
    ALGORITHMS,
    FINAL_SEED_OFFSET,
    FORMAT,
    REPORT,
    RESULTS,
    ROBUST_SEED_OFFSET,
    ROBUSTNESS_BASE,
    ROBUSTNESS_TASK,
    SECTIONS,
    TASKS,
    VARIANTS,
    BenchConfig,
    Variant,
)
from scoreaction.experiments.finetune_jobs import (
    CostJob,
    EvalPlan,
    ReferenceJob,
    TrainJob,
    reference_job,
    run_cost_cell,
    train_job,
)
from scoreaction.experiments.finetune_report import write_report
from scoreaction.experiments.finetune_results import BenchResults, CostCell, RobustnessResult
from scoreaction.io import atomic_write_bytes
from scoreaction.train.loop import EVAL_SEED_OFFSET

__all__ = ["ALGORITHMS", "REPORT", "RESULTS", "SECTIONS", "TASKS", "VARIANTS", "BenchConfig", "BenchResults",
           "Variant", "run", "write_report"]


def run(config: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResults:
    """Run the chosen sections; write finetune.json, finetune.md and the PNGs into config.out; return the results."""
    log = log or (lambda message: None)
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = BenchResults(format=FORMAT, command=config.command,
                           date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           machine=machine_info(config), config=config,
                           variants={name: VARIANTS[name] for name in config.variants})
    if {"optimality", "robustness"} & set(config.sections):
        train_all(config, results, log)
    if "cost" in config.sections:
        results.cost = cost(config, log)
    results.machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results.wall_seconds = time.perf_counter() - start
    atomic_write_bytes(out / RESULTS, json.dumps(results.to_json(), indent=1).encode())
    write_report(results, out)
    log(f"wrote {out / REPORT} in {results.wall_seconds:.0f} s")
    return results


def eval_plan(config: BenchConfig) -> EvalPlan:
    return EvalPlan(eval_n=config.eval_n, final_n=config.final_n, eval_steps=config.eval_steps,
                    eval_seed=config.seed + EVAL_SEED_OFFSET, final_seed=config.seed + FINAL_SEED_OFFSET,
                    robust_n=config.robust_n, robust_seed=config.seed + ROBUST_SEED_OFFSET,
                    robust_solvers=config.robust_solvers, robust_base=ROBUSTNESS_BASE)


def train_all(config: BenchConfig, results: BenchResults, log: Callable[[str], None]) -> None:
    """The references, then every (task, variant) run, longest first; fills the optimality and robustness results."""
    tasks = config.tasks if "optimality" in config.sections else (ROBUSTNESS_TASK,)
    plan = eval_plan(config)
    robust = "robustness" in config.sections
    with executor(config) as pool:
        ref_jobs = [ReferenceJob(key, TASKS[key], plan, config.reference_n, robust and key == ROBUSTNESS_TASK)
                    for key in tasks]
        refs = {}
        for job, r in zip(ref_jobs, pool.map(reference_job, ref_jobs)):
            refs[job.key] = r
            log(f"reference {job.key}: J* = {r.result.reference['J_star']:.4f}, E_pre[r] = "
                f"{r.result.reference['E_pre_r']:.4f} ({r.result.seconds:.0f} s)")
        jobs = [TrainJob(key, TASKS[key], VARIANTS[name], plan, refs[key].result.reference, refs[key].j_opt,
                         seed=config.seed, batch_size=config.batch_size, updates=config.updates, steps=config.steps,
                         eval_every=config.eval_every, robustness=robust and key == ROBUSTNESS_TASK)
                for key in tasks for name in config.variants]
        jobs.sort(key=lambda j: -_expected_cost(j))  # longest first: the pool ends together
        runs = []
        for r in pool.map(train_job, jobs):
            runs.append(r)
            log(f"{r.task:>12s} {r.variant:<13s} fraction {r.final.fraction:.4f} (paired "
                f"{r.final.fraction_paired:.4f}), {r.wall_seconds:.0f} s")
    results.references = {key: r.result for key, r in refs.items()}
    runs.sort(key=lambda r: (list(TASKS).index(r.task), list(VARIANTS).index(r.variant)))
    if "optimality" in config.sections:
        results.optimality = runs
    if robust:
        results.robustness = RobustnessResult(
            task=ROBUSTNESS_TASK, solvers=list(config.robust_solvers), base=ROBUSTNESS_BASE, n=config.robust_n,
            optimal=refs[ROBUSTNESS_TASK].robustness,
            variants={r.variant: r.robustness for r in runs if r.robustness is not None})


def _expected_cost(job: TrainJob) -> float:
    per_update = {"ctrl": 2.0, "draft": 2.0, "grpo": 1.3, "ddpo": 1.0, "ctpg": 0.8, "dpok": 0.6}
    per_task = {"gaussian-d2": 1.0, "gaussian-d16": 1.2, "mixture": 1.6}
    return per_update[job.variant.algorithm] * per_task[job.key]


def cost(config: BenchConfig, log: Callable[[str], None]) -> list[CostCell]:
    """One cell per (algorithm, d, K), one at a time; variants that are not plain algorithms are skipped."""
    rows = []
    template = CostJob(variant="", dim=0, steps=0, batch_size=config.batch_size, warmup=config.cost_warmup,
                       timed=config.cost_timed, seed=config.seed, threads=config.threads)
    for name in (name for name in config.variants if name in ALGORITHMS):
        for dim, steps in config.cost_cells:
            row = run_cost_cell(replace(template, variant=name, dim=dim, steps=steps), config.cost_isolated)
            rows.append(row)
            log(f"cost {name} d={dim} K={steps}: " + (row.error or
                f"{row.seconds_per_update:.3f} s/update, +{row.peak_increase_mb:.1f} MB"))
    return rows
