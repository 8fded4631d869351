"""GRPO (as in Flow-GRPO, Liu et al. 2025), Eq. E18: group-normalised advantages, PPO clip.

Clock: RL time t. The batch is cut into groups of `group_size` consecutive samples that share a
prompt (the trainer draws one condition per group); each sample's advantage is its terminal reward
normalised within its group, the same for every step. The KL to the reference is folded into
the reward (fold_kl, the default), so GRPO optimises the same J as the other algorithms, or added to
the loss as beta_KL * per-step KL.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions, clipped_surrogate, rescore
from scoreaction.config import check_positive, check_positive_int


@dataclass
class GRPOConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    group_size: int = 16
    fold_kl: bool = True  # False: beta_KL * per-step KL in the loss instead

    @property
    def samples_per_condition(self) -> int:
        return self.group_size

    def __post_init__(self):
        super().__post_init__()
        check_positive("clip", self.clip)
        check_positive_int("group_size", self.group_size)


class GRPO(Algorithm):
    name = "grpo"
    Config = GRPOConfig

    def prepare(self, batch: Batch, generator=None):
        r = self.world.gather(batch.sampled_objective if self.config.fold_kl else batch.rewards)
        groups = r.reshape(-1, self.config.group_size)  # TrainConfig checks that group_size divides the batch
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1)
        adv = self.world.shard(adv)
        return Transitions.from_trajectory(batch.traj, adv.unsqueeze(0).expand(batch.traj.steps, -1)), {}

    def loss(self, policy, mb: Transitions):
        log_prob, kl = rescore(policy, mb)
        surrogate, diag = clipped_surrogate(log_prob, mb.log_prob, mb.adv, self.config.clip, self.ratio_dims(mb))
        kl_weight = 0.0 if self.config.fold_kl else self.beta_kl
        return -surrogate.mean() + kl_weight * kl.mean(), diag
