"""DRaFT-K (Clark et al. 2023), Eq. E19: back-propagate a differentiable reward through the last K steps.

Clock: RL time t. For each sample the last `last_k` transitions (0: all of them, AlignProp-style) are re-simulated from the stored
state X_{K-last_k} with the stored noises z_k under the current parameters (the reparameterisation
X_{k+1} = mean_theta(X_k) + std_k z_k), and the loss is -(r(X_T) - beta_KL * KL over those steps):
the truncated pathwise gradient of J. Needs a reward differentiable in x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch
from scoreaction.config import check_nonnegative_int


@dataclass
class DRaFTConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 1
    minibatches: int = 4
    last_k: int = 0  # 0: back-propagate through the whole chain

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative_int("last_k", self.last_k)


class DRaFT(Algorithm):
    name = "draft"
    Config = DRaFTConfig
    unit = "sample"

    def __init__(self, policy, task, config: DRaFTConfig):
        super().__init__(policy, task, config)
        if not getattr(task.reward, "differentiable", False):
            raise ValueError(f"draft needs a differentiable reward, found {type(task.reward).__name__}")

    def prepare(self, batch: Batch, generator=None):
        return Samples(batch, torch.arange(len(batch.rewards))), {}

    def loss(self, policy, mb: "Samples"):
        traj, idx = mb.batch.traj, mb.idx
        K = traj.steps
        start = 0 if self.config.last_k == 0 else max(K - self.config.last_k, 0)
        cond = None if traj.cond is None else traj.cond[idx]
        x = traj.xs[start, idx]
        kl = torch.zeros(len(idx), dtype=x.dtype, device=x.device)
        for k in range(start, K):
            out = policy.step(float(traj.ts[k]), float(traj.ts[k + 1]), x, cond, noise=traj.noises[k, idx])
            x, kl = out.x_next, kl + out.kl
        objective = self.task.reward(x, cond) - self.beta_kl * kl
        return -objective.mean(), {}


@dataclass
class Samples:
    """Whole samples of a batch (DRaFT's unit): the rollouts `idx` of `batch`."""

    batch: Batch
    idx: torch.Tensor

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def samples(self) -> int:
        return len(self.idx)

    def select(self, i: torch.Tensor) -> "Samples":
        return Samples(self.batch, self.idx[i])
