"""`scoreaction bench --task digits`: ctrl against ddpo, dpok and grpo on a reward learned from comparisons.

One learned reward for every algorithm (stages 1-3 of the loop in digits_loop.py: pretrained samples,
comparisons by a simulated labeler with the hidden "taste" utility, a Bradley-Terry ensemble), fitted
once; then every algorithm fine-tunes the same shipped model with the same seed, batch size, rollout
grid and number of updates, hence the same number of sampled trajectories, and beta_KL > 0 (ddpo,
grpo fold the sampled log-ratio into the reward, dpok and ctrl carry their own KL term).

Every `eval_every` updates each policy is rolled out from the same prior draws, Brownian increments
and class labels (`per_class` per class, the training sampler): the hidden utility (never seen by
the learner), the learned reward, the path KL to the pretrained model, the Frechet distance in the
classifier's features (with its real-vs-real floor) and the class accuracy. Writes digits.md,
digits.json (a DigitsBenchResults) and digits.png into the output folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scoreaction.config import Options, check_positive_int, option
from scoreaction.experiments.common import executor, machine_info
from scoreaction.experiments.digits_loop import (
    NUM_CLASSES,
    TASK,
    DigitsLoopConfig,
    Feedback,
    LearnSeconds,
    RewardFit,
    digits_train_config,
    heldout_real,
    image_metrics,
    learn_reward,
)
from scoreaction.io import atomic_write_bytes
from scoreaction.rewards.utilities import make_utility
from scoreaction.samplers import make_grid
from scoreaction.train import Trainer

FORMAT = "scoreaction-bench-digits-2"
REPORT, RESULTS, PLOT = "digits.md", "digits.json", "digits.png"
# the learning rates kept by the equal-budget sweep of the point benchmark (docs/benchmarks/finetune.md)
ALGORITHMS = {"ctrl": {"lr": 1e-3}, "ddpo": {"lr": 1e-3}, "dpok": {"lr": 3e-3}, "grpo": {"lr": 3e-4}}
EVAL_SEED = 7_000_001


@dataclass
class DigitsBenchConfig(Options):
    out: str = option("docs/benchmarks", help="output folder of digits.md, digits.json and digits.png")
    command: str = option("scoreaction bench --task digits", flag=False,
                          help="the command line printed at the top of the report")
    quick: bool = option(False, help="tiny budgets, every code path: a smoke test (the numbers mean nothing)")
    algorithms: list = option(factory=lambda: list(ALGORITHMS), flag=False,
                              help=f"algorithms to compare, a subset of {list(ALGORITHMS)}")
    eval_every: int = option(20, help="updates between two evaluations of each policy")
    workers: int = option(2, help="processes for the training runs (1: this process)")
    threads: int = option(1, help="torch threads per process")
    setup: DigitsLoopConfig = option(factory=DigitsLoopConfig, flag=False,
                                     help="the loop's settings shared by every algorithm: feedback, beta_kl, budget")

    def __post_init__(self):
        if isinstance(self.setup, dict):
            self.setup = DigitsLoopConfig.from_dict(self.setup, "in the digits benchmark's setup")
        self.algorithms = list(self.algorithms)
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {list(ALGORITHMS)}, found {self.algorithms!r}")
        for name in ("eval_every", "workers", "threads"):
            check_positive_int(name, getattr(self, name))

    @classmethod
    def quick_config(cls, out: str, seed: int = 0, command: str = "scoreaction bench --task digits --quick"):
        """Tiny budgets, every code path: a smoke test (the numbers mean nothing)."""
        return cls(out=out, command=command, quick=True, eval_every=1, workers=1,
                   setup={"seed": seed, "items": 40, "pairs": 50, "updates": 2, "batch_size": 16, "steps": 4,
                          "per_class": 2})


# --- typed results --------------------------------------------------------------------------------
@dataclass
class CurvePoint:
    """One evaluation of one policy on the fixed evaluation draws."""

    update: int
    trajectories: int
    train_seconds: float
    utility: float  # hidden utility, mean
    reward: float  # learned reward, mean
    path_kl: float
    frechet: float
    frechet_floor: float
    class_accuracy: float


@dataclass
class AlgorithmRun:
    algorithm: str
    algo: dict
    curve: list[CurvePoint]  # update 0 is the pretrained model
    train_seconds: float
    train_cpu_seconds: float
    seconds_per_update: float

    def objective_gain(self, beta_kl: float, point: int = -1) -> float:
        """J(theta) - J(pretrained) on the evaluation draws: learned-reward gain - beta_KL path KL."""
        first, p = self.curve[0], self.curve[point]
        return p.reward - first.reward - beta_kl * p.path_kl

    def band(self, beta_kl: float, updates: int) -> float:
        """How far J moves between evaluations over the second half of training (max - min)."""
        half = [self.objective_gain(beta_kl, k) for k, p in enumerate(self.curve) if p.update >= updates / 2]
        return max(half) - min(half)


@dataclass
class DigitsBenchResults:
    command: str
    date: str
    machine: dict
    config: DigitsBenchConfig
    setup: DigitsLoopConfig
    feedback: Feedback
    reward_model: RewardFit
    utility_std_pretrained: float  # the unit of the utility gains: its spread over pretrained samples
    timings: LearnSeconds
    runs: list[AlgorithmRun]
    wall_seconds: float
    format: str = FORMAT


@dataclass
class TrainJob:
    algorithm: str
    algo: dict
    setup: DigitsLoopConfig
    reward_dir: str
    eval_every: int
    work: str


def run(config: DigitsBenchConfig, log: Callable[[str], None] | None = None) -> DigitsBenchResults:
    log = log or (lambda message: None)
    start = time.perf_counter()
    setup = config.setup
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scoreaction-digits-bench-"))
    utility = make_utility(TASK, setup.utility)
    learned = learn_reward(setup, work, utility, log)
    with torch.no_grad():
        unit = float(utility(learned.x, learned.cond).std())
    jobs = [TrainJob(algorithm=name, algo=ALGORITHMS[name], setup=setup, reward_dir=str(learned.reward_dir),
                     eval_every=config.eval_every, work=str(work / name)) for name in config.algorithms]
    runs = []
    with executor(config) as pool:
        for r in pool.map(train_job, jobs):
            runs.append(r)
            last = r.curve[-1]
            log(f"{r.algorithm:>5s}: utility {last.utility:.3f}, learned reward {last.reward:.3f}, path KL "
                f"{last.path_kl:.3f}, Frechet {last.frechet:.2f} ({r.train_seconds:.0f} s training)")
    results = DigitsBenchResults(
        command=config.command, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine_info(config), config=config, setup=setup, feedback=learned.feedback,
        reward_model=learned.fit, utility_std_pretrained=unit, timings=learned.seconds, runs=runs,
        wall_seconds=time.perf_counter() - start)
    atomic_write_bytes(out / RESULTS, json.dumps(dataclasses.asdict(results), indent=1, default=float).encode())
    write_report(results, out)
    log(f"wrote {out / REPORT} in {results.wall_seconds:.0f} s")
    return results


def train_job(job: TrainJob) -> AlgorithmRun:
    """Fine-tune one algorithm on the learned reward; the curve on a fixed evaluation set."""
    setup = job.setup
    utility = make_utility(TASK, setup.utility)
    trainer = Trainer(digits_train_config(setup, job.reward_dir, job.work, job.algorithm, job.algo),
                      progress=False, monitors={"utility": utility})
    task, policy = trainer.task, trainer.policy
    cond = torch.arange(NUM_CLASSES).repeat_interleave(setup.per_class)
    x0 = task.prior_sample(len(cond), generator=torch.Generator().manual_seed(EVAL_SEED), dtype=trainer.dtype)
    ts = make_grid("uniform", task.path, setup.steps)
    real = heldout_real()
    curve, train_seconds, train_cpu = [], 0.0, 0.0

    @torch.no_grad()
    def point(update: int) -> None:
        traj = policy.rollout(x0, ts, cond, generator=torch.Generator().manual_seed(EVAL_SEED + 1))
        x = traj.x_final.float()
        metrics = image_metrics(task, x, cond, real)
        curve.append(CurvePoint(update=update, trajectories=trainer.trajectories, train_seconds=train_seconds,
                                utility=float(utility(x, cond).mean()), reward=float(task.reward(x, cond).mean()),
                                path_kl=float(traj.path_kl.mean()), frechet=metrics.frechet,
                                frechet_floor=metrics.frechet_floor, class_accuracy=metrics.class_accuracy))

    point(0)
    for update in range(1, setup.updates + 1):
        t, c = time.perf_counter(), time.process_time()
        trainer.update()
        train_seconds += time.perf_counter() - t
        train_cpu += time.process_time() - c
        if update % job.eval_every == 0 or update == setup.updates:
            point(update)
    return AlgorithmRun(algorithm=job.algorithm, algo=job.algo, curve=curve, train_seconds=train_seconds,
                        train_cpu_seconds=train_cpu, seconds_per_update=train_seconds / setup.updates)


# --- the report ---------------------------------------------------------------------------------------
def write_report(results: DigitsBenchResults, out: str | Path) -> Path:
    out = Path(out)
    plot(results, out / PLOT)
    atomic_write_bytes(out / REPORT, render_markdown(results).encode())
    return out / REPORT


def plot(results: DigitsBenchResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("J", "J gain (the objective)"), ("utility", "hidden utility (never seen)"),
              ("reward", "learned reward"), ("path_kl", "path KL to pre-trained"), ("frechet", "Frechet distance"))
    beta = results.setup.beta_kl
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    for ax, (key, title) in zip(axes, panels):
        for r in results.runs:
            ys = ([r.objective_gain(beta, k) for k in range(len(r.curve))] if key == "J"
                  else [getattr(p, key) for p in r.curve])
            ax.plot([p.trajectories for p in r.curve], ys, marker="o", ms=3, label=r.algorithm)
        if key == "frechet":
            ax.axhline(results.runs[0].curve[0].frechet_floor, color="k", ls=":", lw=0.8, label="real-vs-real floor")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampled trajectories")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render_markdown(results: DigitsBenchResults) -> str:
    s, m, unit = results.setup, results.machine, results.utility_std_pretrained
    rm, fb, beta = results.reward_model, results.feedback, results.setup.beta_kl
    ceiling = "n/a" if rm.ceiling is None else f"{rm.ceiling:.3f}"
    lrs = ", ".join(f"{r.algorithm} {r.algo['lr']:g}" for r in results.runs)
    loads = ", ".join(f"{v:.1f}" for v in m["load_average_start"] or [])
    machine = (f"- Machine: {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}; {m['workers']} worker "
               f"process(es), {m['threads_per_process']} torch thread(s) each; load average at start {loads}")
    lines = ["# Digits benchmark: ctrl against ddpo, dpok and grpo on a learned reward", "", "```",
             results.command, "```", "", f"- Date: {results.date}", machine,
             f"- Wall time: {results.wall_seconds / 60:.1f} min", ""]
    if results.config.quick:
        lines += ["**Quick mode: tiny budgets, the numbers mean nothing.**", ""]
    settings = [("pretrained samples / same-class comparisons", f"{fb.items} / {fb.comparisons}"),
                ("simulated labeler", f"hidden utility {fb.utility}, temperature {fb.temperature}"),
                ("reward model held-out accuracy (labeler's ceiling)", f"{rm.validation.accuracy:.3f} ({ceiling})"),
                ("seed, batch, updates (trajectories)",
                 f"{s.seed}, {s.batch_size}, {s.updates} ({s.updates * s.batch_size})"),
                ("Euler-Maruyama steps, beta_KL", f"{s.steps}, {s.beta_kl}"),
                ("learning rates (the point benchmark's sweep)", lrs),
                ("evaluation", (f"{10 * s.per_class} samples, the same prior draws, noise and labels for every "
                                "algorithm and point, training sampler"))]
    gains = ("Gains are over the pretrained model on the same draws. J = E[r] - beta_KL KL(P_theta || P_pre) is what "
             "every algorithm maximises; its gain is the learned-reward gain minus beta_KL times the path KL. Hidden "
             f"utility gains in standard deviations over pretrained samples ({unit:.3f}) are in parentheses.")
    lines += ["## Settings", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in settings], "",
              "## Results at equal trajectories", "", gains, "",
              ("| algorithm | J gain | hidden utility gain (sd) | learned reward gain | path KL | Frechet (floor) "
               "| class accuracy | s/update (CPU s) |"), "|---|---|---|---|---|---|---|---|"]
    for r in results.runs:
        first, last = r.curve[0], r.curve[-1]
        lines.append(f"| {r.algorithm} | {r.objective_gain(beta):+.3f} | {last.utility - first.utility:+.3f} "
                     f"({(last.utility - first.utility) / unit:+.2f}) | {last.reward - first.reward:+.3f} | "
                     f"{last.path_kl:.3f} | {last.frechet:.2f} ({last.frechet_floor:.2f}) | "
                     f"{first.class_accuracy:.3f} -> {last.class_accuracy:.3f} | "
                     f"{r.seconds_per_update:.2f} ({r.train_cpu_seconds / s.updates:.2f}) |")
    band = (f"One seed, {10 * s.per_class} evaluation samples. The band is how far J moves between evaluations "
            "over the second half of training: a ranking by the last point alone is only as good as that band.")
    lines += ["", f"![curves]({PLOT})", "", "## Noise and cost of the gains", "", band, "",
              ("| algorithm | J gain | J band (second half) | hidden utility per nat of path KL (sd/nat) "
               "| class accuracy change (points) |"), "|---|---|---|---|---|"]
    for r in sorted(results.runs, key=lambda r: -r.objective_gain(beta)):
        first, last = r.curve[0], r.curve[-1]
        du = (last.utility - first.utility) / unit
        per_nat = f"{du / last.path_kl:.2f}" if last.path_kl > 0 else "n/a"
        lines.append(f"| {r.algorithm} | {r.objective_gain(beta):+.3f} | {r.band(beta, s.updates):.3f} | {per_nat} | "
                     f"{(last.class_accuracy - first.class_accuracy) * 100:+.1f} |")
    return "\n".join(lines + [""])
