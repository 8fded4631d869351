"""What every task provides, and the exact machinery shared by the Gaussian and mixture tasks.

A task bundles data (through its pretrained score), a reward with the RewardModel signature, the
KL weight beta_KL and the stochasticity eta of the control problem (Eqs. E3, E5), and, where it can,
exact references: the optimal action (Eq. E8), samples of p* and p_pre, J* and E_pre[r].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from scoreaction.config import Options, check_choice, check_nonnegative
from scoreaction.models import ScoreModel
from scoreaction.models.analytic import MixtureScore
from scoreaction.models.residual import MLP, RESIDUALS, point_action
from scoreaction.paths import GaussianPath, make_path
from scoreaction.rewards import QuadraticReward, RewardModel
from scoreaction.samplers import make_grid
from scoreaction.tasks import tilt


@dataclass
class TaskConfig(Options):
    """Fields shared by every task; subclasses set `name` to the task's name and add theirs. Validated on
    construction."""

    name: str = ""
    beta_kl: float = 1.0
    eta: float = 1.0
    path: str = "vp"
    path_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_nonnegative("beta_kl", self.beta_kl)
        check_nonnegative("eta", self.eta)


class Task:
    """Everything a trainer, evaluator or benchmark may ask of a task; subclasses set the attributes and
    override what differs from the defaults. A new task is one file: a `TaskConfig` subclass, a `Task`
    subclass, and `register_task` (tasks/__init__.py).

    Attributes: `name`; `config` (its TaskConfig); `shape` of one sample; `path` (the Gaussian path of the
    pretrained model); `pretrained` (score model, diffusion time s); `reward` (RewardModel: (x, cond) -> (B,));
    `beta_kl` and `eta` of the control problem (Eqs. E3, E5); `num_classes` (class-conditional tasks draw
    labels 0..num_classes-1; 0: unconditional); `eval_n`, `eval_steps` (the trainer's evaluation defaults, and
    `scoreaction evaluate`'s); `sample_n`, `sample_steps` (`scoreaction sample`'s defaults: many samples where
    statistics need them and they are cheap, a handful of images for a text-to-image pipeline);
    `exact` (True where `optimal_score`, `sample_optimal` and `reference` are exact).
    """

    name: str
    config: TaskConfig
    shape: tuple[int, ...]
    path: GaussianPath
    pretrained: ScoreModel
    reward: RewardModel
    beta_kl: float
    eta: float
    num_classes: int = 0
    eval_n: int = 4096
    eval_steps: int = 200
    sample_n: int = 10_000
    sample_steps: int = 100
    exact: bool = False

    # --- the start of a rollout -------------------------------------------------------------------
    def sample_conditions(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """n conditions (e.g. class labels), or None for an unconditional task."""
        return None

    def prior_sample(self, n: int, *, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """X_0 (RL time 0) ~ N(0, prior_std^2 I), shape (n, *shape)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be a positive integer, found {n!r}")
        return self.path.prior_sample((n, *self.shape), generator=generator, dtype=dtype)

    def start(self, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
              group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(X_0, cond) for n rollouts: the conditions first (one per group of `group` consecutive samples, as
        GRPO's groups need), then the prior sample, both from `generator` in that order."""
        cond = self.sample_conditions(n // group, generator=generator)
        if cond is not None and group > 1:
            cond = cond.repeat_interleave(group)
        return self.prior_sample(n, generator=generator, dtype=dtype), cond

    def grid(self, name: str, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The RL-time grid of rollouts and evaluation (samplers/grids.py; only `random` uses the generator)."""
        return make_grid(name, self.path, steps, generator)

    def images(self, x: torch.Tensor) -> torch.Tensor | None:
        """Final samples as images in [0, 1], (B, C, H, W) (decoded for latent tasks), or None where samples are
        not images (points)."""
        return None

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """What a labeler and a learned reward see of final samples: the samples themselves, or decoded images for
        latent tasks (the labeling app stores these)."""
        return x

    def to(self, device: str | torch.device) -> "Task":
        """Move what the task computes with (its pretrained model and reward, where they are modules)."""
        for part in (self.pretrained, self.reward):
            if isinstance(part, nn.Module):
                part.to(device)
        return self

    # --- what fine-tuning trains ------------------------------------------------------------------
    def make_action(self, hidden: int = 128) -> nn.Module:
        """The trainable action mu_theta(s, x, c) (Eq. E3), starting exactly at the pretrained score. Default:
        the pretrained score plus a zero-initialised MLP on the flattened sample."""
        return point_action(self.pretrained, self.dim, hidden=hidden, num_classes=self.num_classes, T=self.path.T)

    def make_value_head(self, hidden: int = 128) -> nn.Module:
        """h_phi(s, x, c) -> (B, 1), the learned part of the value net of Eq. E15. Default: an MLP."""
        return MLP(self.dim, 1, hidden=hidden, num_classes=self.num_classes, T=self.path.T)

    @property
    def dim(self) -> int:
        """Number of values in one sample."""
        return int(torch.Size(self.shape).numel())

    # --- exact references -------------------------------------------------------------------------
    def compute_reference(self, n: int | None = None) -> dict | None:
        """J*, E_pre[r] and what else is known exactly (see `reference`); n is the Monte-Carlo size where
        the reference needs one (closed forms ignore it). None: the task has no exact reference."""
        return None

    def reference(self) -> dict | None:
        """The exact reference, computed once per task object; None where there is none or beta_kl = 0."""
        if "_reference" not in self.__dict__:
            self._reference = self.compute_reference() if self.beta_kl > 0 else None
        return self._reference

    def use_reference(self, reference: dict | None) -> None:
        """Adopt a reference computed elsewhere (e.g. by another process on an identical task)."""
        self._reference = reference

    def optimal_score(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The optimal action a* of Eq. E8 as a score (diffusion time s); exact tasks only."""
        raise ValueError(f"task {self.name!r} has no exact optimal control (tasks with one: the exact ones)")


@dataclass
class PointTaskConfig(TaskConfig):
    """Fields of the point tasks (gaussian, mixture), whose action is `point_action`: `residual` says how its MLP's
    output is read, "score" (the score correction itself) or "x0" (times K_s = models.residual.posterior_gain, for
    the data's mean variance per dimension: a correction that fades in the noise as the optimal one does, E21)."""

    residual: str = "score"

    def __post_init__(self):
        super().__post_init__()
        check_choice("residual", self.residual, RESIDUALS)


class QuadraticTiltTask(Task):
    """Mixture data + quadratic reward: everything in Eq. E8 is exact (see tilt.py)."""

    pretrained: MixtureScore
    exact = True

    def __init__(self, config: TaskConfig, weights, means, covs, reward_matrix, target):
        self.config = config
        self.path = make_path(config.path, **config.path_options)
        self.pretrained = MixtureScore(self.path, weights, means, covs)
        self.shape = (self.pretrained.dim,)
        self.reward = QuadraticReward(reward_matrix, target)
        self.beta_kl, self.eta = float(config.beta_kl), float(config.eta)

    def make_action(self, hidden: int = 128) -> nn.Module:
        """pretrained score + a zero-initialised MLP, read as the task config's `residual` says."""
        model = self.pretrained
        w = model.weights.to(torch.float64)
        mean = (w[:, None] * model.means).sum(0)
        second = (w[:, None, None] * (model.covs + model.means[:, :, None] * model.means[:, None, :])).sum(0)
        data_var = float(torch.trace(second - torch.outer(mean, mean))) / self.dim
        return point_action(model, self.dim, hidden=hidden, num_classes=self.num_classes, T=self.path.T,
                            residual=self.config.residual, data_var=data_var)

    def require_tilt(self) -> None:
        if not self.beta_kl > 0:
            raise ValueError(f"the tilt exp(r / beta_kl) needs beta_kl > 0, found {self.beta_kl}")

    def log_phi(self, s: float, x: torch.Tensor) -> torch.Tensor:
        """log phi(s, x) of Eq. E8 (diffusion time s), shape (B,)."""
        self.require_tilt()
        return tilt.log_phi(self.pretrained, self.reward.A, self.reward.y, self.beta_kl, s, x)

    def optimal_score(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The optimal action a*(t, x) = s_pre + grad_x log phi (Eq. E8), as a score at diffusion time s
        (a float, or one time per sample of shape (B,))."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if s.ndim == 1:
            out = torch.empty_like(x)
            for value in torch.unique(s):
                idx = s == value
                out[idx] = self.optimal_score(float(value), x[idx], cond)
            return out
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_phi(float(s), xg).sum(), xg)
        return self.pretrained(float(s), x) + grad

    def sample_pre(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact terminal samples of the pretrained eta = 1 reverse process from the prior (p_pre)."""
        x0 = self.prior_sample(n, generator=generator, dtype=torch.float64)
        return tilt.sample_posterior(self.pretrained, self.path.T, x0, generator=generator)

    def sample_optimal(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of p*, the terminal law of the optimal path measure P* (Eq. E8)."""
        self.require_tilt()
        x0 = self.prior_sample(n, generator=generator, dtype=torch.float64)
        return tilt.sample_posterior(self.pretrained, self.path.T, x0, A=self.reward.A, y=self.reward.y,
                                     beta_kl=self.beta_kl, generator=generator)

    def j_star_mc(self, n: int = 200_000, seed: int = 0) -> tuple[float, float]:
        """J* = beta_KL E[log phi(0, X_0)] by Monte Carlo over X_0 with an exact integrand: (mean, std error)."""
        gen = torch.Generator().manual_seed(seed)
        vals = self.beta_kl * self.log_phi(self.path.T, self.prior_sample(n, generator=gen, dtype=torch.float64))
        return float(vals.mean()), float(vals.std() / math.sqrt(n))
