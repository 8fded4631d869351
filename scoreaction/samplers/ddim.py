"""DDIM-type exponential integrator (Song, Meng & Ermon 2021), for any Gaussian path.

Clock: RL time t on the grid, diffusion time s = T - t inside.
Each step freezes the predicted (x0_hat, eps_hat) at s0 and moves along the Gaussian path
(`sde.exponential_step`); eta is the eta of Eq. E3 (0: deterministic DDIM; 1: DDPM ancestral).
"""

from __future__ import annotations

import torch

from scoreaction.samplers.grids import check_grid
from scoreaction.samplers.noise import gaussian_noise
from scoreaction.sde import exponential_step

ORDER = 1
STOCHASTIC = True


def sample(path, score, x, ts, *, cond=None, eta: float = 0.0, generator=None, noise_sampler=None,
           callback=None) -> torch.Tensor:
    """Notation: s0, s1 = T - t0, T - t1; a = score(s0, x, cond); (x0_hat, eps_hat) from a (Eq. E2)."""
    ts = check_grid(path, ts)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim needs 0 <= eta <= 1 (eta > 1 exceeds the posterior variance), found {eta}")
    noise_sampler = noise_sampler or gaussian_noise(x, generator)
    for k in range(len(ts) - 1):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        s0, s1 = path.T - t0, path.T - t1
        a = score(s0, x, cond)
        if callback is not None:
            callback({"k": k, "t": t0, "s": s0, "x": x, "score": a})
        z = noise_sampler(t0, t1).to(x) if eta > 0 else None
        x = exponential_step(path, s0, s1, x, a, eta, z)
    return x
