"""The controlled reverse-time SDE of Eq. E3, whose action is a score, and its Gaussian steps.

Clock: RL time t (t = 0 noise, t = T data); the path's coefficients take diffusion time s = T - t.

    dX_t = [ -f(T-t, X_t) + (1 + eta^2)/2 g(T-t)^2 a_t ] dt + eta g(T-t) dB_t,    a_t a score   (E3)

eta = 1 is the reverse SDE, eta = 0 the probability-flow ODE. One Euler step of E3 is the Gaussian
transition of Eq. E4, whose std is `transition_std`; the KL between two such transitions that differ
only in their action is kappa(t) ||a - a'||^2 dt (Eq. E6). Samplers and the policy build on these
functions; no solver imports another.

Two Gaussian transition kernels discretise E3 on a grid; both have the form

    X_{k+1} = a_k X_k + b_k mu_k + std_k z_k,      z_k ~ N(0, I),    mu_k the action (a score),

so the policy's log-prob, its KL to the pretrained transition, ||b_k (mu_k - s_pre) / std_k||^2 / 2
(Eq. E6 in discrete form), and its ratios are the same code for both (`step_coefficients`):

    em    one Euler-Maruyama step of E3 (Eq. E4): a = 1 - (d log alpha / ds) dt, b = (1 + eta^2)/2 g^2 dt,
          std = eta g sqrt(dt). To first order in dt its KL is kappa(t) ||mu - s_pre||^2 dt (Eq. E6).
    ddim  the DDIM(eta) kernel of diffusers' DDIMScheduler.step (and of DDPO, TRL and the papers' code):
          x0_hat, eps_hat from mu at s0 (Eq. E2) moved along the path to s1 (`exponential_step`), i.e.
          a = alpha1 / alpha0, b = alpha1 sigma0^2 / alpha0 - sqrt(sigma1^2 - c^2) sigma0, std = c,
          c^2 = eta^2 sigma1^2 (1 - exp(-2 (lambda1 - lambda0))), DDIM's sigma_t(eta)^2.

With eta = 0 (ODE rollouts) both use std = b sigma_a: explicit Gaussian action noise mu + sigma_a xi.
"""

from __future__ import annotations

import math

import torch

from scoreaction.paths import GaussianPath, Time, as_time, coef_like


def drift(path: GaussianPath, s, x: torch.Tensor, score: torch.Tensor, eta: float) -> torch.Tensor:
    """RL-time drift of Eq. E3 at diffusion time s: -f(s, x) + (1 + eta^2)/2 g(s)^2 score."""
    return -path.f(s, x) + 0.5 * (1.0 + eta**2) * coef_like(path.g2(s), x) * score


def transition_std(path: GaussianPath, t0: Time, t1: Time, eta: float, action_noise: float = 0.0) -> torch.Tensor:
    """Std of the Euler step of E3 from RL time t0 to t1 (Eq. E4): eta g(T - t0) sqrt(dt) for eta > 0 (the
    Brownian increment is the exploration), 1/2 g(T - t0)^2 dt sigma_a for eta = 0 (explicit action noise)."""
    t0, t1 = as_time(t0), as_time(t1)
    s0, dt = path.T - t0, t1 - t0
    if eta > 0:
        return eta * path.g(s0) * torch.sqrt(dt)
    return 0.5 * path.g2(s0) * dt * action_noise


def kappa(path: GaussianPath, t: Time, eta: float) -> torch.Tensor:
    """kappa(t) = (1 + eta^2)^2 / (8 eta^2) g(T - t)^2 of Eq. E6 (RL time t; eta > 0 only)."""
    return (1 + eta**2) ** 2 / (8 * eta**2) * path.g2(path.T - as_time(t))


KERNELS = ("em", "ddim")


def step_coefficients(path: GaussianPath, t0: Time, t1: Time, eta: float, action_noise: float = 0.0,
                      kernel: str = "em") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, std) of the Gaussian transition X_{k+1} ~ N(a X_k + b mu, std^2 I) from RL time t0 to t1 (see
    the module docstring); float64 tensors, scalars or one per sample."""
    t0, t1 = as_time(t0), as_time(t1)
    s0, s1, dt = path.T - t0, path.T - t1, t1 - t0
    if kernel == "em":
        a = 1.0 - path.dlog_alpha(s0) * dt
        b = 0.5 * (1.0 + eta**2) * path.g2(s0) * dt
        std = eta * path.g(s0) * torch.sqrt(dt) if eta > 0 else b * action_noise
    elif kernel == "ddim":
        a0, sg0, a1, sg1 = path.alpha(s0), path.sigma(s0), path.alpha(s1), path.sigma(s1)
        c2 = torch.zeros_like(sg1)
        if eta > 0:
            c2 = eta**2 * path.sigma2(s1) * -torch.expm1(-2.0 * (path.log_snr(s1) - path.log_snr(s0)))
            c2 = torch.nan_to_num(c2, nan=0.0)  # s1 = 0: no noise is left to add
        a = a1 / a0
        b = a1 * sg0**2 / a0 - torch.sqrt(torch.clamp(sg1**2 - c2, min=0.0)) * sg0
        std = torch.sqrt(c2) if eta > 0 else b * action_noise
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, found {kernel!r}")
    return a, b, std


def exponential_step(path: GaussianPath, s0: float, s1: float, x: torch.Tensor, score: torch.Tensor,
                     eta: float = 0.0, z: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM-type exponential-integrator step from diffusion time s0 to s1 < s0 (Song, Meng & Ermon 2021).

    The predicted (x0_hat, eps_hat) at s0 (Eq. E2) are frozen and x moves along the Gaussian path:

        x1 = alpha(s1) x0_hat + sqrt(sigma(s1)^2 - c^2) eps_hat + c z,
        c^2 = eta^2 sigma(s1)^2 (1 - exp(-2 h)),   h = lambda(s1) - lambda(s0),

    i.e. DDIM's sigma_t(eta); c^2 is the forward posterior variance times eta^2, which to first order is
    eta^2 g^2 dt, so eta is the eta of Eq. E3 (0: deterministic DDIM; 1: DDPM ancestral)."""
    eps_hat = path.from_score("eps", score, s0, x)
    x0_hat = path.from_score("x0", score, s0, x)
    a1, sg1 = float(path.alpha(s1)), float(path.sigma(s1))
    c = 0.0
    if eta > 0 and sg1 > 0:
        h = float(path.log_snr(s1) - path.log_snr(s0))
        c = eta * sg1 * math.sqrt(-math.expm1(-2.0 * h))
    x1 = a1 * x0_hat + math.sqrt(max(sg1**2 - c**2, 0.0)) * eps_hat
    return x1 + c * z if c > 0 else x1
