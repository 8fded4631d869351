"""Time grids for sampling and rollouts.

Clock: every grid is in RL time, a float64 tensor t_0 = 0 < t_1 < ... < t_K = T (t = T - s, so
t_0 is pure noise and t_K the finished sample). Grids are separate from solvers: any solver and any
rollout takes any grid, and a continuous-time method may draw a fresh `random` grid per batch.
"""

from __future__ import annotations

import torch

from scoreaction.paths import GaussianPath


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, found {steps!r}")


def uniform(path: GaussianPath, steps: int) -> torch.Tensor:
    """Equal steps in t."""
    _check_steps(steps)
    return torch.linspace(0.0, path.T, steps + 1, dtype=torch.float64)


def quadratic(path: GaussianPath, steps: int) -> torch.Tensor:
    """DDIM's quadratic spacing: s_k = T (1 - k/K)^2, so steps shrink towards the data."""
    _check_steps(steps)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return path.T * (1.0 - (1.0 - u) ** 2)


def edm(path: GaussianPath, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): noise ratio r = sigma/alpha spaced uniformly in r^(1/rho)."""
    _check_steps(steps)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, found {rho}")
    r_max, r_min = float(path.noise_ratio(path.T)), float(path.noise_ratio(0.0))
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    r = (r_max ** (1 / rho) + u * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
    s = torch.tensor([path.s_from_noise_ratio(float(v)) for v in r], dtype=torch.float64)
    s[0], s[-1] = path.T, 0.0
    return path.T - s


def random(path: GaussianPath, steps: int, generator: torch.Generator | None = None,
           jitter: float = 1.0) -> torch.Tensor:
    """A fresh stratified grid: interior t_k = T (k + jitter (u_k - 1/2)) / K, u_k ~ U(0, 1)."""
    _check_steps(steps)
    if not 0.0 <= jitter < 1.0 + 1e-12:
        raise ValueError(f"jitter must lie in [0, 1], found {jitter}")
    k = torch.arange(steps + 1, dtype=torch.float64)
    u = torch.rand(steps + 1, generator=generator, dtype=torch.float64) - 0.5
    u[0] = u[-1] = 0.0
    return path.T * (k + jitter * u) / steps


GRIDS = {"uniform": uniform, "quadratic": quadratic, "edm": edm, "random": random}


def make_grid(name: str, path: GaussianPath, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grid by name; only `random` uses the generator."""
    if name not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, found {name!r}")
    if name == "random":
        return random(path, steps, generator)
    return GRIDS[name](path, steps)


def check_grid(path: GaussianPath, ts: torch.Tensor) -> torch.Tensor:
    """Validate an RL-time grid: 1-D, strictly increasing, inside [0, T]."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"time grid must be 1-D with at least 2 points, found shape {tuple(ts.shape)}")
    if not torch.all(ts[1:] > ts[:-1]):
        raise ValueError("time grid must be strictly increasing in RL time t")
    if ts[0] < -1e-12 or ts[-1] > path.T + 1e-12:
        raise ValueError(f"time grid must lie in [0, T={path.T}], found [{float(ts[0])}, {float(ts[-1])}]")
    return ts
