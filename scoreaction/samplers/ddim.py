"""DDIM-type exponential integrator (Song, Meng & Ermon 2021), for any Gaussian path.

Clock: RL time t on the grid, diffusion time s = T - t inside.
Each step freezes the predicted (x0_hat, eps_hat) at s0 and moves along the Gaussian path:

    x1 = alpha(s1) x0_hat + sqrt(sigma(s1)^2 - c^2) eps_hat + c z,
    c^2 = eta^2 sigma(s1)^2 (1 - exp(-2 h)),   h = lambda(s1) - lambda(s0),

i.e. DDIM's sigma_t(eta); c^2 is the forward posterior variance times eta^2, which to first order is
eta^2 g^2 dt, so eta here is the eta of Eq. E3 (0: deterministic DDIM; 1: DDPM ancestral).
"""

from __future__ import annotations

import math

import torch

from scoreaction.samplers.grids import check_grid
from scoreaction.samplers.noise import gaussian_noise

ORDER = 1
STOCHASTIC = True


def step(path, s0: float, s1: float, x: torch.Tensor, score: torch.Tensor, eta: float = 0.0,
         z: torch.Tensor | None = None) -> torch.Tensor:
    """One exponential-integrator step from diffusion time s0 to s1 < s0."""
    eps_hat = path.from_score("eps", score, s0, x)
    x0_hat = path.from_score("x0", score, s0, x)
    a1, sg1 = float(path.alpha(s1)), float(path.sigma(s1))
    c = 0.0
    if eta > 0 and sg1 > 0:
        h = float(path.log_snr(s1) - path.log_snr(s0))
        c = eta * sg1 * math.sqrt(-math.expm1(-2.0 * h))
    x1 = a1 * x0_hat + math.sqrt(max(sg1**2 - c**2, 0.0)) * eps_hat
    return x1 + c * z if c > 0 else x1


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
        x = step(path, s0, s1, x, a, eta, z)
    return x
