"""The score-as-action policy (Eqs. E3-E6): Gaussian transitions, log-probs, path KL, rollouts.

Clock: transitions and rollouts take RL time t (t = 0 noise, t = T data); score functions take
diffusion time s = T - t.

Notation, defined once:
    mu      = mu_theta(s, x, c), the action of the fine-tuned policy (a score);
    s_pre   = s_pre(s, x, c), the pretrained score (the reference policy's action);
    mean    = a x + b mu, std: the Gaussian kernel (`sde.step_coefficients`): `em`, one Euler step of E3
              (Eq. E4: mean = x + [ -f(s, x) + (1 + eta^2)/2 g(s)^2 mu ] dt, std = eta g(s) sqrt(dt)), or
              `ddim`, diffusers' DDIM(eta) step; with eta = 0, std = b sigma_a (explicit action noise)
    log_prob = log N(x_next; mean, std^2 I), summed over all dimensions of a sample
    kl       = ||mean - mean_pre||^2 / (2 std^2) = ||b (mu - s_pre)||^2 / (2 std^2)    (Eq. E6, per step;
               for `em` this is kappa(t) ||mu - s_pre||^2 dt, kappa(t) = (1 + eta^2)^2 / (8 eta^2) g(T - t)^2)

The log-prob is the full (summed) Gaussian log-density of the transition; it equals
log pi_theta(a_k | t_k, X_k) up to a constant that cancels in every ratio.

`reference = False` (what the trainer sets at beta_KL = 0 when neither the action nor the algorithm uses s_pre,
DDPO's setting) never evaluates the pretrained model: kl and log_ratio are zero then (not measured) and no s_pre
is cached. On a diffusers pipeline that halves the network calls of a rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from scoreaction.models import ScoreModel
from scoreaction.models.frozen import attach_frozen
from scoreaction.paths import GaussianPath, as_time, coef_like
from scoreaction.samplers.grids import check_grid
from scoreaction.sde import KERNELS, kappa, step_coefficients


@dataclass
class StepOutput:
    """One transition X_k -> X_{k+1} (RL time t_k -> t_{k+1})."""

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # () or (B,)
    noise: torch.Tensor  # z with x_next = mean + std z
    log_prob: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B,), per-step KL to the pretrained transition (closed form)
    log_ratio: torch.Tensor  # (B,), log pi_theta(x_next | x) - log pi_pre(x_next | x): a one-sample KL estimate
    x0_hat: torch.Tensor  # Tweedie estimate (Eq. E2) at (t_k, X_k) from mu
    s_pre: torch.Tensor | None  # the pretrained score at (t_k, X_k), fixed for the whole update, so cached


@dataclass
class Trajectory:
    """A batch of rollouts on one RL-time grid.

    xs: (K+1, B, ...) states X_0..X_K; ts: (K+1,) RL times; log_probs, kls: (K, B); log_ratios: (K, B)
    one-sample estimates log pi_theta - log pi_pre of each step's KL (mean kls, more noise);
    x0_hats: (K, B, ...) Tweedie estimates at X_0..X_{K-1}; noises: (K, B, ...) the standard normal
    draws z_k with X_{k+1} = mean_k + std_k z_k; cond: per-sample condition or None; pre_scores:
    (K, B, ...) the pretrained score s_pre(T - t_k, X_k, c): the reference never changes, so re-scoring
    the stored transitions (every epoch of PPO) reuses it instead of running the pretrained model again.
    """

    xs: torch.Tensor
    ts: torch.Tensor
    log_probs: torch.Tensor
    kls: torch.Tensor
    log_ratios: torch.Tensor
    x0_hats: torch.Tensor
    noises: torch.Tensor
    cond: torch.Tensor | None = None
    pre_scores: torch.Tensor | None = None

    @property
    def x_final(self) -> torch.Tensor:
        return self.xs[-1]

    @property
    def path_kl(self) -> torch.Tensor:
        """Accumulated path KL to the pretrained model, sum_k kl_k (Eq. E6), shape (B,)."""
        return self.kls.sum(0)

    @property
    def steps(self) -> int:
        return len(self.ts) - 1

    @classmethod
    def cat(cls, parts: list["Trajectory"]) -> "Trajectory":
        """Rollouts of several chunks of one batch on the same grid, as one batch."""
        if len(parts) == 1:
            return parts[0]

        def join(name):
            values = [getattr(p, name) for p in parts]
            if values[0] is None or name == "ts":
                return values[0]
            return torch.cat(values, dim=0 if name == "cond" else 1)

        return cls(**{f.name: join(f.name) for f in fields(cls)})

    def to(self, *args, **kwargs) -> "Trajectory":
        return Trajectory(**{f.name: (v.to(*args, **kwargs) if torch.is_tensor(v) else v)
                             for f in fields(self) for v in [getattr(self, f.name)]})


ActionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ScoreAsAction(nn.Module):
    """pi_theta: the reverse process of Eq. E3 whose action is a score.

    `action(s, x, cond)` is mu_theta (diffusion time s); None plays the pretrained score, giving the
    reference policy. An action that builds on the pretrained score (a residual) sets
    `takes_pretrained = True` and accepts `s_pre=` so that a score computed once is not computed twice. A trainable `action` is an nn.Module and is registered as a submodule; the
    pretrained model is a frozen reference and is not, so `policy.parameters()` are exactly the
    trainable parameters and `policy.state_dict()` holds only the fine-tuned weights.
    """

    def __init__(self, path: GaussianPath, pretrained: ScoreModel, action: ActionFn | nn.Module | None = None,
                 eta: float = 1.0, action_noise: float = 0.0, kernel: str = "em"):
        super().__init__()
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, found {eta}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, found {kernel!r}")
        if eta == 0 and not action_noise > 0:
            raise ValueError(f"eta = 0 (ODE rollouts) needs explicit action noise sigma_a > 0, found {action_noise}")
        attach_frozen(self, "pretrained", pretrained)
        self.path, self.action = path, action
        self.eta, self.action_noise, self.kernel = float(eta), float(action_noise), kernel
        self.reference = True

    # --- what a checkpoint holds: the trainable weights only (LoRA adapters, not the frozen network) ---
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Load trainable weights after checking every key and shape (one-line errors starting with `what`)."""
        expected = self.trainable_state()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{what}: missing tensor {missing[0]!r}")
        for key, value in expected.items():
            if tensors[key].shape != value.shape:
                raise ValueError(f"{what}: {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(value.shape)}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in expected:
                    p.copy_(tensors[name].to(p.dtype))

    # --- the action and its reference --------------------------------------------------------
    def score(self, s, x: torch.Tensor, cond: torch.Tensor | None = None, s_pre: torch.Tensor | None = None
              ) -> torch.Tensor:
        """mu_theta(s, x, c): the policy's action as a score function (diffusion time s).

        This is what to hand any sampler: the fine-tuned policy is a score field. `s_pre`, the
        pretrained score at (s, x, c) if already known, saves a pretrained evaluation."""
        if self.action is None:
            return self.pretrained(s, x, cond) if s_pre is None else s_pre
        if s_pre is not None and getattr(self.action, "takes_pretrained", False):
            return self.action(s, x, cond, s_pre=s_pre)
        return self.action(s, x, cond)

    def pretrained_score(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """s_pre(s, x, c). Frozen weights, but differentiable in x (reward backprop needs that)."""
        return self.pretrained(s, x, cond)

    # --- transitions (Eq. E4) ------------------------------------------------------------------
    # t0, t1 are RL times: floats for a whole batch, or tensors of shape (B,) with one time per sample
    # (minibatches of transitions drawn from different steps).
    def coefficients(self, t0, t1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, std) of the kernel's Gaussian transition N(a x + b mu, std^2 I) from RL time t0 to t1."""
        a, b, std = step_coefficients(self.path, t0, t1, self.eta, self.action_noise, self.kernel)
        if not torch.all(std > 0):
            raise ValueError(f"the {self.kernel} kernel adds no noise on a step from RL time {float(as_time(t0).min())} "
                             f"to {float(as_time(t1).max())} (diffusion time 0 under ddim): end the grid before the data")
        return a, b, std

    def transition_std(self, t0, t1) -> torch.Tensor:
        """Std of the transition from RL time t0 to t1 (Eq. E4 for `em`)."""
        return self.coefficients(t0, t1)[2]

    def kappa(self, t) -> torch.Tensor:
        """kappa(t) = (1 + eta^2)^2 / (8 eta^2) g(T - t)^2 (Eq. E6); eta > 0 only."""
        return kappa(self.path, t, self.eta)

    def transition(self, t0, t1, x: torch.Tensor, cond=None, s_pre: torch.Tensor | None = None):
        """(mean, std, mu, s_pre) of the Gaussian transition from RL time t0 to t1; pass `s_pre` (the
        pretrained score at (t0, x), e.g. cached in a Trajectory) to skip the pretrained model."""
        s0 = self.path.T - as_time(t0)
        if s_pre is None and self.reference:
            s_pre = self.pretrained_score(s0, x, cond)
        mu = self.score(s0, x, cond, s_pre=s_pre)
        a, b, std = self.coefficients(t0, t1)
        return coef_like(a, x) * x + coef_like(b, mu) * mu.to(x.dtype), std.to(x), mu, s_pre

    def kl(self, t0, t1, mu: torch.Tensor, s_pre: torch.Tensor) -> torch.Tensor:
        """Per-step KL ||mean - mean_pre||^2 / (2 std^2) = ||b (mu - s_pre)||^2 / (2 std^2), without
        cancellation, (B,); for `em` with eta > 0 this is kappa(t0) ||mu - s_pre||^2 dt (Eq. E6). Differentiable in mu.
        Zero where the reference is not evaluated (s_pre None)."""
        if s_pre is None:
            return torch.zeros(mu.shape[0], dtype=mu.dtype, device=mu.device)
        _, b, std = self.coefficients(t0, t1)
        return 0.5 * _sum((coef_like(b / std, mu) * (mu - s_pre)) ** 2)

    def log_prob(self, t0, t1, x: torch.Tensor, x_next: torch.Tensor, cond=None) -> torch.Tensor:
        """log pi_theta(x_next | x) under the CURRENT parameters: re-scores stored transitions, (B,)."""
        mean, std, _, _ = self.transition(t0, t1, x, cond)
        return gaussian_log_prob(x_next, mean, std)

    def step(self, t0, t1, x: torch.Tensor, cond=None, *,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """Draw X_{k+1} = mean + std z, z ~ N(0, I), with its log-prob, per-step KL and Tweedie x0_hat."""
        mean, std, mu, s_pre = self.transition(t0, t1, x, cond)
        if noise is None:
            noise = draw_normal(x, generator)
        x_next = mean + coef_like(std, x) * noise
        log_prob = gaussian_log_prob(x_next, mean, std)
        log_ratio = torch.zeros_like(log_prob)
        if s_pre is not None:
            a, b, _ = self.coefficients(t0, t1)
            mean_pre = coef_like(a, x) * x + coef_like(b, x) * s_pre.to(x.dtype)
            log_ratio = log_prob - gaussian_log_prob(x_next, mean_pre, std)
        return StepOutput(x_next=x_next, mean=mean, std=std, noise=noise, log_prob=log_prob,
                          kl=self.kl(t0, t1, mu, s_pre), log_ratio=log_ratio,
                          x0_hat=self.path.tweedie(mu, self.path.T - as_time(t0), x), s_pre=s_pre)

    def rollout(self, x_init: torch.Tensor, ts: torch.Tensor, cond=None, *, generator: torch.Generator | None = None,
                grad: bool = False, chunk: int | None = None, draw: Callable | None = None) -> Trajectory:
        """Roll the policy out from X_0 = x_init (RL time ts[0]) over the grid ts.

        With grad=False (collection for policy-gradient methods) nothing is recorded for autograd. `chunk`:
        samples per forward pass; the chunks advance step by step together and each step's noise is drawn
        once for the batch, so the chunk size never changes the result. `draw(x) -> z`: a step's standard
        normal draws (default `draw_normal` from `generator`; data-parallel training draws the whole batch's)."""
        ts = check_grid(self.path, ts)
        n = x_init.shape[0]
        chunk = chunk or n
        steps, xs = [], [x_init]
        with torch.set_grad_enabled(grad):
            x = x_init
            for k in range(len(ts) - 1):
                z = draw(x) if draw is not None else draw_normal(x, generator)
                parts = [self.step(float(ts[k]), float(ts[k + 1]), x[i:i + chunk],
                                   None if cond is None else cond[i:i + chunk], noise=z[i:i + chunk])
                         for i in range(0, n, chunk)]
                steps.append({name: _join([getattr(p, name) for p in parts])
                              for name in ("x_next", "noise", "log_prob", "kl", "log_ratio", "x0_hat", "s_pre")})
                x = steps[-1]["x_next"]
                xs.append(x)

        def stack(name):
            return None if steps[0][name] is None else torch.stack([s[name] for s in steps])

        return Trajectory(xs=torch.stack(xs), ts=ts, log_probs=stack("log_prob"), kls=stack("kl"),
                          log_ratios=stack("log_ratio"), x0_hats=stack("x0_hat"), noises=stack("noise"),
                          cond=cond, pre_scores=stack("s_pre"))

    def rescore(self, traj: Trajectory) -> torch.Tensor:
        """log-probs (K, B) of a stored trajectory's transitions under the current parameters."""
        out = []
        for k in range(traj.steps):
            s_pre = None if traj.pre_scores is None else traj.pre_scores[k]
            mean, std, _, _ = self.transition(float(traj.ts[k]), float(traj.ts[k + 1]), traj.xs[k], traj.cond, s_pre)
            out.append(gaussian_log_prob(traj.xs[k + 1], mean, std))
        return torch.stack(out)


def draw_normal(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, drawn on the generator's device and moved to x's: the same seed gives the same
    noise on every device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _join(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return parts[0] if len(parts) == 1 or parts[0] is None else torch.cat(parts)


def _sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension."""
    return v.reshape(v.shape[0], -1).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over each sample's dimensions, shape (B,); std is () or (B,)."""
    n = x[0].numel()
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return -_sum((x - mean) ** 2) / (2 * std**2) - n * (torch.log(std) + 0.5 * math.log(2 * math.pi))
