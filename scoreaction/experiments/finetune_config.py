"""What the fine-tuning benchmark runs: its tasks, its variants (algorithm + grid + options) and `BenchConfig`.

How the variants' options were chosen is in docs/benchmarks/tuning-notes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scoreaction.config import Options, check_seed, option
from scoreaction.train.loop import EVAL_SEED_OFFSET

SECTIONS = ("optimality", "robustness", "cost")
ALGORITHMS = ("ctrl", "ctpg", "ddpo", "dpok", "grpo", "draft")
TASKS = {  # key -> task options (TrainConfig.task)
    "gaussian-d2": {"name": "gaussian", "dim": 2, "beta_kl": 1.0},
    "gaussian-d16": {"name": "gaussian", "dim": 16, "beta_kl": 1.0},
    "mixture": {"name": "mixture", "beta_kl": 1.0},
}
ROBUSTNESS_TASK = "gaussian-d2"
ROBUSTNESS_SOLVERS = (("em", 5), ("em", 10), ("em", 20), ("em", 50), ("em", 200), ("heun", 10), ("heun", 20),
                      ("dpm2", 10), ("dpm2", 20))
ROBUSTNESS_BASE = ("em", 20)  # the gains under every solver are fractions of the gain under this one
EVAL_STEPS = 200
FINAL_SEED_OFFSET = 2 * EVAL_SEED_OFFSET
ROBUST_SEED_OFFSET = 3 * EVAL_SEED_OFFSET
REPORT, RESULTS, PREFIX = "finetune.md", "finetune.json", "finetune_"  # docs/benchmarks is shared
TUNING_NOTES = "tuning-notes.md"  # committed next to the report in docs/benchmarks
FORMAT = "scoreaction-bench-2"


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: an algorithm, its rollout grid and its options (TrainConfig.algo)."""

    name: str
    algorithm: str
    grid: str = "uniform"
    algo: dict = field(default_factory=dict)
    lr_decay: bool = False  # the policy's learning rate decays linearly to 0 over the run (lr_schedule: linear)
    task: dict = field(default_factory=dict)  # task options of the variant, over the benchmark's (e.g. residual)

    def train_config(self, task: dict, **settings) -> dict:
        """The TrainConfig mapping (`TrainConfig.from_dict`) of this variant on `task` with `settings`."""
        return {"task": {**task, **self.task}, "algorithm": self.algorithm, "algo": dict(self.algo), "grid": self.grid,
                "lr_schedule": "linear" if self.lr_decay else "constant", **settings}


# Options not listed are the defaults of the algorithm's Config dataclass (see docs/benchmarks/tuning-notes.md).
VARIANTS = {v.name: v for v in (
    Variant("ctrl", "ctrl", "random"),
    Variant("ctrl-uniform", "ctrl", "uniform"),
    Variant("ctpg", "ctpg", algo={"lr": 1e-2}),
    Variant("ddpo", "ddpo"),
    Variant("dpok", "dpok", algo={"lr": 3e-3}),
    Variant("grpo", "grpo", algo={"lr": 3e-4}),
    Variant("draft", "draft", algo={"lr": 3e-3}),
    Variant("ctrl+lr-decay", "ctrl", "random", lr_decay=True),
    Variant("ddpo+lr-decay", "ddpo", lr_decay=True),
)}


@dataclass
class BenchConfig(Options):
    """What `run` does. `BenchConfig.quick_config(out)` is a smoke-test budget (under a minute of CPU)."""

    out: str = option("docs/benchmarks", help="output folder of finetune.md, finetune.json and the plots")
    sections: tuple = option(factory=lambda: SECTIONS, flag=False,
                             help=f"sections to run, a subset of {', '.join(SECTIONS)}")
    seed: int = option(0, help="seed of the training runs (evaluation seeds are offsets of it)")
    command: str = option("scoreaction bench", help="the command line, printed at the top of the report")
    quick: bool = option(False, help="smoke-test budgets: the report says its numbers mean nothing")
    tasks: tuple = option(factory=lambda: tuple(TASKS), flag=False, help=f"tasks, among {', '.join(TASKS)}")
    variants: tuple = option(factory=lambda: tuple(VARIANTS), flag=False,
                             help=f"variants, among {', '.join(VARIANTS)}")
    batch_size: int = option(256, help="rollouts per update, every variant")
    updates: int = option(200, help="updates per training run, every variant")
    steps: int = option(20, help="K, Euler-Maruyama steps of the training rollouts")
    eval_every: int = option(20, help="updates between two points of the learning curves")
    eval_n: int = option(4096, help="samples per point of the learning curves")
    final_n: int = option(32768, help="samples of the final evaluation")
    eval_steps: int = option(EVAL_STEPS, help="Euler-Maruyama steps of every evaluation (a uniform grid)")
    reference_n: int | None = option(None, help="Monte-Carlo size of the mixture's reference (default: the task's)")
    robust_n: int = option(16384, help="samples per solver in the robustness section")
    robust_solvers: tuple = option(factory=lambda: ROBUSTNESS_SOLVERS, flag=False,
                                   help=f"(solver, steps) pairs of the robustness section; must include "
                                        f"{ROBUSTNESS_BASE}")
    cost_dims: tuple = option(factory=lambda: (2, 64, 1024), flag=False, help="dimensions d of the cost section")
    cost_steps: tuple = option(factory=lambda: (10, 20, 50), flag=False,
                               help="rollout steps K of the cost section (at the smallest d)")
    cost_warmup: int = option(1, help="untimed updates before the timed ones in each cost cell")
    cost_timed: int = option(3, help="timed updates in each cost cell (the median is reported)")
    cost_isolated: bool = option(True, help="each cost cell in a fresh subprocess (clean memory measurements)")
    workers: int = option(2, help="processes for the training runs")
    threads: int = option(1, help="torch threads per process")

    def __post_init__(self):
        self.sections = tuple(self.sections)
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {list(SECTIONS)}, found {list(self.sections)}")
        for name, pool in (("tasks", TASKS), ("variants", VARIANTS)):
            setattr(self, name, tuple(getattr(self, name)))
            bad = sorted(set(getattr(self, name)) - set(pool))
            if bad:
                raise ValueError(f"{name} must be among {sorted(pool)}, found {bad[0]!r}")
        if "robustness" in self.sections and ROBUSTNESS_TASK not in self.tasks:
            self.tasks = (*self.tasks, ROBUSTNESS_TASK)
        for name in ("batch_size", "updates", "steps", "eval_every", "eval_n", "final_n", "eval_steps", "robust_n",
                     "cost_timed", "workers", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, found {value!r}")
        self.robust_solvers = tuple(tuple(pair) for pair in self.robust_solvers)
        self.cost_dims, self.cost_steps = tuple(self.cost_dims), tuple(self.cost_steps)
        if ROBUSTNESS_BASE not in self.robust_solvers:
            raise ValueError(f"robust_solvers must include {ROBUSTNESS_BASE}, found {list(self.robust_solvers)}")
        check_seed("seed", self.seed)

    @classmethod
    def quick_config(cls, out: str, seed: int = 0, sections: tuple = SECTIONS,
                     command: str = "scoreaction bench --quick") -> BenchConfig:
        """Tiny budgets, every code path: for smoke tests (the numbers mean nothing)."""
        return cls(out=out, sections=sections, seed=seed, command=command, quick=True, batch_size=32, updates=2,
                   steps=5, variants=(*ALGORITHMS, "ctrl+lr-decay"), eval_every=2, eval_n=128, final_n=256,
                   eval_steps=20, reference_n=4096, robust_n=64,
                   robust_solvers=(("em", 5), ("em", 20), ("heun", 10), ("dpm2", 10)), cost_dims=(2, 8),
                   cost_steps=(5, 10), cost_warmup=0, cost_timed=1, cost_isolated=False, workers=1)

    @property
    def cost_cells(self) -> list[tuple[int, int]]:
        """(d, K) pairs of the cost section: every d at the benchmark's K, every K at the smallest d."""
        cells = [(d, self.steps) for d in self.cost_dims]
        return cells + [(min(self.cost_dims), k) for k in self.cost_steps if (min(self.cost_dims), k) not in cells]
