"""What all fine-tuning algorithms share: the batch they see, transitions, PPO pieces, the interface.

An algorithm turns one batch of rollouts into minibatches (`prepare`, where advantages are computed
and a value net may be fitted) and a minibatch into a loss (`loss(policy, minibatch) -> loss,
metrics`, a mean over the minibatch's items). It does no I/O; the trainer owns the optimiser of the
policy, the loop and the logs. Clock: RL time t throughout.

Several processes: `prepare` sees this process's shard of the batch and gathers what it needs over the
whole batch through `self.world` (scoreaction/distributed.py); `minibatches` are index sets over the
whole batch, of which each process holds its members.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from scoreaction.config import Options, check_choice, check_positive, check_positive_int
from scoreaction.distributed import World
from scoreaction.policy import ScoreAsAction, Trajectory, gaussian_log_prob

if TYPE_CHECKING:
    from scoreaction.tasks import Task


@dataclass
class AlgorithmConfig(Options):
    """Options every algorithm has. Validated on construction."""

    lr: float = 3e-4
    epochs: int = 1  # passes over each batch
    minibatches: int = 1  # per pass
    max_grad_norm: float = 1.0
    # The PPO ratio of ctrl, ddpo and grpo: `sum` is the exact likelihood ratio of a transition (log-probs summed
    # over the sample's dimensions); `mean` divides the log-ratio by the number of dimensions, as DDPO and TRL do
    # (their clip 1e-4 on SD-1.5's 4x64x64 latents is a summed log-ratio of about 1.6). docs/diffusers.md.
    ratio: str = "sum"

    @property
    def samples_per_condition(self) -> int:
        """Consecutive rollouts that share one condition (GRPO's groups); the batch size must be a multiple."""
        return 1

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive_int("epochs", self.epochs)
        check_positive_int("minibatches", self.minibatches)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_choice("ratio", self.ratio, ("sum", "mean"))


@dataclass
class Batch:
    """Rollouts and their terminal rewards r(X_T, c), shape (B,)."""

    traj: Trajectory
    rewards: torch.Tensor
    beta_kl: float

    @property
    def objective(self) -> torch.Tensor:
        """Per-sample estimate of J (Eq. E5): r(X_T) - beta_KL * path KL, shape (B,)."""
        return self.rewards - self.beta_kl * self.traj.path_kl

    @property
    def sampled_objective(self) -> torch.Tensor:
        """r(X_T) - beta_KL * sum_k log(pi_theta / pi_pre)(X_{k+1} | X_k): the same mean as `objective`, but
        its KL part is a function of the sampled actions only, so a score-function gradient of it is
        unbiased (how RLHF folds a KL into the reward). What baselines without a KL term optimise."""
        return self.rewards - self.beta_kl * self.traj.log_ratios.sum(0)

    def returns(self) -> torch.Tensor:
        """Monte-Carlo returns G_k = r(X_T) + sum_{j >= k} rho_j dt_j with rho dt = -beta_KL kl_j, (K, B)."""
        kl_to_go = self.traj.kls.flip(0).cumsum(0).flip(0)
        return self.rewards.unsqueeze(0) - self.beta_kl * kl_to_go


@dataclass
class Transitions:
    """Flattened transitions (N = K * B, step-major): X_k -> X_{k+1} at RL times t0 -> t1."""

    t0: torch.Tensor
    t1: torch.Tensor
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor
    adv: torch.Tensor
    k: torch.Tensor
    cond: torch.Tensor | None = None
    s_pre: torch.Tensor | None = None  # the pretrained score at (t0, x), cached by the rollout

    @classmethod
    def from_trajectory(cls, traj: Trajectory, adv: torch.Tensor) -> "Transitions":
        K, B = traj.log_probs.shape
        ts = traj.ts.to(traj.xs.dtype)
        cond = None if traj.cond is None else traj.cond.repeat(K, *[1] * (traj.cond.ndim - 1))
        return cls(t0=ts[:-1].repeat_interleave(B), t1=ts[1:].repeat_interleave(B), x=traj.xs[:-1].flatten(0, 1),
                   x_next=traj.xs[1:].flatten(0, 1), log_prob=traj.log_probs.flatten(), adv=adv.flatten(),
                   k=torch.arange(K).repeat_interleave(B), cond=cond,
                   s_pre=None if traj.pre_scores is None else traj.pre_scores.flatten(0, 1))

    def __len__(self) -> int:
        return len(self.log_prob)

    @property
    def samples(self) -> int:
        """Rollouts the transitions come from (of a whole, unselected set)."""
        return len(self) // (int(self.k.max()) + 1)

    def select(self, idx: torch.Tensor) -> "Transitions":
        return Transitions(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                              for f in fields(self)})


def minibatch_indices(n: int, minibatches: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """A random permutation of range(n) cut into `minibatches` nearly equal parts (n of one item each when
    more are asked for than there are items: the others would be empty)."""
    return list(torch.randperm(n, generator=generator).tensor_split(max(1, min(minibatches, n))))


def rescore(policy: ScoreAsAction, mb: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
    """Under the CURRENT parameters: log pi_theta(x_next | x) of stored transitions and the per-step KL
    to the pretrained transition (Eq. E6), both (N,) and differentiable in theta."""
    mean, std, mu, s_pre = policy.transition(mb.t0, mb.t1, mb.x, mb.cond, mb.s_pre)
    return gaussian_log_prob(mb.x_next, mean, std), policy.kl(mb.t0, mb.t1, mu, s_pre)


@torch.no_grad()
def ratio_diagnostics(log_ratio: torch.Tensor, clip: float | None = None) -> dict:
    """What every ratio-based update logs: approx_kl, the k3 estimator E[(ratio - 1) - log ratio] of
    KL(pi_old || pi_theta) (as in cleanrl), the mean ratio, and the clipped fraction where there is a clip."""
    ratio = torch.exp(log_ratio)
    diag = {"approx_kl": float(((ratio - 1) - log_ratio).mean()), "ratio_mean": float(ratio.mean())}
    if clip is not None:
        diag["clipfrac"] = float(((ratio - 1).abs() > clip).float().mean())
    return diag


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip: float,
                      dims: int = 1):
    """PPO: min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) per item (Eq. E14), and its diagnostics. `dims` > 1
    averages the log-ratio over a sample's dimensions (the `ratio: mean` convention of DDPO and TRL)."""
    log_ratio = (log_prob - old_log_prob) / dims
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return surrogate, ratio_diagnostics(log_ratio, clip)


def normalise(adv: torch.Tensor, mode: str, eps: float = 1e-8) -> tuple[torch.Tensor, float]:
    """Scale advantages (K, B). Returns (advantages, scale) where adv_out = (adv - shift) / scale.

    none: unchanged; global: divided by one std over all steps (the objective keeps its direction,
    so a KL term divided by the same scale keeps its weight); per_time: centred and scaled per step
    index across the batch (as the authors' code; this changes the relative weight of steps)."""
    if mode == "none":
        return adv, 1.0
    if mode == "global":
        scale = float(adv.std()) + eps
        return adv / scale, scale
    if mode == "per_time":
        return (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True) + eps), 1.0
    raise ValueError(f"advantage normalisation must be one of ['global', 'none', 'per_time'], found {mode!r}")


class Algorithm:
    """Interface of every algorithm; subclasses set `name`, `Config` and implement prepare / loss."""

    name: str = ""
    Config: type[AlgorithmConfig] = AlgorithmConfig
    unit: str = "transition"  # what a minibatch holds: transitions, or whole samples
    needs_reference: bool = False  # whether it uses the pretrained score even at beta_KL = 0

    def __init__(self, policy: ScoreAsAction, task: Task, config: AlgorithmConfig):
        self.policy, self.task, self.config = policy, task, config
        self.world = World()  # the trainer's, when it runs on several processes

    def ratio_dims(self, mb: Transitions) -> int:
        """What the log-ratio is divided by: 1 (`ratio: sum`) or the number of values in a sample (`mean`)."""
        return mb.x[0].numel() if self.config.ratio == "mean" else 1

    @property
    def beta_kl(self) -> float:
        """The KL weight of the control problem (Eq. E5): always the task's."""
        return self.task.beta_kl

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[Any, dict]:
        """Per batch: advantages (and value fit). Returns (data for minibatches, metrics)."""
        raise NotImplementedError

    def minibatches(self, data: Transitions, generator: torch.Generator | None = None) -> Iterable:
        """(this process's items of a minibatch, the minibatch's size over all processes) pairs: random
        minibatches of the whole batch's items, drawn alike by every process."""
        for idx in minibatch_indices(self.world.size * len(data), self.config.minibatches, generator):
            yield data.select(self.world.members(idx, data.samples)), len(idx)

    def loss(self, policy: ScoreAsAction, minibatch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # --- state the checkpoint must carry beyond the policy (value nets, their optimisers, statistics)
    def modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) for the checkpoint."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass
