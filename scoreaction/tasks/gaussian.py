"""`gaussian`: data N(m, S) in any dimension, quadratic reward, and the closed forms of Eq. E21.

Clock: references are about the terminal law (RL time T). The prior is N(0, p^2 I) with p the path's
prior std (p = 1 for VP, as in E21); the formulas below carry p so that any path family works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoreaction.config import check_size, memory_bytes
from scoreaction.tasks.base import PointTaskConfig, QuadraticTiltTask


def as_vector(value, dim: int, name: str) -> torch.Tensor:
    """A scalar (broadcast) or a list of `dim` numbers."""
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.ndim == 0:
        return v.expand(dim).clone()
    if v.shape != (dim,):
        raise ValueError(f"{name} must be a number or a list of {dim} numbers, found shape {tuple(v.shape)}")
    return v


def as_matrix(value, dim: int, name: str) -> torch.Tensor:
    """A scalar c (c I), a list of `dim` numbers (diagonal) or a (dim, dim) matrix."""
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.ndim == 0:
        return float(v) * torch.eye(dim, dtype=torch.float64)
    if v.shape == (dim,):
        return torch.diag(v)
    if v.shape != (dim, dim):
        raise ValueError(f"{name} must be a number, {dim} numbers or a ({dim}, {dim}) matrix, found shape {tuple(v.shape)}")
    return v


def check_psd(A: torch.Tensor, name: str) -> None:
    if not torch.allclose(A, A.T, atol=1e-10, rtol=1e-8):
        raise ValueError(f"{name} must be symmetric, found an asymmetric matrix")
    lam_min = float(torch.linalg.eigvalsh(A).min())
    if lam_min < -1e-10:
        raise ValueError(f"{name} must be positive semi-definite, found smallest eigenvalue {lam_min:.3g}")


def default_cov(dim: int) -> torch.Tensor:
    """S_ij = 0.5 * 0.6^|i - j|: correlated, well conditioned, the same in every dimension."""
    i = torch.arange(dim, dtype=torch.float64)
    return 0.5 * 0.6 ** (i[:, None] - i[None, :]).abs()


@dataclass
class GaussianConfig(PointTaskConfig):
    name: str = "gaussian"
    dim: int = 2
    mean: float | list = 0.0
    cov: float | list | None = None  # None: default_cov(dim)
    reward_matrix: float | list = 1.0
    target: float | list = 1.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, found {self.dim!r}")
        check_size("dim", self.dim, math.isqrt(memory_bytes() // 32),
                   "a few dim x dim float64 matrices must fit in this machine's memory")


class GaussianTask(QuadraticTiltTask):
    name = "gaussian"

    def __init__(self, config: GaussianConfig | None = None):
        config = config or GaussianConfig()
        d = config.dim
        mean = as_vector(config.mean, d, "mean")
        cov = default_cov(d) if config.cov is None else as_matrix(config.cov, d, "cov")
        A = as_matrix(config.reward_matrix, d, "reward_matrix")
        check_psd(A, "reward_matrix")
        super().__init__(config, [1.0], mean[None], cov[None], A, as_vector(config.target, d, "target"))

    def compute_reference(self, n: int | None = None) -> dict:
        """Closed forms of Eq. E21 (n is not needed): J*, E_pre[r], p_pre, p* and E*[r], KL(P* || P^pre)."""
        self.require_tilt()
        m, S = self.pretrained.means[0], self.pretrained.covs[0]
        A, y, beta = self.reward.A, self.reward.y, self.beta_kl
        a, sig2, p2 = float(self.path.alpha(self.path.T)), float(self.path.sigma2(self.path.T)), self.path.prior_std**2
        eye = torch.eye(len(m), dtype=torch.float64)
        K = a * S @ torch.linalg.inv(a**2 * S + sig2 * eye)
        C = S - a * K @ S
        C = 0.5 * (C + C.T)
        KKt = p2 * K @ K.T
        mubar = m - a * K @ m
        B = A / beta
        M = eye + C @ B
        Q = torch.linalg.solve(M.T, B)
        Q = 0.5 * (Q + Q.T)
        quad = lambda v, W: float(v @ W @ v)  # noqa: E731
        j_star = beta * (-0.5 * float(torch.linalg.slogdet(M)[1]) - 0.5 * (quad(mubar - y, Q) + float(torch.trace(Q @ KKt))))
        pre_cov = C + KKt
        e_pre = -0.5 * (quad(mubar - y, A) + float(torch.trace(A @ pre_cov)))
        Minv = torch.linalg.inv(M)
        star_mean = Minv @ (mubar + C @ B @ y)
        star_cov = Minv @ C + Minv @ KKt @ Minv.T
        star_cov = 0.5 * (star_cov + star_cov.T)
        e_star = -0.5 * (quad(star_mean - y, A) + float(torch.trace(A @ star_cov)))
        return {"task": self.name, "dim": len(m), "beta_kl": beta, "J_star": j_star, "E_pre_r": e_pre,
                "E_star_r": e_star, "KL_star": (e_star - j_star) / beta,
                "p_pre_mean": mubar.tolist(), "p_pre_cov": pre_cov.tolist(),
                "p_star_mean": star_mean.tolist(), "p_star_cov": star_cov.tolist()}
