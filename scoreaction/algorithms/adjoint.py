"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025, arXiv 2409.08861), Eq. E20: regress the control onto the
lean adjoint along the policy's own rollouts; the fixed point is the optimum of Eq. E5 (E8 for eta = 1).

Clock: RL time t. Notation, for step k of a rollout on the stored grid t_0 < ... < t_K (any grid):
    X_{k+1} = a_k X_k + b_k mu + std_k z_k      the kernel's Gaussian step (`policy.coefficients`); for `em` with
                                                eta = 1: a_k = 1 - (d log alpha/ds) dt_k, b_k = g^2 dt_k,
                                                std_k = g sqrt(dt_k)
    F_k(x) = a_k x + b_k s_pre(T - t_k, x, c)   the mean of the PRETRAINED step (the base drift, discretised)
    v_k = b_k (mu - s_pre) / std_k              the control in units of the step's noise: the per-step KL of Eq. E6 is
                                                |v_k|^2 / 2; for `em` with eta = 1, v_k = sqrt(dt_k) u with
                                                u = g (mu - s_pre) the paper's control
    atilde_k                                    the lean adjoint at X_k (a stop-gradient function of the rollout)

Maximising E5 is the control problem  min E[ sum_k |v_k|^2 / 2 - r(X_K) / beta_KL ]. Per batch (`prepare`):

1. Lean adjoint, backwards along each stored rollout, one vector-Jacobian product of the pretrained score per step:
       atilde_K = -grad r(X_K) / beta_KL,        atilde_k = (dF_k / dx (X_k))^T atilde_{k+1}
                = a_k atilde_{k+1} + b_k (d s_pre / dx (X_k))^T atilde_{k+1},       k = K-1, ..., 1.
   It never involves the fine-tuned network (the "lean" adjoint), so one pass serves every epoch.
2. Loss (`loss`), a mean over samples of
       L = sum_k | v_k(X_k) + std_k atilde_{k+1} |^2
         = sum_k (b_k / std_k)^2 | mu(X_k) - [s_pre(X_k) - (std_k^2 / b_k) atilde_{k+1}] |^2,
   a regression of the action mu at (t_k, X_k) onto the target s_pre - (std_k^2 / b_k) atilde_{k+1} (for `em` with
   eta = 1: weight g^2 dt_k, target s_pre - atilde_{k+1}), whose conditional mean at the optimum is
   a* = s_pre + grad log phi (Eq. E8).

Why this is a fixed point, exactly for the discretised problem (E5 as `Batch.objective` measures it): the pathwise
derivative of the cost with respect to v_k is v_k + std_k A_{k+1}, A the full adjoint of the controlled chain, so the
optimal v_k is -std_k E[A_{k+1} | X_k]; and A_j = (dF_j/dx)^T A_{j+1} + (dv_j/dx)^T (v_j + std_j A_{j+1}), whose last
term has conditional mean zero at the optimum, so E[A_j | X_j] = E[atilde_j | X_j] there (by induction from j = K):
the regression's fixed point is the optimal action on the rollout grid, for any grid and any kernel with noise
(eta > 0). For `em` with eta = 1 this is the memoryless setting of the paper (alpha(T) ~ 0.006 on the default VP
path), whose optimum is the tilt of Eq. E8.

What follows the paper and what differs:
- The lean adjoint and the loss are those of the paper's Algorithm 1 in our notation, with sigma = g and the reward
  scaled by 1 / beta_KL (the paper's reward multiplier is 1 / beta_KL here).
- Discretisation: the paper integrates the lean adjoint ODE with Euler steps backwards whose Jacobian is taken at the
  later point, atilde_{t-h} = atilde_t + h (grad_x b(X_t, t))^T atilde_t, and matches u(X_t) to -sigma atilde_t. We
  use the exact discrete adjoint of the kernel's step (Jacobian at X_k, where the rollout already evaluated s_pre)
  and match the control of step k to the adjoint of the state it moves, atilde_{k+1}. The two agree to first order
  in dt; ours has the fixed point above on any grid, never evaluates the score at the data end (s = 0, where image
  scores are ill-conditioned), and needs K - 1 vector-Jacobian products, not K. On the gaussian task with K = 20 the
  conditional mean of our target s_pre - atilde_{k+1} is within a relative squared error of 0.005 of a* at t = T/2,
  that of s_pre - atilde_k (the adjoint of the step's start) 0.09.
- Weighting: the paper sums |u + sigma atilde|^2 over a uniform grid; the sum above carries dt_k (through
  v_k and std_k), so non-uniform and random grids weigh each step by its length.
- Time subsampling (`steps_per_sample`, off by default), to cut the cost of the loss on large models as the paper's
  image runs do with a subset of the steps: a fresh uniform draw of that many steps per sample and epoch, the sum
  rescaled by K / steps_per_sample (unbiased).
- The paper's rollouts use its memoryless noise schedule for flow models; here the rollouts are the trainer's own
  (the policy's kernel and eta), which for VP and eta = 1 is that schedule.
Requires a differentiable reward, beta_KL > 0 and eta > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch
from scoreaction.config import check_nonnegative_int
from scoreaction.paths import coef_like


@dataclass
class AdjointConfig(AlgorithmConfig):
    lr: float = 3e-3  # gaussian d = 2, 200 updates: 3e-4: 0.979, 1e-3: 0.989, 3e-3: 0.989, 1e-2: 0.985 closed
    epochs: int = 1
    minibatches: int = 4
    steps_per_sample: int = 0  # steps of each sample in the loss, drawn afresh each epoch; 0: all of them

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative_int("steps_per_sample", self.steps_per_sample)


@dataclass
class LeanAdjoints:
    """Whole samples of a batch with their lean adjoints (the algorithm's unit): rollouts `idx` of `batch`.

    adjoints: (K, B, ...) atilde_1..atilde_K; s_pre: (K, B, ...) the pretrained score at X_0..X_{K-1};
    steps: (B, m) the steps of each sample in the loss, or None for all."""

    batch: Batch
    adjoints: torch.Tensor
    s_pre: torch.Tensor
    idx: torch.Tensor
    steps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def samples(self) -> int:
        return len(self.idx)

    def select(self, i: torch.Tensor) -> "LeanAdjoints":
        return LeanAdjoints(self.batch, self.adjoints, self.s_pre, self.idx[i],
                            None if self.steps is None else self.steps[i])


class AdjointMatching(Algorithm):
    name = "adjoint"
    Config = AdjointConfig
    unit = "sample"
    needs_reference = True

    def __init__(self, policy, task, config: AdjointConfig):
        super().__init__(policy, task, config)
        if not getattr(task.reward, "differentiable", False):
            raise ValueError(f"adjoint needs a differentiable reward, found {type(task.reward).__name__}")
        if not task.beta_kl > 0:
            raise ValueError(f"adjoint needs beta_kl > 0 (its terminal adjoint is -grad r / beta_kl), "
                             f"found {task.beta_kl}")
        if not policy.eta > 0:
            raise ValueError(f"adjoint needs rollouts with noise, eta > 0, found eta = {policy.eta}")

    # --- step 1: the lean adjoint, backwards along each rollout -----------------------------------------------------
    def lean_adjoints(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(atilde_1..atilde_K, s_pre at X_0..X_{K-1}), both (K, B, ...), without gradients."""
        traj, policy = batch.traj, self.policy
        K, cond = traj.steps, traj.cond
        adjoints, s_pre = [None] * K, [None] * K
        with torch.enable_grad():
            x = traj.x_final.detach().requires_grad_(True)
            (grad_r,) = torch.autograd.grad(self.task.reward(x, cond).sum(), x)
            adjoint = -grad_r / self.beta_kl
            for k in range(K - 1, -1, -1):
                adjoints[k] = adjoint
                t0, t1 = float(traj.ts[k]), float(traj.ts[k + 1])
                x = traj.xs[k].detach().requires_grad_(k > 0)
                score = policy.pretrained_score(policy.path.T - t0, x, cond)
                s_pre[k] = score.detach()
                if k > 0:
                    a, b, _ = policy.coefficients(t0, t1)
                    (vjp,) = torch.autograd.grad(score, x, grad_outputs=adjoint.to(score.dtype))
                    adjoint = coef_like(a, x) * adjoint + coef_like(b, x) * vjp.to(x.dtype)
        return torch.stack(adjoints).detach(), torch.stack(s_pre)

    def prepare(self, batch: Batch, generator=None):
        adjoints, s_pre = self.lean_adjoints(batch)
        norms = adjoints.flatten(2).norm(dim=-1)
        metrics = {"adjoint_norm_first": float(self.world.gather(norms[0]).mean()),  # atilde_1
                   "adjoint_norm_last": float(self.world.gather(norms[-1]).mean())}  # atilde_K = -grad r / beta
        return LeanAdjoints(batch, adjoints, s_pre, torch.arange(len(batch.rewards))), metrics

    def minibatches(self, data: LeanAdjoints, generator=None):
        """Per epoch: the steps each sample contributes (all, or a fresh draw of `steps_per_sample`), then the
        minibatches of samples."""
        K, m = data.batch.traj.steps, self.config.steps_per_sample
        if 0 < m < K:  # a uniform m-subset per sample: the order of normal draws (the whole batch's, as rollouts)
            draws = self.world.draw(torch.empty(len(data), K, dtype=torch.float64), generator)
            data = LeanAdjoints(data.batch, data.adjoints, data.s_pre, data.idx, draws.argsort(-1)[:, :m])
        yield from super().minibatches(data, generator)

    # --- step 2: the adjoint-matching regression --------------------------------------------------------------------
    def loss(self, policy, mb: LeanAdjoints):
        traj, idx = mb.batch.traj, mb.idx
        n, K = len(idx), traj.steps
        steps = torch.arange(K).expand(n, K) if mb.steps is None else mb.steps  # (n, m)
        m = steps.shape[1]
        k, j = steps.reshape(-1), idx.repeat_interleave(m)  # one item per (sample, step), sample-major
        x, adjoint, s_pre = traj.xs[k, j], mb.adjoints[k, j], mb.s_pre[k, j]
        cond = None if traj.cond is None else traj.cond[j]
        ts = traj.ts.to(torch.float64)
        _, b, std = policy.coefficients(ts[k], ts[k + 1])
        mu = policy.score(policy.path.T - ts[k], x, cond, s_pre=s_pre)
        control = coef_like(b / std, x) * (mu - s_pre).to(x.dtype)  # v_k
        residual = control + coef_like(std, x) * adjoint  # v_k + std_k atilde_{k+1}
        per_sample = residual.pow(2).reshape(n, -1).sum(-1) * (K / m)
        return per_sample.mean(), {}
