"""Euler-Maruyama for the score-as-action SDE family (Eq. E3), any eta >= 0.

Clock: RL time t on the grid, diffusion time s = T - t inside.

    dX_t = [ -f(T-t, X_t) + (1 + eta^2)/2 g(T-t)^2 a_t ] dt + eta g(T-t) dB_t,   a_t = score(T-t, X_t, c)

eta = 1 is the reverse SDE, eta = 0 the probability-flow ODE (Euler). The noise is additive (g
depends on t only), so the strong order is 1.
"""

from __future__ import annotations

import torch

from scoreaction.samplers.grids import check_grid
from scoreaction.samplers.noise import gaussian_noise
from scoreaction.sde import drift

ORDER = 1
STOCHASTIC = True


def sample(path, score, x, ts, *, cond=None, eta: float = 1.0, generator=None, noise_sampler=None,
           callback=None) -> torch.Tensor:
    """Integrate Eq. E3 from x (at ts[0]) to ts[-1].

    Notation: t0, t1 RL times of the step; dt = t1 - t0; s0 = T - t0; a = score(s0, x, cond);
    x_next = x + drift dt + eta g(s0) sqrt(dt) z.
    """
    ts = check_grid(path, ts)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, found {eta}")
    noise_sampler = noise_sampler or gaussian_noise(x, generator)
    for k in range(len(ts) - 1):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        dt, s0 = t1 - t0, path.T - t0
        a = score(s0, x, cond)
        if callback is not None:
            callback({"k": k, "t": t0, "s": s0, "x": x, "score": a})
        x = x + drift(path, s0, x, a, eta) * dt
        if eta > 0:
            x = x + eta * float(path.g(s0)) * dt**0.5 * noise_sampler(t0, t1).to(x)
    return x
