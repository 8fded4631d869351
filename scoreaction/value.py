"""The value network with diffusion structure (Eq. E15).

Clock: RL time t (s = T - t inside).

    V_phi(t, x, c) = c_skip(t) r(x0_hat(t, x), c) + c_out(t) h_phi(t, x, c),
    c_skip = cos(pi s / 2T),  c_out = sin(pi s / 2T),

with x0_hat the Tweedie estimate (Eq. E2) from the PRETRAINED score, so that the structured part is
fixed and can be computed once per batch (`base`). At t = T (s = 0) V is r(x) exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scoreaction.models import ScoreModel
from scoreaction.models.frozen import attach_frozen
from scoreaction.paths import GaussianPath, append_dims, as_time
from scoreaction.rewards import RewardModel


class ValueNet(nn.Module):
    def __init__(self, path: GaussianPath, pretrained: ScoreModel, reward: RewardModel, head: nn.Module):
        super().__init__()
        attach_frozen(self, "pretrained", pretrained)
        attach_frozen(self, "reward", reward)
        self.path, self.head = path, head

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at RL time t."""
        u = 0.5 * math.pi * (self.path.T - as_time(t)) / self.path.T
        return torch.cos(u), torch.sin(u)

    def base(self, t, x: torch.Tensor, cond=None, s_pre: torch.Tensor | None = None) -> torch.Tensor:
        """r(x0_hat(t, x), c), shape (B,); differentiable in x when the reward is. r(x) where s = 0.
        `s_pre`: the pretrained score at (t, x) if already known (a rollout caches it)."""
        s = (self.path.T - as_time(t)).expand(x.shape[0]) if as_time(t).ndim == 0 else self.path.T - as_time(t)
        at_data = s <= 1e-12
        s_safe = torch.where(at_data, torch.full_like(s, 1e-3 * self.path.T), s)
        score = self.pretrained(s_safe, x, cond) if s_pre is None or bool(at_data.any()) else s_pre
        x0_hat = self.path.tweedie(score, s_safe, x)
        x0_hat = torch.where(append_dims(at_data, x.ndim), x, x0_hat)
        return self.reward(x0_hat, cond)

    def forward(self, t, x: torch.Tensor, cond=None, base: torch.Tensor | None = None) -> torch.Tensor:
        """V_phi(t, x, c), shape (B,). Pass a precomputed `base` to skip the reward evaluation."""
        c_skip, c_out = (c.to(x) for c in self.coefficients(t))
        if base is None:
            base = self.base(t, x, cond)
        s = self.path.T - as_time(t)
        return c_skip * base + c_out * self.head(s, x, cond).reshape(x.shape[0])
