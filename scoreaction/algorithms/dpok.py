"""DPOK (Fan et al. 2023), Eq. E17: policy gradient with a per-step KL to the pretrained model.

Clock: RL time t. loss = -reward_weight * E sum_k ratio_k A + beta_KL * E sum_k KL_k, where A is the
terminal reward centred (default) or normalised over the batch, the same for every step, and KL_k is
the closed-form KL between the Gaussian transitions of the policy and the pretrained model (Eq. E6);
beta_KL is the task's. With reward_weight = 1 and a centred reward the objective is J of Eq. E5.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions, ratio_diagnostics, rescore
from scoreaction.config import check_choice, check_positive

REWARD_SCALINGS = ("center", "normalize")


@dataclass
class DPOKConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 1
    minibatches: int = 1
    reward_weight: float = 1.0
    reward_scaling: str = "center"

    def __post_init__(self):
        super().__post_init__()
        check_positive("reward_weight", self.reward_weight)
        check_choice("reward_scaling", self.reward_scaling, REWARD_SCALINGS)


class DPOK(Algorithm):
    name = "dpok"
    Config = DPOKConfig

    def prepare(self, batch: Batch, generator=None):
        rewards = self.world.gather(batch.rewards)
        r = rewards - rewards.mean()
        if self.config.reward_scaling == "normalize":
            r = r / (rewards.std() + 1e-8)
        r = self.world.shard(r)
        return Transitions.from_trajectory(batch.traj, r.unsqueeze(0).expand(batch.traj.steps, -1)), {}

    def loss(self, policy, mb: Transitions):
        log_prob, kl = rescore(policy, mb)
        log_ratio = log_prob - mb.log_prob
        loss = -self.config.reward_weight * (log_ratio.exp() * mb.adv).mean() + self.beta_kl * kl.mean()
        return loss, ratio_diagnostics(log_ratio)
