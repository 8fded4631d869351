"""Distances between sample sets and exact laws, used by the CLI, the tests and the benchmarks."""

from __future__ import annotations

import math

import torch


def gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL( N(mean0, cov0) || N(mean1, cov1) ) in closed form (float64)."""
    m0, m1 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean0, mean1))
    S0, S1 = (torch.as_tensor(v, dtype=torch.float64) for v in (cov0, cov1))
    d = m0.shape[0]
    L1 = torch.linalg.cholesky(S1)
    diff = (m1 - m0).unsqueeze(-1)
    trace = torch.cholesky_solve(S0, L1).diagonal().sum()
    maha = (diff.T @ torch.cholesky_solve(diff, L1)).squeeze()
    logdet = 2 * torch.log(L1.diagonal()).sum() - torch.linalg.slogdet(S0)[1]
    return float(0.5 * (trace + maha - d + logdet))


def fit_gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and covariance of (n, d) samples, float64."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x.mean(0), torch.atleast_2d(torch.cov(x.T))


def mean_and_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.to(torch.float64)
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets (n, d), by sorting projections."""
    x, y = (v.reshape(v.shape[0], -1).to(torch.float64) for v in (x, y))
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs sample sets of equal shape, found {tuple(x.shape)} and {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return float(torch.sqrt(((px - py) ** 2).mean()))
