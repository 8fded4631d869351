"""The score-as-action policy (Eqs. E3-E6): transitions, log-probs, per-step and path KL, rollouts.
Transitions and rollouts take RL time t; scores take diffusion time s = T - t."""

import math

import numpy as np
import pytest
import torch
from helpers import Z, policy_chain_law
from scipy.integrate import solve_ivp
from torch import nn

from scoreaction.models import GaussianScore, NetworkScore
from scoreaction.policy import ScoreAsAction, StepOutput, Trajectory
from scoreaction.samplers import SOLVERS, make_grid

M1, S1 = [0.0, 0.0], [[1.0, 0.3], [0.3, 0.5]]
M2, S2 = [1.0, -0.5], [[0.6, -0.1], [-0.1, 0.8]]


class Residual(nn.Module):
    """mu_theta(s, x) = s_pre(s, x) + MLP([x, s]): a trainable action with non-zero weights."""

    def __init__(self, pretrained, dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.pretrained = pretrained
        self.net = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim)).double()

    def forward(self, s, x, cond=None):
        s_col = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.pretrained(s, x) + self.net(torch.cat([x.reshape(x.shape[0], -1), s_col], -1)).reshape(x.shape)


@pytest.fixture
def pretrained(vp):
    return GaussianScore(vp, M1, S1)


def _x(n=64, d=2, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


ETAS = [(1.0, 0.0), (0.5, 0.0), (0.0, 0.3)]  # (eta, action_noise)


# --- log-probs and ratios ------------------------------------------------------------------------

@pytest.mark.parametrize("eta, action_noise", ETAS)
def test_rescore_on_policy_gives_ratio_one(vp, pretrained, eta, action_noise):
    policy = ScoreAsAction(vp, pretrained, action=Residual(pretrained, 2), eta=eta, action_noise=action_noise)
    ts = make_grid("uniform", vp, 20)
    traj = policy.rollout(_x(), ts, generator=torch.Generator().manual_seed(2))
    logp = policy.rescore(traj)
    assert logp.shape == traj.log_probs.shape == (20, 64)
    torch.testing.assert_close(logp, traj.log_probs, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.exp(logp - traj.log_probs), torch.ones_like(logp), rtol=0, atol=1e-12)
    with torch.no_grad():
        policy.action.net[2].weight.add_(0.05)
    diff = policy.rescore(traj) - traj.log_probs
    assert diff.abs().max() > 1e-3  # the ratio now moves away from 1


@pytest.mark.parametrize("eta, action_noise", ETAS)
def test_log_prob_is_the_gaussian_transition_density(vp, pretrained, eta, action_noise):
    """log N(x_next; x + [-f + (1 + eta^2)/2 g^2 mu] dt, std^2 I), std as in Eq. E4, computed by hand."""
    action = Residual(pretrained, 2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=eta, action_noise=action_noise)
    t0, t1 = 0.3, 0.35
    s0, dt = vp.T - t0, t1 - t0
    x, x_next = _x(), _x(seed=2)
    with torch.no_grad():
        mu = action(s0, x)
    g2 = float(vp.g2(s0))
    mean = x + (-float(vp.dlog_alpha(s0)) * x + 0.5 * (1 + eta**2) * g2 * mu) * dt
    std = eta * math.sqrt(g2 * dt) if eta > 0 else 0.5 * g2 * dt * action_noise
    assert policy.transition_std(t0, t1) == pytest.approx(std, rel=1e-12)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob(t0, t1, x, x_next), expected, rtol=1e-12, atol=1e-10)
        out = policy.step(t0, t1, x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, StepOutput)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(out.x_next, mean + std * z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x0_hat, vp.tweedie(mu, s0, x), rtol=1e-12, atol=1e-12)


# --- KL ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.5, 2.0])
def test_per_step_kl(vp, pretrained, eta):
    """kl_k = kappa(t) ||mu - s_pre||^2 dt (Eq. E6), kappa = (1 + eta^2)^2 / (8 eta^2) g(T - t)^2, and equals
    KL( N(mean, std^2 I) || N(mean_pre, std^2 I) ) between the two transitions."""
    action = GaussianScore(vp, M2, S2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=eta)
    reference = ScoreAsAction(vp, pretrained, eta=eta)
    x = _x()
    for t0, t1 in [(0.0, 0.01), (0.5, 0.52), (0.97, 1.0)]:
        s0, dt = vp.T - t0, t1 - t0
        kappa = (1 + eta**2) ** 2 / (8 * eta**2) * float(vp.g2(s0))
        assert policy.kappa(t0) == pytest.approx(kappa, rel=1e-12)
        if eta == 1.0:
            assert kappa == pytest.approx(0.5 * float(vp.g2(s0)), rel=1e-12)
        out = policy.step(t0, t1, x, generator=torch.Generator().manual_seed(0))
        by_hand = kappa * ((action(s0, x) - pretrained(s0, x)) ** 2).sum(-1) * dt
        torch.testing.assert_close(out.kl, by_hand, rtol=1e-10, atol=1e-14)
        mean_pre, std_pre, _, _ = reference.transition(t0, t1, x)
        assert std_pre == out.std
        kl_gauss = torch.distributions.kl_divergence(torch.distributions.Normal(out.mean, out.std),
                                                     torch.distributions.Normal(mean_pre, std_pre)).sum(-1)
        torch.testing.assert_close(out.kl, kl_gauss, rtol=1e-6, atol=1e-12)
        assert float(by_hand.min()) > 0


@pytest.mark.parametrize("eta, action_noise", ETAS)
def test_step_noise_and_log_ratio(vp, pretrained, eta, action_noise):
    """x_next = mean + std z with the stored z; log_ratio = log N(x_next; mean, std^2) - log N(x_next; mean_pre,
    std^2) by hand; and its mean over the noise is the per-step KL (a one-sample KL estimate): 4 SE."""
    action = GaussianScore(vp, M2, S2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=eta, action_noise=action_noise)
    reference = ScoreAsAction(vp, pretrained, eta=eta, action_noise=action_noise)
    t0, t1 = 0.6, 0.62
    n = 50_000
    x = _x(1).expand(n, 2).contiguous()
    out = policy.step(t0, t1, x, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out.x_next, out.mean + out.std * out.noise, rtol=1e-14, atol=1e-14)
    mean_pre = reference.transition(t0, t1, x)[0]
    by_hand = (torch.distributions.Normal(out.mean, out.std).log_prob(out.x_next).sum(-1)
               - torch.distributions.Normal(mean_pre, out.std).log_prob(out.x_next).sum(-1))
    torch.testing.assert_close(out.log_ratio, by_hand, rtol=1e-9, atol=1e-9)
    kl, se = float(out.kl[0]), float(out.log_ratio.std()) / math.sqrt(n)
    assert abs(float(out.log_ratio.mean()) - kl) <= Z * se
    assert kl > 4 * Z * se  # discriminates: a KL off by a factor 2 (or 0) would be rejected


def test_cached_pretrained_scores_change_nothing_but_the_cost(vp, pretrained):
    """A residual action given the rollout's cached s_pre re-scores exactly as one that recomputes it,
    and does not call the pretrained model again."""
    from scoreaction.models.residual import point_action

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, s, x, cond=None):
            self.calls += 1
            return self.inner(s, x, cond)

    counted = Counting(pretrained)
    action = point_action(counted, 2).double()
    torch.nn.init.normal_(action.net.head.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    policy = ScoreAsAction(vp, counted, action=action)
    traj = policy.rollout(_x(), make_grid("uniform", vp, 8), generator=torch.Generator().manual_seed(3))
    assert traj.pre_scores.shape == traj.xs[:-1].shape and counted.calls == 8  # once per step, not twice
    for k in range(8):
        torch.testing.assert_close(traj.pre_scores[k], pretrained(vp.T - traj.ts[k], traj.xs[k]), rtol=0, atol=1e-14)
    counted.calls = 0
    cached = policy.rescore(traj)
    assert counted.calls == 0
    uncached = policy.rescore(Trajectory(**{**vars(traj), "pre_scores": None}))
    assert counted.calls == 8
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-12)
    torch.testing.assert_close(cached, traj.log_probs, rtol=0, atol=1e-12)


def test_trajectory_noises_and_log_ratios(vp, pretrained):
    policy = ScoreAsAction(vp, pretrained, action=GaussianScore(vp, M2, S2), eta=0.7)
    ts = make_grid("random", vp, 9, generator=torch.Generator().manual_seed(0))
    traj = policy.rollout(_x(), ts, generator=torch.Generator().manual_seed(1))
    assert traj.noises.shape == traj.x0_hats.shape == (9, 64, 2) and traj.log_ratios.shape == (9, 64)
    for k in range(9):
        mean, std, _, _ = policy.transition(float(ts[k]), float(ts[k + 1]), traj.xs[k])
        torch.testing.assert_close(traj.xs[k + 1], mean + std * traj.noises[k], rtol=1e-13, atol=1e-13)
    z = traj.noises.reshape(-1)
    assert abs(float(z.mean())) < Z / math.sqrt(len(z)) and abs(float(z.var()) - 1) < Z * math.sqrt(2 / len(z))


def test_per_sample_times(vp, pretrained):
    """Transitions with one (t0, t1) per sample, shape (B,), equal the scalar-time transitions row by row."""
    policy = ScoreAsAction(vp, pretrained, action=Residual(pretrained, 2), eta=0.5)
    x, x_next = _x(5), _x(5, seed=2)
    t0 = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.97], dtype=torch.float64)
    t1 = t0 + torch.tensor([0.01, 0.05, 0.02, 0.03, 0.03], dtype=torch.float64)
    with torch.no_grad():
        mean, std, mu, s_pre = policy.transition(t0, t1, x)
        logp = policy.log_prob(t0, t1, x, x_next)
        kl = policy.kl(t0, t1, mu, s_pre)
        assert std.shape == (5,)
        for i in range(5):
            row = policy.transition(float(t0[i]), float(t1[i]), x[i:i + 1])
            torch.testing.assert_close(mean[i:i + 1], row[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(std[i], row[1].reshape(()), rtol=1e-12, atol=0)
            torch.testing.assert_close(logp[i:i + 1], policy.log_prob(float(t0[i]), float(t1[i]), x[i:i + 1],
                                                                      x_next[i:i + 1]), rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(kl[i:i + 1], policy.kl(float(t0[i]), float(t1[i]), row[2], row[3]),
                                       rtol=1e-12, atol=1e-14)


def test_pretrained_network_is_frozen_and_not_a_parameter(vp, pretrained):
    """A pretrained network is a frozen reference: not in policy.parameters() nor the state dict, no
    gradient into its weights, but s_pre stays differentiable in x."""
    class EpsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

        def forward(self, x, t):
            return self.f(torch.cat([x, t[:, None]], -1))

    net = EpsNet()
    pre = NetworkScore(net, vp, prediction="eps")
    action = Residual(pretrained, 2)
    policy = ScoreAsAction(vp, pre, action=action, eta=1.0)
    assert {id(p) for p in policy.parameters()} == {id(p) for p in action.parameters()}
    assert all(k.startswith("action.") for k in policy.state_dict())
    assert not any(p.requires_grad for p in net.parameters())
    x = _x(4).requires_grad_(True)
    (grad,) = torch.autograd.grad(policy.pretrained_score(0.5, x).sum(), x)
    assert grad.abs().sum() > 0


def test_per_step_kl_with_action_noise(vp, pretrained):
    """eta = 0: the KL between the action Gaussians N(mu, sigma_a^2) and N(s_pre, sigma_a^2)."""
    action = GaussianScore(vp, M2, S2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=0.0, action_noise=0.3)
    x = _x()
    out = policy.step(0.5, 0.52, x)
    torch.testing.assert_close(out.kl, ((action(0.5, x) - pretrained(0.5, x)) ** 2).sum(-1) / (2 * 0.3**2),
                               rtol=1e-10, atol=1e-14)


def test_pretrained_policy_has_zero_kl_and_matches_em(vp, pretrained):
    """Playing the pretrained score: KL exactly 0, and the rollout is the Euler-Maruyama sampler (same noise)."""
    for eta in [1.0, 0.5]:
        policy = ScoreAsAction(vp, pretrained, eta=eta)
        ts = make_grid("uniform", vp, 25)
        traj = policy.rollout(_x(), ts, generator=torch.Generator().manual_seed(4))
        assert torch.all(traj.kls == 0)
        em = SOLVERS["em"].sample(vp, pretrained, _x(), ts, eta=eta, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(traj.x_final, em, rtol=1e-12, atol=1e-12)


def exact_path_kl(path, m1, S1, m2, S2) -> float:
    """KL(P^theta || P^pre) for eta = 1 (Eq. E6) between the reverse SDEs playing the exact scores of
    N(m2, S2) (policy) and N(m1, S1) (pretrained), from the prior N(0, I).

    In RL time the controlled SDE is linear, dX = (F X + b) dt + g dB with F = -(log alpha)' I - g2 P2,
    b = g2 alpha P2 m2, P_i = (alpha^2 S_i + sigma^2 I)^{-1}; its mean M and covariance C obey
    M' = F M + b, C' = F C + C F^T + g2 I. With mu - s_pre = D X + e (D = P1 - P2, e = alpha (P2 m2 - P1 m1))
    the KL is int_0^T g2/2 (|D M + e|^2 + tr(D C D^T)) dt. Solved with DOP853 at rtol 1e-10."""
    m1, S1, m2, S2 = (np.asarray(v, dtype=np.float64) for v in (m1, S1, m2, S2))
    d, eye = len(m1), np.eye(len(m1))

    def rhs(t, y):
        s = path.T - t
        a, v = float(path.alpha(s)), float(path.sigma2(s))
        dla, g2 = float(path.dlog_alpha(s)), float(path.g2(s))
        P1, P2 = np.linalg.inv(a * a * S1 + v * eye), np.linalg.inv(a * a * S2 + v * eye)
        F, b = -dla * eye - g2 * P2, g2 * a * P2 @ m2
        D, e = P1 - P2, a * (P2 @ m2 - P1 @ m1)
        M, C = y[:d], y[d:d + d * d].reshape(d, d)
        r = D @ M + e
        return np.concatenate([F @ M + b, (F @ C + C @ F.T + g2 * eye).ravel(),
                               [0.5 * g2 * (r @ r + np.trace(D @ C @ D.T))]])

    y0 = np.concatenate([np.zeros(d), eye.ravel(), [0.0]])
    sol = solve_ivp(rhs, (0.0, path.T), y0, method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.success
    return float(sol.y[-1, -1])


@pytest.mark.slow
def test_path_kl_matches_closed_form(vp, pretrained):
    """MC mean of traj.path_kl (eta = 1, 400 steps) against the exact continuous path KL.

    Allowance: the exact expected path KL of the K-step chain (a linear-Gaussian recursion, computed by
    propagating mean and covariance) minus the continuous value, i.e. the discretisation bias. It must
    shrink from 200 to 400 steps (first order: about halve), and the MC must match the chain to 4 SE."""
    action = GaussianScore(vp, M2, S2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=1.0)
    reference = ScoreAsAction(vp, pretrained, eta=1.0)
    exact = exact_path_kl(vp, M1, S1, M2, S2)
    chain = {K: policy_chain_law(policy, make_grid("uniform", vp, K), 2, torch.zeros(2), torch.eye(2),
                                 reference=reference)[2] for K in (200, 400)}
    bias200, bias400 = abs(chain[200] - exact), abs(chain[400] - exact)
    assert bias400 < 0.6 * bias200 and bias400 < 0.01 * exact, (exact, chain)
    n, gen = 10_000, torch.Generator().manual_seed(400)
    traj = policy.rollout(vp.prior_sample((n, 2), generator=gen, dtype=torch.float64), make_grid("uniform", vp, 400),
                          generator=gen)
    mc, se = float(traj.path_kl.mean()), float(traj.path_kl.std() / math.sqrt(n))
    assert abs(mc - chain[400]) <= Z * se, (mc, chain[400], se)
    # the one-sample estimate sum_k log_ratio_k has the same mean (and more noise)
    lr = traj.log_ratios.sum(0)
    assert abs(float(lr.mean()) - chain[400]) <= Z * float(lr.std()) / math.sqrt(n)
    tol = Z * se + bias400
    assert abs(mc - exact) <= tol, (mc, exact, tol)
    # the check discriminates: a factor-2 error (e.g. kappa = g^2 instead of g^2/2) is rejected
    assert tol < 0.25 * exact and exact > 1.0


# --- trajectories --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 4), (6, 1, 2, 2)], ids=["points", "images"])
def test_trajectory_shapes(vp, shape):
    pretrained = GaussianScore(vp, [0.0] * 4, torch.eye(4, dtype=torch.float64) * 0.5)
    policy = ScoreAsAction(vp, pretrained, action=GaussianScore(vp, [1.0] * 4, torch.eye(4, dtype=torch.float64)))
    K = 7
    ts = make_grid("uniform", vp, K)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = policy.rollout(x, ts, generator=torch.Generator().manual_seed(1))
    assert isinstance(traj, Trajectory) and traj.steps == K
    assert traj.xs.shape == (K + 1, *shape) and traj.x0_hats.shape == (K, *shape)
    assert traj.log_probs.shape == traj.kls.shape == (K, 6) and traj.path_kl.shape == (6,)
    torch.testing.assert_close(traj.ts, ts)
    torch.testing.assert_close(traj.xs[0], x, rtol=0, atol=0)
    torch.testing.assert_close(traj.x_final, traj.xs[-1], rtol=0, atol=0)
    torch.testing.assert_close(traj.path_kl, traj.kls.sum(0))
    for k in [0, 3, K - 1]:
        s = vp.T - float(ts[k])
        torch.testing.assert_close(traj.x0_hats[k], vp.tweedie(policy.score(s, traj.xs[k]), s, traj.xs[k]))
    assert traj.to(torch.float32).xs.dtype == torch.float32 and traj.to(torch.float32).ts.dtype == torch.float32


def test_rollout_records_a_graph_only_with_grad(vp, pretrained):
    action = Residual(pretrained, 2)
    policy = ScoreAsAction(vp, pretrained, action=action, eta=1.0)
    assert {id(p) for p in policy.parameters()} == {id(p) for p in action.parameters()}
    ts = make_grid("uniform", vp, 10)
    plain = policy.rollout(_x(), ts, generator=torch.Generator().manual_seed(3))
    for tensor in (plain.xs, plain.log_probs, plain.kls, plain.x0_hats):
        assert not tensor.requires_grad and tensor.grad_fn is None
    traj = policy.rollout(_x(), ts, generator=torch.Generator().manual_seed(3), grad=True)
    torch.testing.assert_close(traj.xs.detach(), plain.xs, rtol=0, atol=0)  # same noise, same path
    (traj.x_final.sum() + traj.path_kl.sum() + traj.log_probs.sum()).backward()
    for name, p in action.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_input(vp, pretrained):
    with pytest.raises(ValueError, match=r"eta must be >= 0, found -0.5"):
        ScoreAsAction(vp, pretrained, eta=-0.5)
    with pytest.raises(ValueError, match=r"eta must be >= 0, found nan"):
        ScoreAsAction(vp, pretrained, eta=float("nan"))
    with pytest.raises(ValueError, match=r"eta = 0 .*needs explicit action noise sigma_a > 0, found 0.0"):
        ScoreAsAction(vp, pretrained, eta=0.0)
    with pytest.raises(ValueError, match=r"action noise sigma_a > 0, found -1"):
        ScoreAsAction(vp, pretrained, eta=0.0, action_noise=-1.0)
    policy = ScoreAsAction(vp, pretrained)
    with pytest.raises(ValueError, match="strictly increasing"):
        policy.rollout(_x(), torch.tensor([0.0, 0.6, 0.5, 1.0]))
