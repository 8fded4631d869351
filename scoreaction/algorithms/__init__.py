"""Fine-tuning algorithms, one file each, one interface (see base.py). `make_algorithm(name, ...)`."""

from __future__ import annotations

from scoreaction.algorithms.adjoint import AdjointMatching
from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions
from scoreaction.algorithms.ctpg import CTPG
from scoreaction.algorithms.ctrl import CTRL
from scoreaction.algorithms.ddpo import DDPO
from scoreaction.algorithms.dpok import DPOK
from scoreaction.algorithms.draft import DRaFT
from scoreaction.algorithms.grpo import GRPO

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (CTRL, CTPG, DDPO, DPOK, GRPO, DRaFT, AdjointMatching)}


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, found {name!r}")
    return ALGORITHMS[name]


def make_algorithm(name: str, policy, task, options: AlgorithmConfig | dict | None = None) -> Algorithm:
    """An algorithm by name, with its config dataclass or a dict of its options (unknown keys are an error)."""
    cls = algorithm_class(name)
    if not isinstance(options, AlgorithmConfig):
        options = cls.Config.from_dict(dict(options or {}), f"for algorithm {name!r}")
    return cls(policy, task, options)


__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "Batch", "Transitions", "algorithm_class", "make_algorithm"]
