"""Rewards share one signature: `reward(x, cond=None) -> tensor of shape (B,)` on finished samples."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ...


class QuadraticReward:
    """r(x) = -1/2 (x - y)^T A (x - y) on flattened samples (the reward of Eqs. E21, E22)."""

    differentiable = True

    def __init__(self, A, y):
        self.A = torch.as_tensor(A, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if self.A.shape != (len(self.y), len(self.y)):
            raise ValueError(f"reward matrix must have shape ({len(self.y)}, {len(self.y)}), found {tuple(self.A.shape)}")

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim < 2 or x[0].numel() != len(self.y):
            raise ValueError(f"reward expects samples of {len(self.y)} values, found shape {tuple(x.shape)}")
        diff = x.reshape(x.shape[0], -1) - self.y.to(x)
        return -0.5 * torch.einsum("bi,ij,bj->b", diff, self.A.to(x), diff)


__all__ = ["RewardModel", "QuadraticReward"]
