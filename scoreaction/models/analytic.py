"""Exact scores of Gaussian and Gaussian-mixture data under any Gaussian path (Eqs. E1, E22).

Clock: DIFFUSION time s. For data sum_j w_j N(m_j, S_j), the marginal at s is
sum_j w_j N(alpha m_j, alpha^2 S_j + sigma^2 I), whose score is the responsibility-weighted sum
of the component scores -Sigma_j^{-1} (x - alpha m_j). Each S_j is diagonalised once
(S_j = U_j diag(lam_j) U_j^T), so Sigma_j^{-1} at any s costs one matrix product.
"""

from __future__ import annotations

import math

import torch

from scoreaction.paths import GaussianPath, as_time


def check_covariance(cov: torch.Tensor, name: str = "covariance") -> None:
    """Raise ValueError unless `cov` is a symmetric positive-definite (..., d, d) matrix."""
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be a square (d, d) matrix, found shape {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-10, rtol=1e-8):
        raise ValueError(f"{name} must be symmetric, found an asymmetric matrix")
    lam_min = float(torch.linalg.eigvalsh(cov).min())
    if not lam_min > 0:
        raise ValueError(f"{name} must be positive definite, found smallest eigenvalue {lam_min:.3g}")


class MixtureScore:
    """Exact score of sum_j w_j N(m_j, S_j) pushed through `path`; weights are normalised."""

    def __init__(self, path: GaussianPath, weights, means, covs):
        self.path = path
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        m = torch.as_tensor(means, dtype=torch.float64)
        S = torch.as_tensor(covs, dtype=torch.float64)
        if m.ndim != 2 or m.shape[0] != w.shape[0]:
            raise ValueError(f"means must have shape ({w.shape[0]}, d) for {w.shape[0]} weights, found {tuple(m.shape)}")
        d = m.shape[1]
        if S.shape != (w.shape[0], d, d):
            raise ValueError(f"covs must have shape ({w.shape[0]}, {d}, {d}), found {tuple(S.shape)}")
        if not torch.all(w > 0):
            raise ValueError(f"mixture weights must be positive, found {w.tolist()}")
        for j in range(len(w)):
            check_covariance(S[j], f"covariance of component {j}")
        self.dim = d
        self.weights, self.means, self.covs = w / w.sum(), m, S
        self.lam, self.U = torch.linalg.eigh(S)  # (J, d), (J, d, d)

    def _components(self, s, x: torch.Tensor):
        """Per-component log N(x; alpha m_j, Sigma_j) and score, shapes (B, J) and (B, J, d)."""
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, ...) with {self.dim} values per sample, found {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], 1, self.dim)
        s = as_time(s)
        a = self.path.alpha(s).to(x.dtype)
        sig2 = self.path.sigma2(s).to(x.dtype)
        if s.ndim == 1:
            a, sig2 = a.reshape(-1, 1, 1), sig2.reshape(-1, 1, 1)
        m, lam, U = (t.to(x.dtype) for t in (self.means, self.lam, self.U))
        z = torch.einsum("bjd,jde->bje", xf - a * m, U)
        var = a**2 * lam + sig2
        log_n = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1).expand(z.shape[:2])
                        + self.dim * math.log(2 * math.pi))
        grad = -torch.einsum("bje,jde->bjd", z / var, U)
        return log_n, grad

    def log_density(self, s, x: torch.Tensor) -> torch.Tensor:
        """log p_s(x), shape (B,)."""
        log_n, _ = self._components(s, x)
        return torch.logsumexp(torch.log(self.weights.to(x.dtype)) + log_n, dim=-1)

    def __call__(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        log_n, grad = self._components(s, x)
        resp = torch.softmax(torch.log(self.weights.to(x.dtype)) + log_n, dim=-1)
        return (resp.unsqueeze(-1) * grad).sum(1).reshape(x.shape)

    def sample_data(self, n: int, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Exact draws from the data distribution (s = 0), shape (n, d)."""
        j = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        L = torch.linalg.cholesky(self.covs)
        return (self.means[j] + torch.einsum("nde,ne->nd", L[j], z)).to(dtype)


class GaussianScore(MixtureScore):
    """Exact score of N(mean, cov) pushed through `path`: -(alpha^2 S + sigma^2 I)^{-1} (x - alpha m)."""

    def __init__(self, path: GaussianPath, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        super().__init__(path, [1.0], mean, cov.unsqueeze(0))
