"""Heun's method (explicit trapezoid, 2nd order) on the probability-flow ODE (Eq. E3 with eta = 0).

Clock: RL time t on the grid, diffusion time s = T - t inside.

    v(t, x) = -f(T-t, x) + 1/2 g(T-t)^2 score(T-t, x, c)
    x_pred = x + v(t0, x) dt;   x1 = x + (v(t0, x) + v(t1, x_pred)) dt / 2

The last step into s = 0 is an Euler step, so no score is evaluated at s = 0 (where an eps- or
x0-predicting network divides by sigma = 0); this keeps the global order 2.
"""

from __future__ import annotations

from scoreaction.samplers.grids import check_grid
from scoreaction.sde import drift

ORDER = 2
STOCHASTIC = False


def sample(path, score, x, ts, *, cond=None, eta: float = 0.0, generator=None, noise_sampler=None,
           callback=None):
    ts = check_grid(path, ts)
    if eta != 0:
        raise ValueError(f"heun integrates the probability-flow ODE and needs eta = 0, found eta = {eta}")
    for k in range(len(ts) - 1):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        dt, s0, s1 = t1 - t0, path.T - t0, path.T - t1
        a = score(s0, x, cond)
        if callback is not None:
            callback({"k": k, "t": t0, "s": s0, "x": x, "score": a})
        v0 = drift(path, s0, x, a, 0.0)
        x_pred = x + v0 * dt
        if s1 <= 1e-12:
            x = x_pred
        else:
            v1 = drift(path, s1, x_pred, score(s1, x_pred, cond), 0.0)
            x = x + 0.5 * (v0 + v1) * dt
    return x
