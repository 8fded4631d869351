"""`mixture`: Gaussian-mixture data (2-D by default), quadratic reward, exact p* sampler (Eq. E22).

J* has no closed form here; it is a Monte-Carlo average over X_0 of an exact integrand
(beta_KL log phi(0, X_0)), reported with its standard error. Moments of p* come from exact samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scoreaction.tasks.base import PointTaskConfig, QuadraticTiltTask
from scoreaction.tasks.gaussian import as_matrix, as_vector, check_psd

REFERENCE_N = 200_000


@dataclass
class MixtureConfig(PointTaskConfig):
    name: str = "mixture"
    weights: list = field(default_factory=lambda: [0.4, 0.4, 0.2])
    means: list = field(default_factory=lambda: [[-1.5, 0.0], [1.5, 0.0], [0.0, 1.5]])
    covs: list | float = field(default_factory=lambda: [0.15, 0.15, [[0.1, 0.05], [0.05, 0.1]]])
    reward_matrix: float | list = 1.0
    target: float | list = field(default_factory=lambda: [1.0, 1.0])


class MixtureTask(QuadraticTiltTask):
    name = "mixture"

    def __init__(self, config: MixtureConfig | None = None):
        config = config or MixtureConfig()
        means = torch.as_tensor(config.means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be a list of points (J, d), found shape {tuple(means.shape)}")
        n_comp, d = means.shape
        weights = as_vector(config.weights, n_comp, "weights")
        covs = config.covs if isinstance(config.covs, list) else [config.covs] * n_comp
        if len(covs) != n_comp:
            raise ValueError(f"covs must list {n_comp} covariances (one per mean), found {len(covs)}")
        covs = torch.stack([as_matrix(c, d, f"covs[{j}]") for j, c in enumerate(covs)])
        A = as_matrix(config.reward_matrix, d, "reward_matrix")
        check_psd(A, "reward_matrix")
        super().__init__(config, weights, means, covs, A, as_vector(config.target, d, "target"))

    def compute_reference(self, n: int | None = None, seed: int = 0) -> dict:
        """J* (Monte Carlo, exact integrand), E_pre[r] and the moments of p_pre and p* from n exact samples
        (default 200,000)."""
        self.require_tilt()
        n = REFERENCE_N if n is None else n
        gen = torch.Generator().manual_seed(seed)
        j_star, j_se = self.j_star_mc(n, seed)
        pre, star = self.sample_pre(n, generator=gen), self.sample_optimal(n, generator=gen)
        r_pre, r_star = self.reward(pre), self.reward(star)
        return {"task": self.name, "dim": self.shape[0], "beta_kl": self.beta_kl, "n_mc": n,
                "J_star": j_star, "J_star_se": j_se,
                "E_pre_r": float(r_pre.mean()), "E_pre_r_se": float(r_pre.std() / n**0.5),
                "E_star_r": float(r_star.mean()), "KL_star": (float(r_star.mean()) - j_star) / self.beta_kl,
                "p_pre_mean": pre.mean(0).tolist(), "p_pre_cov": torch.cov(pre.T).tolist(),
                "p_star_mean": star.mean(0).tolist(), "p_star_cov": torch.cov(star.T).tolist()}
