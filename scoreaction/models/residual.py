"""Trainable networks for points: the residual action mu_theta and the value head h_phi.

Clock: both take DIFFUSION time s (a float, or a tensor of shape (B,)). Images get their own
networks (a UNet) through the same call signatures: `net(s, x, cond)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scoreaction.models import ScoreModel
from scoreaction.models.frozen import attach_frozen
from scoreaction.paths import GaussianPath, as_time, coef_like


def time_features(s: torch.Tensor, n: int, batch: int, like: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Fourier features of s / T: [cos(pi k s/T), sin(pi k s/T)] for k = 1..n/2, shape (batch, n)."""
    s = as_time(s).to(device=like.device, dtype=like.dtype).reshape(-1).expand(batch) / T
    k = torch.arange(1, n // 2 + 1, device=like.device, dtype=like.dtype)
    ang = math.pi * s[:, None] * k
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class MLP(nn.Module):
    """f(s, x, cond) -> (B, out): an MLP on [flattened x, time features, class embedding]."""

    def __init__(self, dim: int, out: int, hidden: int = 128, layers: int = 3, time_dim: int = 16,
                 num_classes: int = 0, T: float = 1.0, zero_init: bool = True):
        super().__init__()
        self.dim, self.time_dim, self.T = dim, time_dim, T
        self.embed = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        widths = [dim + time_dim] + [hidden] * (layers - 1)
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, out)
        if zero_init:  # start exactly at the pretrained model / a zero correction
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        h = torch.cat([x.reshape(b, -1), time_features(s, self.time_dim, b, x, self.T)], dim=-1)
        for i, layer in enumerate(self.body):
            h = layer(h)
            if i == 0 and self.embed is not None and cond is not None:
                h = h + self.embed(cond.long())
            h = nn.functional.silu(h)
        return self.head(h)


def posterior_gain(path: GaussianPath, s, data_var: float) -> torch.Tensor:
    """K_s = alpha v / (alpha^2 v + sigma^2) (diffusion time s): the slope in x of the data posterior mean
    E[X_data | X_s = x] for data of variance v per dimension, E21's K for S = v I; float64, the shape of s.

    It is the natural scale of a score correction. By Tweedie (E2) a change of the posterior mean by d moves the
    score by alpha / sigma^2 d, and the optimal correction grad log phi of E8 is alpha / sigma^2 times the shift
    of the posterior mean under the tilt, which the posterior spread C_s = sigma^2 K_s / alpha bounds: so it is
    K_s times a bounded field (exactly so for Gaussian data, E21: grad log phi = -K_s^T Q_s (...)). K_s -> 1 at
    the data and ~ alpha(s) v -> 0 in the noise, where the reverse SDE forgets a control but the ODE does not."""
    s = as_time(s)
    a, sig2 = path.alpha(s), path.sigma2(s)
    return a * data_var / (a**2 * data_var + sig2)


RESIDUALS = ("score", "x0")


class ResidualScore(nn.Module):
    """mu_theta(s, x, c) = s_pre(s, x, c) + gain(s) net(s, x, c): starts exactly at the pretrained score
    when `net` starts at zero (zero-initialised head).

    residual = "score": gain 1, the net is the score correction itself. "x0": gain K_s = `posterior_gain` for
    data of variance `data_var`, i.e. the net corrects the Tweedie estimate x0_hat (E2): a net that is smooth
    in s then plays a correction that fades in the noise as the optimal one does (E8, E21)."""

    takes_pretrained = True  # ScoreAsAction may pass a cached s_pre

    def __init__(self, pretrained: ScoreModel, net: nn.Module, residual: str = "score", data_var: float = 1.0):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, found {residual!r}")
        if not data_var > 0:
            raise ValueError(f"data_var must be > 0, found {data_var!r}")
        attach_frozen(self, "pretrained", pretrained)
        self.net, self.residual, self.data_var = net, residual, float(data_var)

    def forward(self, s, x: torch.Tensor, cond: torch.Tensor | None = None, s_pre: torch.Tensor | None = None
                ) -> torch.Tensor:
        if s_pre is None:
            s_pre = self.pretrained(s, x, cond)
        delta = self.net(s, x, cond).reshape(x.shape)
        if self.residual == "x0":
            delta = coef_like(posterior_gain(self.pretrained.path, s, self.data_var), x) * delta
        return s_pre + delta


def point_action(pretrained: ScoreModel, dim: int, num_classes: int = 0, T: float = 1.0, residual: str = "score",
                 data_var: float = 1.0, **mlp) -> ResidualScore:
    """The default trainable action for point tasks: pretrained score + (K_s times) a zero-initialised MLP."""
    return ResidualScore(pretrained, MLP(dim, dim, num_classes=num_classes, T=T, **mlp), residual, data_var)
