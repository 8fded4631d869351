"""GRPO (as in Flow-GRPO, Liu et al. 2025), Eq. E18: group-normalised advantages, PPO clip.

Clock: RL time t. The batch is cut into groups of `group_size` consecutive samples that share a
prompt (the trainer draws one condition per group); each sample's advantage is its terminal reward
normalised within its group, the same for every step. Optional KL to the reference through
kl_weight * per-step KL; by default the KL is folded into the reward instead (fold_kl), so GRPO
optimises the same J as the other algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions, clipped_surrogate, rescore
from scoreaction.config import check_nonnegative, check_positive, check_positive_int


@dataclass
class GRPOConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    group_size: int = 16
    fold_kl: bool = True
    kl_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("clip", self.clip)
        check_positive_int("group_size", self.group_size)
        check_nonnegative("kl_weight", self.kl_weight)


class GRPO(Algorithm):
    name = "grpo"
    Config = GRPOConfig

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def prepare(self, batch: Batch, generator=None):
        r = batch.sampled_objective if self.config.fold_kl else batch.rewards
        G = self.config.group_size
        if len(r) % G:
            raise ValueError(f"grpo: batch size must be a multiple of group_size={G}, found {len(r)}")
        groups = r.reshape(-1, G)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1)
        return Transitions.from_trajectory(batch.traj, adv.unsqueeze(0).expand(batch.traj.steps, -1)), {}

    def loss(self, policy, mb: Transitions):
        log_prob, kl = rescore(policy, mb)
        surrogate, diag = clipped_surrogate(log_prob, mb.log_prob, mb.adv, self.config.clip)
        return -surrogate.mean() + self.config.kl_weight * kl.mean(), diag
