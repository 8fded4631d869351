"""Noise for stochastic samplers.

A noise sampler is a callable (t0, t1) -> standard normal tensor z, used as the Brownian increment
dW = sqrt(t1 - t0) z over the step (RL time). The default draws fresh noise; `BrownianNoise`
serves increments of ONE Brownian path, so runs on different sub-grids of a fine grid see the same
path (what a strong-convergence study, or a fair solver comparison, needs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NoiseSampler = Callable[[float, float], torch.Tensor]


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    def sample(t0: float, t1: float) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return sample


class BrownianNoise:
    """One Brownian path W on the RL-time grid `fine_ts`; increments over any pair of its points."""

    def __init__(self, fine_ts: torch.Tensor, shape: Sequence[int], *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64):
        self.ts = torch.as_tensor(fine_ts, dtype=torch.float64)
        dW = torch.sqrt(self.ts.diff()).reshape(-1, *([1] * len(shape))) * torch.randn(
            len(self.ts) - 1, *shape, generator=generator, dtype=torch.float64)
        self.W = torch.cat([torch.zeros(1, *shape, dtype=torch.float64), dW.cumsum(0)]).to(dtype)

    def _index(self, t: float) -> int:
        i = int(torch.argmin((self.ts - float(t)).abs()))
        if abs(float(self.ts[i]) - float(t)) > 1e-9:
            raise ValueError(f"BrownianNoise serves only points of its fine grid, found t={float(t)}")
        return i

    def __call__(self, t0: float, t1: float) -> torch.Tensor:
        i0, i1 = self._index(t0), self._index(t1)
        return (self.W[i1] - self.W[i0]) / (float(t1) - float(t0)) ** 0.5
