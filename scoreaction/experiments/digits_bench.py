"""`scoreaction bench --task digits`: ctrl against ddpo, dpok and grpo on a reward learned from comparisons.

One learned reward for every algorithm (the quickstart's stages 1-3: pretrained samples, comparisons
by a simulated labeler with the hidden "taste" utility, a Bradley-Terry ensemble), fitted once; then
every algorithm fine-tunes the same shipped model with the same seed, batch size, rollout grid and
number of updates, hence the same number of sampled trajectories, and beta_KL > 0 (ddpo, grpo fold
the sampled log-ratio into the reward, dpok and ctrl carry their own KL term).

Every `eval_every` updates each policy is rolled out from the same prior draws, Brownian increments
and class labels (`per_class` per class, the training sampler): the hidden utility (never seen by
the learner), the learned reward, the path KL to the pretrained model, the Frechet distance in the
classifier's features (with its real-vs-real floor) and the class accuracy. Writes digits.md,
digits.json and digits.png into the output folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scoreaction.experiments.common import executor, machine_info
from scoreaction.experiments.quickstart import (
    NUM_CLASSES,
    TASK,
    QuickstartConfig,
    learn_reward,
    task_image_report,
    train_config,
)
from scoreaction.io import atomic_write_bytes
from scoreaction.rewards.utilities import make_utility
from scoreaction.samplers import make_grid
from scoreaction.tasks.digits import digits_data
from scoreaction.train import Trainer

REPORT, RESULTS, PLOT = "digits.md", "digits.json", "digits.png"
# the learning rates kept by the equal-budget sweep of the point benchmark (docs/benchmarks/finetune.md)
ALGORITHMS = {"ctrl": {"lr": 1e-3}, "ddpo": {"lr": 1e-3}, "dpok": {"lr": 3e-3}, "grpo": {"lr": 3e-4}}
EVAL_SEED = 7_000_001


@dataclass
class DigitsBenchConfig:
    out: str = "docs/benchmarks"
    command: str = "scoreaction bench --task digits"
    quick: bool = False
    algorithms: tuple = tuple(ALGORITHMS)
    eval_every: int = 20
    workers: int = 2
    threads: int = 1
    setup: dict = field(default_factory=dict)  # QuickstartConfig options (feedback, beta_KL, budget)

    @classmethod
    def quick_config(cls, out: str, seed: int = 0, command: str = "scoreaction bench --task digits --quick"):
        """Tiny budgets, every code path: a smoke test (the numbers mean nothing)."""
        return cls(out=out, command=command, quick=True, eval_every=1, workers=1,
                   setup={"seed": seed, "items": 40, "pairs": 50, "updates": 2, "batch_size": 16, "steps": 4,
                          "per_class": 2})

    def quickstart(self) -> QuickstartConfig:
        return QuickstartConfig(**{"out": self.out, **self.setup})


def run(config: DigitsBenchConfig, log: Callable[[str], None] | None = None) -> dict:
    log = log or (lambda message: None)
    start = time.perf_counter()
    setup = config.quickstart()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scoreaction-digits-bench-"))
    utility = make_utility(TASK, setup.utility)
    timings = {}
    learned = learn_reward(setup, work, utility, log, timings)
    with torch.no_grad():
        unit = float(utility(learned["x"], learned["cond"]).std())
    jobs = [{"algorithm": name, "algo": ALGORITHMS[name], "setup": setup.to_dict(), "reward_dir": str(learned["reward_dir"]),
             "eval_every": config.eval_every, "work": str(work / name)} for name in config.algorithms]
    with executor(config) as pool:
        runs = []
        for r in pool.map(train_job, jobs):
            runs.append(r)
            last = r["curve"][-1]
            log(f"{r['algorithm']:>5s}: utility {last['utility']:.3f}, learned reward {last['reward']:.3f}, path KL "
                f"{last['path_kl']:.3f}, Frechet {last['frechet']:.2f} ({r['train_seconds']:.0f} s training)")
    results = {"format": "scoreaction-bench-digits-1", "command": config.command,
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine_info(config), "config": dataclasses.asdict(config), "setup": setup.to_dict(),
               "feedback": learned["feedback"], "reward_model": learned["reward_model"],
               "utility_std_pretrained": unit, "timings": timings, "runs": runs,
               "wall_seconds": time.perf_counter() - start}
    atomic_write_bytes(out / RESULTS, json.dumps(results, indent=1, default=float).encode())
    write_report(results, out)
    log(f"wrote {out / REPORT} in {results['wall_seconds']:.0f} s")
    return results


def train_job(job: dict) -> dict:
    """Fine-tune one algorithm on the learned reward; the curve on a fixed evaluation set."""
    setup = QuickstartConfig(**job["setup"])
    utility = make_utility(TASK, setup.utility)
    trainer = Trainer(train_config(setup, job["reward_dir"], Path(job["work"]), job["algorithm"], job["algo"]),
                      progress=False, monitors={"utility": utility})
    task, policy = trainer.task, trainer.policy
    cond = torch.arange(NUM_CLASSES).repeat_interleave(setup.per_class)
    x0 = task.prior_sample(len(cond), generator=torch.Generator().manual_seed(EVAL_SEED), dtype=trainer.dtype)
    ts = make_grid("uniform", task.path, setup.steps)
    real = {"a": digits_data("heldout_a"), "b": digits_data("heldout_b")}
    curve, train_seconds, train_cpu = [], 0.0, 0.0

    @torch.no_grad()
    def point(update: int) -> None:
        traj = policy.rollout(x0, ts, cond, generator=torch.Generator().manual_seed(EVAL_SEED + 1))
        x = traj.x_final.float()
        report = task_image_report(task, x, cond, real)
        curve.append({"update": update, "trajectories": trainer.trajectories, "train_seconds": train_seconds,
                      "utility": float(utility(x, cond).mean()), "reward": float(task.reward(x, cond).mean()),
                      "path_kl": float(traj.path_kl.mean()), "frechet": report["frechet"],
                      "frechet_floor": report["frechet_floor"], "class_accuracy": report["class_accuracy"]})

    point(0)
    for update in range(1, setup.updates + 1):
        t, c = time.perf_counter(), time.process_time()
        trainer.update()
        train_seconds += time.perf_counter() - t
        train_cpu += time.process_time() - c
        if update % job["eval_every"] == 0 or update == setup.updates:
            point(update)
    return {"algorithm": job["algorithm"], "algo": job["algo"], "curve": curve, "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu, "seconds_per_update": train_seconds / setup.updates}


# --- the report ---------------------------------------------------------------------------------------
def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    plot(results, out / PLOT)
    text = render_markdown(results)
    atomic_write_bytes(out / REPORT, text.encode())
    return out / REPORT


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("J", "J gain (the objective)"), ("utility", "hidden utility (never seen)"),
              ("reward", "learned reward"), ("path_kl", "path KL to pre-trained"), ("frechet", "Frechet distance"))
    beta = results["setup"]["beta_kl"]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    for ax, (key, title) in zip(axes, panels):
        for r in results["runs"]:
            ys = ([objective_gain(r, beta, k) for k in range(len(r["curve"]))] if key == "J"
                  else [p[key] for p in r["curve"]])
            ax.plot([p["trajectories"] for p in r["curve"]], ys, marker="o", ms=3, label=r["algorithm"])
        if key == "frechet":
            ax.axhline(results["runs"][0]["curve"][0]["frechet_floor"], color="k", ls=":", lw=0.8,
                       label="real-vs-real floor")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampled trajectories")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render_markdown(results: dict) -> str:
    s, m, unit = results["setup"], results["machine"], results["utility_std_pretrained"]
    rm, fb = results["reward_model"], results["feedback"]
    lines = ["# Digits benchmark: ctrl against ddpo, dpok and grpo on a learned reward", "", "```",
             results["command"], "```", "",
             f"- Date: {results['date']}",
             f"- Machine: {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}; {m['workers']} worker "
             f"process(es), {m['threads_per_process']} torch thread(s) each; load average at start "
             f"{', '.join(f'{v:.1f}' for v in m['load_average_start'] or [])}",
             f"- Wall time: {results['wall_seconds'] / 60:.1f} min", ""]
    if results["config"]["quick"]:
        lines += ["**Quick mode: tiny budgets, the numbers mean nothing.**", ""]
    lrs = ", ".join(f"{r['algorithm']} {r['algo']['lr']:g}" for r in results["runs"])
    lines += ["## Settings", "",
              f"The shipped digits model; {fb['items']} pretrained samples; {fb['comparisons']} same-class comparisons "
              f"by a simulated labeler (hidden utility {fb['utility']!r}, temperature {fb['temperature']}); one "
              f"Bradley-Terry ensemble fitted on them (held-out accuracy {rm['validation']['accuracy']:.3f}, the "
              f"labeler's own ceiling {rm['ceiling']:.3f}). Every algorithm: seed {s['seed']}, batch {s['batch_size']}, "
              f"{s['updates']} updates ({s['updates'] * s['batch_size']} trajectories), {s['steps']} Euler-Maruyama "
              f"steps, beta_KL = {s['beta_kl']}, the learning rates kept by the point benchmark's sweep "
              f"({lrs}). Curves: "
              f"{10 * s['per_class']} samples ({s['per_class']} per class) from the same prior draws, noise and labels "
              "for every algorithm and every point, under the training sampler.", "",
              "## Results at equal trajectories", "",
              "Utility and reward gains are over the pretrained model on the same draws; the utility gain is also "
              f"given in standard deviations of the hidden utility over pretrained samples ({unit:.3f}).", "",
              "What every algorithm maximises is J = E[r] - beta_KL KL(P_theta || P_pre), so its gain over the "
              "pretrained model (learned reward gain - beta_KL path KL) is the first column.", "",
              "| algorithm | J gain | hidden utility gain (sd) | learned reward gain | path KL | Frechet (floor) "
              "| class accuracy | s/update (CPU s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        first, last = r["curve"][0], r["curve"][-1]
        lines.append(f"| {r['algorithm']} | {objective_gain(r, s['beta_kl']):+.3f} | "
                     f"{last['utility'] - first['utility']:+.3f} "
                     f"({(last['utility'] - first['utility']) / unit:+.2f}) | {last['reward'] - first['reward']:+.3f} | "
                     f"{last['path_kl']:.3f} | {last['frechet']:.2f} ({last['frechet_floor']:.2f}) | "
                     f"{first['class_accuracy']:.3f} -> {last['class_accuracy']:.3f} | "
                     f"{r['seconds_per_update']:.2f} ({r['train_cpu_seconds'] / s['updates']:.2f}) |")
    lines += ["", f"![curves]({PLOT})", "", "## Reading", "", *[f"- {line}" for line in reading(results)], ""]
    return "\n".join(lines)


def objective_gain(run: dict, beta_kl: float, point: int = -1) -> float:
    """J(theta) - J(pretrained) on the evaluation draws: learned-reward gain - beta_KL path KL."""
    first, p = run["curve"][0], run["curve"][point]
    return p["reward"] - first["reward"] - beta_kl * p["path_kl"]


def reading(results: dict) -> list[str]:
    """Facts from the table, in words: the objective and its noise, then utility per unit of KL."""
    unit, beta = results["utility_std_pretrained"], results["setup"]["beta_kl"]
    runs = sorted(results["runs"], key=lambda r: -objective_gain(r, beta))
    bands = {}
    for r in runs:  # how much J moves between evaluations over the second half of training
        half = [objective_gain(r, beta, k) for k, p in enumerate(r["curve"])
                if p["update"] >= results["setup"]["updates"] / 2]
        bands[r["algorithm"]] = max(half) - min(half)
    out = ["J gain (what all four maximise) over the pretrained model at the last evaluation: "
           + ", ".join(f"{r['algorithm']} {objective_gain(r, beta):+.3f}" for r in runs)
           + f". Over the second half of training the curves move by up to {max(bands.values()):.3f} from one "
           f"evaluation to the next (one seed, {10 * results['setup']['per_class']} evaluation samples), so a "
           "ranking by the last point alone decides little; the band of each is given below."]
    for r in runs:
        first, last = r["curve"][0], r["curve"][-1]
        du = (last["utility"] - first["utility"]) / unit
        out.append(f"{r['algorithm']}: J moved within a band of {bands[r['algorithm']]:.3f} over the second half; "
                   f"{du:+.2f} sd of hidden utility at path KL {last['path_kl']:.2f} "
                   f"({du / last['path_kl']:.2f} sd per nat), learned reward {last['reward'] - first['reward']:+.3f}; "
                   f"Frechet {last['frechet']:.2f}; class accuracy "
                   f"{(last['class_accuracy'] - first['class_accuracy']) * 100:+.1f} points.")
    return out
