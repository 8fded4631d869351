"""Evaluation of a policy under any solver: reward gain over the pretrained model, J, distance to p*.

Clock: RL-time grids. Both models start from the same prior draws (and, for stochastic solvers, the
same noise), so the gain is a paired difference with a small standard error.
"""

from __future__ import annotations

import math

import torch

from scoreaction.metrics import fit_gaussian, gaussian_kl, sliced_wasserstein
from scoreaction.policy import ScoreAsAction
from scoreaction.samplers import get_solver


@torch.no_grad()
def sample_with(policy: ScoreAsAction, task, solver: str, steps: int, n: int, seed: int, *, grid: str = "uniform",
                eta: float | None = None, pretrained: bool = False, dtype=torch.float32):
    """Terminal samples and rewards of the policy (or of the pretrained model) under a solver."""
    sol = get_solver(solver)
    eta = sol.default_eta if eta is None else eta
    gen = torch.Generator().manual_seed(seed)
    x0, cond = task.start(n, generator=gen, dtype=dtype)
    device = getattr(task, "device", torch.device("cpu"))
    x0, cond = x0.to(device), None if cond is None else cond.to(device)
    ts = task.grid(grid, steps, generator=gen)
    score = task.pretrained if pretrained else policy.score
    x = sol.sample(task.path, score, x0, ts, cond=cond, eta=eta, generator=gen)
    return x, task.reward(x, cond)


def solver_gain(policy: ScoreAsAction, task, solver: str, steps: int, n: int = 4096, seed: int = 0, **kw) -> dict:
    """Mean reward of policy and pretrained model under one solver and grid, and the paired gain."""
    _, r_pol = sample_with(policy, task, solver, steps, n, seed, **kw)
    _, r_pre = sample_with(policy, task, solver, steps, n, seed, pretrained=True, **kw)
    diff = (r_pol - r_pre).double()
    return {"solver": solver, "steps": steps, "reward": float(r_pol.mean()), "reward_pretrained": float(r_pre.mean()),
            "gain": float(diff.mean()), "gain_se": float(diff.std() / math.sqrt(n))}


@torch.no_grad()
def objective(policy: ScoreAsAction, task, steps: int = 200, n: int = 4096, seed: int = 0, dtype=torch.float32,
              device: str | torch.device = "cpu") -> dict:
    """J(theta) = E[r(X_T)] - beta_KL KL (Eq. E5) by rollouts of the policy's kernel on the task's uniform grid,
    with the fraction of the achievable improvement closed and distances to p* where the task knows them."""
    gen = torch.Generator().manual_seed(seed)
    x0, cond = task.start(n, generator=gen, dtype=dtype)
    x0, cond = x0.to(device), None if cond is None else cond.to(device)
    traj = policy.rollout(x0, task.grid("uniform", steps), cond, generator=gen)
    r = task.reward(traj.x_final, cond)
    J = r - task.beta_kl * traj.path_kl
    out = {"reward": float(r.mean()), "path_kl": float(traj.path_kl.mean()), "J": float(J.mean()),
           "J_se": float(J.std() / math.sqrt(n))}
    ref = task.reference()
    if ref is not None:
        out["fraction"] = (out["J"] - ref["E_pre_r"]) / (ref["J_star"] - ref["E_pre_r"])
        if task.name == "gaussian":
            mean, cov = fit_gaussian(traj.x_final)
            out["gaussian_kl"] = gaussian_kl(mean, cov, ref["p_star_mean"], ref["p_star_cov"])
        elif task.exact:
            exact = task.sample_optimal(n, generator=torch.Generator().manual_seed(seed + 1))
            floor = task.sample_optimal(n, generator=torch.Generator().manual_seed(seed + 2))
            out["sliced_w2"] = sliced_wasserstein(traj.x_final, exact, seed=seed)
            out["sliced_w2_floor"] = sliced_wasserstein(floor, exact, seed=seed)
    return out
