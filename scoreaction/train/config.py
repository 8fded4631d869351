"""The trainer's configuration: one dataclass, validated on construction.

YAML layout (every key optional; defaults < file < flags < --set):

    task: {name: gaussian, dim: 2, beta_kl: 1.0}     # the task and its options
    algorithm: ctrl                                  # ctrl, ctpg, ddpo, dpok, grpo, draft
    algo: {lr: 1e-3, epochs: 4}                      # that algorithm's options (its Config dataclass)
    steps: 20                                        # K, steps of the rollout grid
    grid: uniform                                    # or random (a fresh grid per batch), quadratic, edm
    batch_size: 256
    updates: 100
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scoreaction.algorithms import algorithm_class
from scoreaction.config import Options, check_choice, check_nonnegative, check_nonnegative_int, check_positive_int
from scoreaction.samplers import GRIDS

DTYPES = ("float32", "float64")
LR_SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig(Options):
    task: dict = field(default_factory=lambda: {"name": "gaussian"})
    algorithm: str = "ctrl"
    algo: dict = field(default_factory=dict)
    steps: int = 20
    grid: str = "uniform"
    batch_size: int = 256
    updates: int = 100
    seed: int = 0
    dtype: str = "float32"
    hidden: int = 128
    action_noise: float = 0.0  # sigma_a for eta = 0 rollouts
    # the policy's learning rate: constant, or linear from algo.lr at update 1 to 0 after update `updates`
    # (at a constant rate the policy keeps fluctuating around the optimum: docs/benchmarks/finetune.md)
    lr_schedule: str = "constant"
    eval_every: int = 20  # 0: only at the end
    eval_n: int | None = None  # None: the task's `eval_n` (4096 where it has none)
    eval_steps: int | None = None  # None: the task's `eval_steps` (200 where it has none)
    checkpoint_every: int = 0  # 0: only at the end
    max_skipped: int = 5  # consecutive batches with a non-finite reward before the run stops
    out: str = "runs/train"

    def __post_init__(self):
        if not isinstance(self.task, dict) or "name" not in self.task:
            raise ValueError(f"task must be a mapping with a 'name', found {self.task!r}")
        algorithm_class(self.algorithm)
        if not isinstance(self.algo, dict):
            raise ValueError(f"algo must be a mapping of options, found {self.algo!r}")
        for name in ("steps", "batch_size", "updates", "hidden", "max_skipped"):
            check_positive_int(name, getattr(self, name))
        for name in ("eval_n", "eval_steps"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "seed"):
            check_nonnegative_int(name, getattr(self, name))
        check_choice("grid", self.grid, GRIDS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_nonnegative("action_noise", self.action_noise)
