"""The fine-tuning benchmark's units of work, each runnable in a worker process: the exact reference of a task,
one training run, one cost cell (optionally in a fresh subprocess)."""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from scoreaction.evaluation import objective, solver_gain
from scoreaction.experiments.finetune_config import VARIANTS, Variant
from scoreaction.experiments.finetune_results import (
    CostCell,
    CurvePoint,
    FinalEval,
    LastUpdate,
    ReferenceResult,
    RunResult,
    SolverGain,
)
from scoreaction.metrics import fit_gaussian, gaussian_kl
from scoreaction.policy import ScoreAsAction
from scoreaction.samplers import make_grid
from scoreaction.tasks import make_task
from scoreaction.train import TrainConfig, Trainer

SCRATCH = os.path.join(tempfile.gettempdir(), "scoreaction-bench")  # the trainers' run folder (nothing is saved)


@dataclass(frozen=True)
class EvalPlan:
    """Sizes, seeds and solvers of every evaluation, shared by the reference and training jobs."""

    eval_n: int
    final_n: int
    eval_steps: int
    eval_seed: int
    final_seed: int
    robust_n: int
    robust_seed: int
    robust_solvers: tuple[tuple[str, int], ...]
    robust_base: tuple[str, int]


@dataclass(frozen=True)
class ReferenceJob:
    key: str  # the benchmark's name of the task
    task: dict  # its options (with "name")
    plan: EvalPlan
    reference_n: int | None = None
    robustness: bool = False


@dataclass
class ReferenceOutput:
    result: ReferenceResult
    j_opt: torch.Tensor  # a*'s per-sample J on the final draws, to pair the runs' with
    robustness: list[SolverGain] | None


@dataclass(frozen=True)
class TrainJob:
    key: str
    task: dict
    variant: Variant
    plan: EvalPlan
    reference: dict  # the task's exact reference, computed once by its ReferenceJob
    j_opt: torch.Tensor
    seed: int
    batch_size: int
    updates: int
    steps: int
    eval_every: int
    robustness: bool = False


@dataclass(frozen=True)
class CostJob:
    variant: str
    dim: int
    steps: int
    batch_size: int
    warmup: int
    timed: int
    seed: int
    threads: int


# --- evaluation helpers ---------------------------------------------------------------------------------
@torch.no_grad()
def per_sample_objective(policy: ScoreAsAction, task, steps: int, n: int, seed: int,
                         dtype=torch.float32) -> torch.Tensor:
    """Per-sample r(X_T) - beta_KL * path KL, (n,) float64: the same prior draws, noise and uniform grid as
    `evaluation.objective(policy, task, steps, n, seed)`, so two policies evaluated with one seed are paired."""
    gen = torch.Generator().manual_seed(seed)
    x0, cond = task.start(n, generator=gen, dtype=dtype)
    traj = policy.rollout(x0, make_grid("uniform", task.path, steps), cond, generator=gen)
    return (task.reward(traj.x_final, cond) - task.beta_kl * traj.path_kl).double()


def optimal_policy(task) -> ScoreAsAction:
    """The exact optimal control a* = s_pre + grad log phi (Eq. E8) as a policy."""
    return ScoreAsAction(task.path, task.pretrained, task.optimal_score, eta=task.eta)


def robustness_gains(policy: ScoreAsAction, task, plan: EvalPlan) -> list[SolverGain]:
    """Paired reward gain over the pretrained model under each solver of the plan, as a fraction of the gain
    under the base solver."""
    gains = [solver_gain(policy, task, solver, steps, n=plan.robust_n, seed=plan.robust_seed)
             for solver, steps in plan.robust_solvers]
    base = next(g for g in gains if (g["solver"], g["steps"]) == tuple(plan.robust_base))
    out = []
    for g in gains:
        fraction = g["gain"] / base["gain"]
        se = abs(fraction) * math.hypot(g["gain_se"] / g["gain"], base["gain_se"] / base["gain"])
        out.append(SolverGain(**g, fraction=fraction, fraction_se=se))
    return out


def _distance(out: dict) -> float | None:
    return out["gaussian_kl"] if "gaussian_kl" in out else out.get("sliced_w2")


# --- jobs -----------------------------------------------------------------------------------------------
def reference_job(job: ReferenceJob) -> ReferenceOutput:
    """Exact reference of one task, the optimal control's per-sample J on the final evaluation draws, the noise
    floors of the distances to p*, and (robustness task) the optimal control's gains under every solver."""
    start = time.perf_counter()
    options = dict(job.task)
    task = make_task(options.pop("name"), options)
    if not task.exact:
        raise ValueError(f"the fine-tuning benchmark needs exact tasks, found {task.name!r}")
    ref = task.compute_reference(n=job.reference_n)
    task.use_reference(ref)
    plan, a_star = job.plan, optimal_policy(task)
    j_opt = per_sample_objective(a_star, task, plan.eval_steps, plan.final_n, plan.final_seed)
    floors = {}
    if task.name == "gaussian":  # the Gaussian-fit KL of exact p* samples: the estimator's own bias
        for n in (plan.eval_n, plan.final_n):
            x = task.sample_optimal(n, generator=torch.Generator().manual_seed(plan.final_seed + 5))
            floors[n] = gaussian_kl(*fit_gaussian(x), ref["p_star_mean"], ref["p_star_cov"])
    gap = ref["J_star"] - ref["E_pre_r"]
    result = ReferenceResult(
        task=job.key, reference=ref, distance="gaussian_kl" if task.name == "gaussian" else "sliced_w2",
        optimal_fraction_plain=(float(j_opt.mean()) - ref["E_pre_r"]) / gap,
        optimal_fraction_se=float(j_opt.std() / math.sqrt(len(j_opt))) / gap,
        distance_floor_eval=floors.get(plan.eval_n), distance_floor_final=floors.get(plan.final_n))
    gains = robustness_gains(a_star, task, plan) if job.robustness else None
    result.seconds = time.perf_counter() - start
    return ReferenceOutput(result, j_opt, gains)


def train_job(job: TrainJob) -> RunResult:
    """Train one variant on one task with the shared budget; curves, final evaluation, robustness."""
    start, cpu_start = time.perf_counter(), time.process_time()
    plan, v = job.plan, job.variant
    config = TrainConfig.from_dict(v.train_config(
        job.task, steps=job.steps, batch_size=job.batch_size, updates=job.updates, seed=job.seed, eval_every=0,
        eval_steps=plan.eval_steps, out=SCRATCH))
    trainer = Trainer(config, progress=False)
    trainer.task.use_reference(job.reference)
    gap = job.reference["J_star"] - job.reference["E_pre_r"]
    train_seconds, train_cpu, eval_seconds, skipped, curve = 0.0, 0.0, 0.0, 0, []

    def point(update: int) -> None:
        nonlocal eval_seconds
        t = time.perf_counter()
        out = objective(trainer.policy, trainer.task, plan.eval_steps, plan.eval_n, seed=plan.eval_seed)
        eval_seconds += time.perf_counter() - t
        curve.append(CurvePoint(update=update, trajectories=trainer.trajectories, train_seconds=train_seconds,
                                fraction=out["fraction"], J=out["J"], J_se=out["J_se"], reward=out["reward"],
                                path_kl=out["path_kl"], distance=_distance(out),
                                distance_floor=out.get("sliced_w2_floor")))

    point(0)
    last = {}
    for update in range(1, job.updates + 1):
        t, c = time.perf_counter(), time.process_time()
        last = trainer.update()
        train_seconds += time.perf_counter() - t
        train_cpu += time.process_time() - c
        skipped += int(last.get("skipped", 0))
        if update % job.eval_every == 0 or update == job.updates:
            point(update)

    t = time.perf_counter()
    out = objective(trainer.policy, trainer.task, plan.eval_steps, plan.final_n, seed=plan.final_seed)
    j_theta = per_sample_objective(trainer.policy, trainer.task, plan.eval_steps, plan.final_n, plan.final_seed)
    diff = j_theta - job.j_opt
    se = float(diff.std()) / math.sqrt(len(diff))
    final = FinalEval(reward=out["reward"], path_kl=out["path_kl"], J=out["J"], J_se=out["J_se"],
                      fraction=out["fraction"], fraction_se=out["J_se"] / gap, distance=_distance(out),
                      distance_floor=out.get("sliced_w2_floor"), fraction_paired=1.0 + float(diff.mean()) / gap,
                      fraction_paired_se=se / gap, regret=-float(diff.mean()), regret_se=se,
                      pairing_check=abs(float(j_theta.mean()) - out["J"]))
    eval_seconds += time.perf_counter() - t
    result = RunResult(variant=v.name, algorithm=v.algorithm, grid=v.grid, task=job.key, curve=curve, final=final,
                       train_seconds=train_seconds, train_cpu_seconds=train_cpu, eval_seconds=eval_seconds,
                       seconds_per_update=train_seconds / job.updates, cpu_seconds_per_update=train_cpu / job.updates,
                       skipped_updates=skipped, last_update=LastUpdate.of(last))
    if job.robustness:
        t = time.perf_counter()
        result.robustness = robustness_gains(trainer.policy, trainer.task, plan)
        result.robustness_seconds = time.perf_counter() - t
    result.wall_seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


# --- cost: one (algorithm, d, K), ideally in a fresh process -------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size (Linux /proc/self/statm), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cost_cell(job: CostJob) -> CostCell:
    """Seconds per update (median of `timed` updates after `warmup`) and the increase of peak RSS over the
    RSS after set-up (trainer built; the kernel's peak counter reset where it can be), on `gaussian` in `dim`."""
    torch.set_num_threads(job.threads)
    v = VARIANTS[job.variant]
    config = TrainConfig.from_dict(v.train_config(
        {"name": "gaussian", "dim": job.dim, "beta_kl": 1.0}, steps=job.steps, batch_size=job.batch_size,
        updates=job.warmup + job.timed, seed=job.seed, eval_every=0, out=SCRATCH))
    trainer = Trainer(config, progress=False)
    gc.collect()
    reset = _reset_peak_rss()
    rss_setup = _rss_mb()
    peak_setup = _peak_rss_mb()
    for _ in range(job.warmup):
        trainer.update()
    seconds, cpu = [], []
    for _ in range(job.timed):
        t, c = time.perf_counter(), time.process_time()
        trainer.update()
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = _peak_rss_mb()
    return CostCell(variant=job.variant, algorithm=v.algorithm, dim=job.dim, steps=job.steps,
                    seconds_per_update=statistics.median(seconds), seconds=seconds,
                    cpu_seconds_per_update=statistics.median(cpu), rss_setup_mb=rss_setup, peak_rss_mb=peak,
                    peak_increase_mb=peak - (rss_setup if reset else peak_setup), peak_reset=reset)


_CELL_SCRIPT = ("import json, sys\nfrom dataclasses import asdict\n"
                "from scoreaction.experiments.finetune_jobs import CostJob, cost_cell\n"
                "print(json.dumps(asdict(cost_cell(CostJob(**json.loads(sys.argv[1]))))))\n")


def run_cost_cell(job: CostJob, isolated: bool, timeout: float = 600.0) -> CostCell:
    """`cost_cell(job)`, in a fresh Python subprocess when `isolated` (a failure becomes the cell's `error`)."""
    if not isolated:
        return cost_cell(job)
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
    failed = CostCell(variant=job.variant, algorithm=VARIANTS[job.variant].algorithm, dim=job.dim, steps=job.steps)
    try:
        proc = subprocess.run([sys.executable, "-c", _CELL_SCRIPT, json.dumps(asdict(job))], check=False,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        failed.error = f"timed out after {timeout:.0f} s"
        return failed
    if proc.returncode != 0:
        failed.error = f"exit code {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
        return failed
    return CostCell(**json.loads(proc.stdout.strip().splitlines()[-1]))
