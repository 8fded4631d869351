"""DPM-Solver++(2S) (Lu et al. 2022), singlestep, data prediction, midpoint r = 1/2 in log-SNR.

Clock: RL time t on the grid, diffusion time s = T - t inside; lambda(s) = log(alpha/sigma).

    h = lambda(s1) - lambda(s0);  s_m = lambda^{-1}(lambda(s0) + h/2)
    u  = sigma(s_m)/sigma(s0) x - alpha(s_m) expm1(-h/2) x0_hat(s0, x)
    x1 = sigma(s1)/sigma(s0) x - alpha(s1) expm1(-h)   x0_hat(s_m, u)

A step that ends where sigma = 0 (lambda = inf) is first order (DDIM), as the reference code's
`lower_order_final`.

ORDER = 2 is the order in the log-SNR step h. Use it with grid `logsnr` (uniform in lambda, as the
reference code): on a grid uniform in t that ends at s = 0, the last log-SNR increments near the
data are 1/2 log((k+1)/k), which do not shrink with dt, and the final first-order step costs
O(sigma(s_{K-1})^2); the observed order there is about 1.6, tending to 1 (measured in the tests).
"""

from __future__ import annotations

import math

from scoreaction.samplers.grids import check_grid
from scoreaction.sde import exponential_step

ORDER = 2
STOCHASTIC = False


def sample(path, score, x, ts, *, cond=None, eta: float = 0.0, generator=None, noise_sampler=None,
           callback=None):
    ts = check_grid(path, ts)
    if eta != 0:
        raise ValueError(f"dpm2 integrates the probability-flow ODE and needs eta = 0, found eta = {eta}")
    for k in range(len(ts) - 1):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        s0, s1 = path.T - t0, path.T - t1
        a = score(s0, x, cond)
        if callback is not None:
            callback({"k": k, "t": t0, "s": s0, "x": x, "score": a})
        if float(path.sigma(s1)) == 0.0:
            x = exponential_step(path, s0, s1, x, a)
            continue
        lam0, lam1 = float(path.log_snr(s0)), float(path.log_snr(s1))
        h = lam1 - lam0
        sm = path.s_from_log_snr(lam0 + 0.5 * h)
        sg0, sgm, sg1 = (float(path.sigma(v)) for v in (s0, sm, s1))
        x0_0 = path.from_score("x0", a, s0, x)
        u = (sgm / sg0) * x - float(path.alpha(sm)) * math.expm1(-0.5 * h) * x0_0
        x0_m = path.from_score("x0", score(sm, u, cond), sm, u)
        x = (sg1 / sg0) * x - float(path.alpha(s1)) * math.expm1(-h) * x0_m
    return x
