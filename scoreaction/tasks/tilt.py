"""Exact optimal control for Gaussian-mixture data and a quadratic reward (Eqs. E8, E21, E22).

Clock: DIFFUSION time s (RL time t = T - s).

Data p_0 = sum_j w_j N(m_j, S_j), reward r(x) = -1/2 (x - y)^T A (x - y), B = A / beta_KL.
Given X at diffusion time s, the data posterior is a mixture with
    weights   pi_j(x) = w_j N(x; alpha m_j, alpha^2 S_j + sigma^2 I) / p_s(x),
    means     mu_j(x) = m_j + K_j (x - alpha m_j),   K_j = alpha S_j (alpha^2 S_j + sigma^2 I)^{-1},
    covs      C_j = S_j - alpha K_j S_j.
Tilting component j by exp(r / beta_KL) multiplies it by
    Z_j(x) = det(M_j)^{-1/2} exp(-1/2 (mu_j - y)^T Q_j (mu_j - y)),   M_j = I + C_j B,  Q_j = B M_j^{-1},
and turns it into N(M_j^{-1}(mu_j + C_j B y), M_j^{-1} C_j) (forms that need no inverse of C_j,
which is singular at s = 0). Hence phi(s, x) = sum_j pi_j(x) Z_j(x) (Eq. E8), the optimal action
a* = s_pre + grad_x log phi, and exact samples of p* and p_pre from draws of X_0 from the prior.
"""

from __future__ import annotations

import torch

from scoreaction.models.analytic import MixtureScore


def data_posterior(model: MixtureScore, s: float, x: torch.Tensor):
    """Posterior of the data given X at diffusion time s: (log pi (B, J), mu (B, J, d), C (J, d, d))."""
    log_n, _ = model._components(s, x)
    log_pi = torch.log_softmax(torch.log(model.weights.to(x)) + log_n, dim=-1)
    a, sig2 = float(model.path.alpha(s)), float(model.path.sigma2(s))
    lam, U, m = (t.to(x) for t in (model.lam, model.U, model.means))
    k, c = a * lam / (a**2 * lam + sig2), lam * sig2 / (a**2 * lam + sig2)  # eigenvalues of K_j, C_j
    xf = x.reshape(x.shape[0], 1, -1)
    z = torch.einsum("bjd,jde->bje", xf - a * m, U)
    mu = m + torch.einsum("jde,bje->bjd", U, k * z)
    C = torch.einsum("jde,je,jfe->jdf", U, c, U)
    return log_pi, mu, C


def tilt(C: torch.Tensor, mu: torch.Tensor, B: torch.Tensor, y: torch.Tensor):
    """Tilt N(mu_j, C_j) by exp(-1/2 (x - y)^T B (x - y)): (log Z (B, J), mean (B, J, d), cov (J, d, d))."""
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    M = eye + C @ B
    Q = torch.linalg.solve(M.transpose(-1, -2), B)  # = B M^{-1} (symmetric)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    diff = mu - y
    log_z = -0.5 * torch.linalg.slogdet(M)[1] - 0.5 * torch.einsum("bjd,jde,bje->bj", diff, Q, diff)
    mean = torch.linalg.solve(M, (mu + (C @ B @ y)).unsqueeze(-1)).squeeze(-1)
    cov = torch.linalg.solve(M, C)
    return log_z, mean, 0.5 * (cov + cov.transpose(-1, -2))


def log_phi(model: MixtureScore, A: torch.Tensor, y: torch.Tensor, beta_kl: float, s: float,
            x: torch.Tensor) -> torch.Tensor:
    """log phi(s, x) = log E^pre[exp(r(X_data) / beta_KL) | X_s = x] (Eq. E8), shape (B,)."""
    log_pi, mu, C = data_posterior(model, s, x)
    log_z, _, _ = tilt(C, mu, A.to(x) / beta_kl, y.to(x))
    return torch.logsumexp(log_pi + log_z, dim=-1)


def sample_posterior(model: MixtureScore, s: float, x: torch.Tensor, *, A: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, beta_kl: float | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of the data given X_s = x, from the pretrained posterior or (with A, y, beta_kl) its tilt."""
    log_w, mean, C = data_posterior(model, s, x)
    if A is not None:
        log_z, mean, C = tilt(C, mean, A.to(x) / beta_kl, y.to(x))
        log_w = log_w + log_z
    j = torch.multinomial(torch.softmax(log_w, -1), 1, generator=generator).squeeze(-1)
    L = torch.linalg.cholesky(C + 1e-12 * torch.eye(C.shape[-1], dtype=C.dtype))
    z = torch.randn(mean.shape[0], mean.shape[-1], generator=generator, dtype=x.dtype)
    return mean[torch.arange(len(j)), j] + torch.einsum("nde,ne->nd", L[j], z)
