"""DPOK (Fan et al. 2023), Eq. E17: policy gradient with a per-step KL to the pretrained model.

Clock: RL time t. loss = -reward_weight * E sum_k ratio_k A + kl_weight * E sum_k KL_k, where A is the
terminal reward centred (default) or normalised over the batch, the same for every step, and KL_k is
the closed-form KL between the Gaussian transitions of the policy and the pretrained model. With
kl_weight = beta_KL (the default) and a centred reward the objective is J of Eq. E5.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions, _positive
from scoreaction.policy import gaussian_log_prob

REWARD_SCALINGS = ("center", "normalize")


@dataclass
class DPOKConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 1
    minibatches: int = 1
    reward_weight: float = 1.0
    kl_weight: float | None = None  # None: the task's beta_kl
    reward_scaling: str = "center"

    def __post_init__(self):
        super().__post_init__()
        _positive("reward_weight", self.reward_weight)
        if self.kl_weight is not None and not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a number >= 0, found {self.kl_weight!r}")
        if self.reward_scaling not in REWARD_SCALINGS:
            raise ValueError(f"reward_scaling must be one of {list(REWARD_SCALINGS)}, found {self.reward_scaling!r}")


class DPOK(Algorithm):
    name = "dpok"
    Config = DPOKConfig

    def prepare(self, batch: Batch, generator=None):
        r = batch.rewards - batch.rewards.mean()
        if self.config.reward_scaling == "normalize":
            r = r / (batch.rewards.std() + 1e-8)
        return Transitions.from_trajectory(batch.traj, r.unsqueeze(0).expand(batch.traj.steps, -1)), {}

    def loss(self, policy, mb: Transitions):
        mean, std, mu, s_pre = policy.transition(mb.t0, mb.t1, mb.x, mb.cond)
        ratio = (gaussian_log_prob(mb.x_next, mean, std) - mb.log_prob).exp()
        kl_weight = self.task.beta_kl if self.config.kl_weight is None else self.config.kl_weight
        loss = -self.config.reward_weight * (ratio * mb.adv).mean()
        if kl_weight > 0:
            loss = loss + kl_weight * policy.kl(mb.t0, mb.t1, mu, s_pre).mean()
        return loss, {"ratio_mean": ratio.mean().item()}
