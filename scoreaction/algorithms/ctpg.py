"""CTPG: the plain continuous-time policy gradient (Eq. E10), with CTRL's value net and advantages.

Clock: RL time t. grad J = E sum_k grad log pi(X_{k+1} | X_k) A_k + E sum_k grad rho_k dt_k, estimated
on-policy: one pass, no clipping. Written with the ratio exp(log pi - log pi_old), which is 1 with
gradient grad log pi on-policy, so extra epochs would be plain (unclipped) importance sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.algorithms.base import Transitions, ratio_diagnostics, rescore
from scoreaction.algorithms.ctrl import CTRL, CTRLConfig


@dataclass
class CTPGConfig(CTRLConfig):
    epochs: int = 1
    minibatches: int = 1


class CTPG(CTRL):
    name = "ctpg"
    Config = CTPGConfig

    def loss(self, policy, mb: Transitions):
        log_prob, kl = rescore(policy, mb)
        log_ratio = log_prob - mb.log_prob
        loss = -(log_ratio.exp() * mb.adv).mean()
        if self.config.kl_grad:
            loss = loss + self.beta_kl * kl.mean() / self.kl_scale
        return loss, ratio_diagnostics(log_ratio)
