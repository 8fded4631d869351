"""The fine-tuning benchmark's results as dataclasses; finetune.json is `dataclasses.asdict` of `BenchResults`
(non-finite floats written as null), and `BenchResults.from_json` reads it back."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import torch

from scoreaction.experiments.finetune_config import FORMAT, BenchConfig, Variant


@dataclass
class SolverGain:
    """Paired reward gain over the pretrained model under one (solver, steps), and its fraction of the gain under
    the base solver (standard error by the delta method, treating the two gains as independent)."""

    solver: str
    steps: int
    reward: float
    reward_pretrained: float
    gain: float
    gain_se: float
    fraction: float
    fraction_se: float


@dataclass
class CurvePoint:
    """One evaluation of a training run (`evaluation.objective` on the curve draws)."""

    update: int
    trajectories: int
    train_seconds: float
    fraction: float | None
    J: float
    J_se: float
    reward: float
    path_kl: float
    distance: float | None
    distance_floor: float | None = None  # the sliced-W2 noise floor where the evaluation measures one


@dataclass
class FinalEval:
    """The final evaluation (`evaluation.objective` on the final draws), and the paired comparison with a*: the
    policy and a* rolled out from the same prior draws with the same noise."""

    reward: float
    path_kl: float
    J: float
    J_se: float
    fraction: float | None
    fraction_se: float | None
    distance: float | None
    distance_floor: float | None  # the sliced-W2 noise floor where the evaluation measures one
    fraction_paired: float
    fraction_paired_se: float
    regret: float  # J(a*) - J(theta) on the same draws and noise (nats)
    regret_se: float
    pairing_check: float  # |mean of the per-sample J - objective's J|: the same draws, so ~1e-7

    @property
    def gap(self) -> float:
        """1 - the paired fraction closed."""
        return 1.0 - self.fraction_paired


@dataclass
class LastUpdate:
    """The figures of a run's last update that its algorithm reports (None where it reports none)."""

    reward_mean: float | None = None
    path_kl: float | None = None
    J: float | None = None
    approx_kl: float | None = None
    clipfrac: float | None = None
    value_explained_var: float | None = None

    @classmethod
    def of(cls, metrics: dict) -> LastUpdate:
        return cls(**{f.name: metrics.get(f.name) for f in dataclasses.fields(cls)})


@dataclass
class RunResult:
    """One variant trained on one task: curves, final evaluation, timings and (robustness task) solver gains."""

    variant: str
    algorithm: str
    grid: str
    task: str
    curve: list[CurvePoint]
    final: FinalEval
    train_seconds: float
    train_cpu_seconds: float
    eval_seconds: float
    seconds_per_update: float
    cpu_seconds_per_update: float
    skipped_updates: int
    last_update: LastUpdate
    robustness: list[SolverGain] | None = None
    robustness_seconds: float | None = None
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


@dataclass
class ReferenceResult:
    """A task's exact reference and what the exact optimal control a* scores on the final evaluation draws."""

    task: str
    reference: dict  # Task.compute_reference(): J_star, E_pre_r, KL_star, moments, ... (keys are the task's)
    distance: str  # what "distance to p*" is on this task: gaussian_kl (of a Gaussian fit) or sliced_w2
    optimal_fraction_plain: float
    optimal_fraction_se: float
    distance_floor_eval: float | None = None  # distance of exact p* samples to p* at eval_n (gaussian tasks)
    distance_floor_final: float | None = None  # the same at final_n
    seconds: float = 0.0

    @property
    def improvement(self) -> float:
        """J* - E_pre[r], the denominator of every fraction closed."""
        return self.reference["J_star"] - self.reference["E_pre_r"]


@dataclass
class RobustnessResult:
    task: str
    solvers: list[tuple[str, int]]
    base: tuple[str, int]
    n: int
    optimal: list[SolverGain]  # the exact optimal control a*
    variants: dict[str, list[SolverGain]]


@dataclass
class CostCell:
    """Seconds and memory per update of one (variant, d, K); `error` says why a cell has no figures."""

    variant: str
    algorithm: str
    dim: int
    steps: int
    seconds_per_update: float | None = None
    seconds: list[float] | None = None
    cpu_seconds_per_update: float | None = None
    rss_setup_mb: float | None = None
    peak_rss_mb: float | None = None
    peak_increase_mb: float | None = None
    peak_reset: bool | None = None
    error: str | None = None


@dataclass
class BenchResults:
    format: str
    command: str
    date: str
    machine: dict  # experiments.common.machine_info, plus load_average_end
    config: BenchConfig
    variants: dict[str, Variant]
    references: dict[str, ReferenceResult] = dataclasses.field(default_factory=dict)
    optimality: list[RunResult] | None = None
    robustness: RobustnessResult | None = None
    cost: list[CostCell] | None = None
    wall_seconds: float = 0.0

    def runs_of(self, task: str) -> list[RunResult]:
        return [r for r in self.optimality or [] if r.task == task]

    @property
    def tasks(self) -> list[str]:
        """Tasks with optimality runs, in the order of the runs."""
        return list(dict.fromkeys(r.task for r in self.optimality or []))

    def to_json(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> BenchResults:
        if data.get("format") != FORMAT:
            raise ValueError(f"expected results of format {FORMAT!r}, found {data.get('format')!r}")
        return build(cls, data)


def jsonable(value):
    """Tensors to lists, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if torch.is_tensor(value):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def build(kind, value):
    """`value` (parsed JSON) as an instance of the annotation `kind`: dataclasses, lists, tuples, dicts, Optional."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return build(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{k: build(hints[k], v) for k, v in value.items()})
    if origin is list:
        return [build(args[0], v) for v in value]
    if origin is tuple:
        return tuple(build(a, v) for a, v in zip(args, value))
    if origin is dict:
        return {k: build(args[1], v) for k, v in value.items()}
    return value
