"""Samplers for inference, one file each, one signature, each declaring its ORDER.

    sample(path, score, x, ts, *, cond=None, eta=..., generator=None, noise_sampler=None, callback=None)

`score(s, x, cond)` takes DIFFUSION time s; `ts` is an RL-time grid (see grids.py) from the prior
(t = 0) to the data (t = T). Samplers take a score function, never a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from scoreaction.samplers import ddim, dpm_solver, euler_maruyama, heun
from scoreaction.samplers.grids import GRIDS, make_grid
from scoreaction.samplers.noise import BrownianNoise


@dataclass(frozen=True)
class Solver:
    name: str
    sample: Callable
    order: int
    stochastic: bool
    default_eta: float


def _solver(name: str, module: ModuleType, default_eta: float) -> Solver:
    return Solver(name, module.sample, module.ORDER, module.STOCHASTIC, default_eta)


SOLVERS = {
    "em": _solver("em", euler_maruyama, 1.0),
    "ddim": _solver("ddim", ddim, 0.0),
    "heun": _solver("heun", heun, 0.0),
    "dpm2": _solver("dpm2", dpm_solver, 0.0),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, found {name!r}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "Solver", "get_solver", "GRIDS", "make_grid", "BrownianNoise"]
