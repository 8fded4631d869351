"""Pretrained score models behind one interface: `score(s, x, cond) -> tensor shaped like x`.

Clock: DIFFUSION time s (a float, a 0-d tensor, or one time per sample of shape (B,)).
Points (B, d) and images (B, C, H, W) go through the same code.
"""

from typing import Protocol, runtime_checkable

import torch

from scoreaction.models.adapter import NetworkScore
from scoreaction.models.analytic import GaussianScore, MixtureScore


@runtime_checkable
class ScoreModel(Protocol):
    def __call__(self, s: float | torch.Tensor, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ...


__all__ = ["ScoreModel", "GaussianScore", "MixtureScore", "NetworkScore"]
