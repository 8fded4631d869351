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


def edm(path: GaussianPath, steps: int, rho: float = 7.0, r_min: float = 2e-3) -> torch.Tensor:
    """Karras et al. (2022): noise ratio r = sigma/alpha spaced uniformly in r^(1/rho) from r(T) down to
    max(r(0), r_min); where the path reaches r = 0 (VP-type) that takes steps - 1 steps and the last
    step goes from r_min to the data, as EDM's sigma_min = 0.002 followed by sigma = 0."""
    _check_steps(steps)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, found {rho}")
    r_max, r_zero = float(path.noise_ratio(path.T)), float(path.noise_ratio(0.0))
    to_zero = r_zero < r_min and steps > 1
    r_end = r_min if to_zero else r_zero
    u = torch.linspace(0.0, 1.0, steps + (0 if to_zero else 1), dtype=torch.float64)
    r = (r_max ** (1 / rho) + u * (r_end ** (1 / rho) - r_max ** (1 / rho))) ** rho
    s = [path.s_from_noise_ratio(float(v)) for v in r] + ([0.0] if to_zero else [])
    s = torch.tensor(s, dtype=torch.float64)
    s[0], s[-1] = path.T, 0.0
    return path.T - s


def logsnr(path: GaussianPath, steps: int, s_min: float = 1e-3, to_zero: bool = True) -> torch.Tensor:
    """DPM-Solver's grid: uniform in lambda = log(alpha/sigma) from s = T down to s = s_min * T. With
    to_zero, the last of the steps goes on from there to the data (s = 0, where lambda is infinite)."""
    _check_steps(steps)
    n = steps - 1 if to_zero and steps > 1 else steps
    lam = torch.linspace(float(path.log_snr(path.T)), float(path.log_snr(s_min * path.T)), n + 1, dtype=torch.float64)
    s = [path.s_from_log_snr(float(v)) for v in lam]
    s[0], s[-1] = path.T, s_min * path.T
    if to_zero:
        s = s + [0.0] if steps > 1 else [path.T, 0.0]
    return path.T - torch.tensor(s, dtype=torch.float64)


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


GRIDS = {"uniform": uniform, "quadratic": quadratic, "edm": edm, "logsnr": logsnr, "random": random}


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
