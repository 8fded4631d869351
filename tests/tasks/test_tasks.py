"""Tasks with exact references: the Gaussian tilt (Eq. E21) and the Gaussian mixture (Eqs. E8, E22).
log_phi and the optimal action take diffusion time s; rollouts take RL time t = T - s."""

import math

import pytest
import torch
from helpers import (
    Z,
    assert_close_mc,
    cov_se,
    expected_quadratic_reward,
    mean_se,
    policy_chain_law,
    weighted_cov_se,
    weighted_mean_se,
)

from scoreaction.policy import ScoreAsAction
from scoreaction.samplers import BrownianNoise, make_grid
from scoreaction.tasks import TASKS, make_task, tilt

GAUSS4 = {  # a user-supplied 4-d problem with beta_kl = 0.5 on a short VP path: alpha(T) = 0.59, so X_T
    # depends on X_0 (not memoryless) and the K K^T terms of Eq. E21 matter (with the default VP,
    # alpha(T) = 0.0066 and they are ~1e-5)
    "dim": 4, "beta_kl": 0.5, "path_options": {"beta_max": 2.0},
    "mean": [0.5, -0.5, 1.0, 0.0],
    "cov": [[0.6, 0.2, 0.0, 0.1], [0.2, 0.5, 0.1, 0.0], [0.0, 0.1, 0.4, -0.1], [0.1, 0.0, -0.1, 0.7]],
    "reward_matrix": [[1.0, 0.3, 0.0, 0.0], [0.3, 0.8, 0.0, 0.2], [0.0, 0.0, 0.5, 0.0], [0.0, 0.2, 0.0, 1.2]],
    "target": [1.0, 0.0, -1.0, 0.5],
}
GAUSSIAN_CONFIGS = [pytest.param({}, id="gaussian-2d-default"), pytest.param(GAUSS4, id="gaussian-4d-custom")]


def as_time(v):
    return torch.as_tensor(v, dtype=torch.float64)


# --- the optimal action (E21) ---------------------------------------------------------------------

@pytest.mark.parametrize("options", GAUSSIAN_CONFIGS)
def test_optimal_action_closed_form(options):
    """a* - s_pre = -K_s^T Q_s (m + K_s (x - a_s m) - y), K_s = a_s S (a_s^2 S + sigma_s^2 I)^{-1},
    C_s = S - a_s K_s S, Q_s = B (I + C_s B)^{-1}, B = A / beta_KL (Eq. E21, sigma_s^2 for 1 - a_s^2)."""
    task = make_task("gaussian", options)
    d = task.shape[0]
    m, S = task.pretrained.means[0], task.pretrained.covs[0]
    B, y, eye = task.reward.A / task.beta_kl, task.reward.y, torch.eye(d, dtype=torch.float64)
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    for s in [0.0, 0.05, 0.3, 0.7, 1.0]:
        a, sig2 = float(task.path.alpha(s)), float(task.path.sigma2(s))
        K = a * S @ torch.linalg.inv(a**2 * S + sig2 * eye)
        C = S - a * K @ S
        Q = B @ torch.linalg.inv(eye + C @ B)
        resid = m + (x - a * m) @ K.T - y
        expected = -torch.einsum("ji,jk,bk->bi", K, Q, resid)
        torch.testing.assert_close(task.optimal_score(s, x) - task.pretrained(s, x), expected, rtol=1e-9, atol=1e-10)
    # at s = 0 the correction is grad r / beta_KL
    x0 = x.clone().requires_grad_(True)
    (grad_r,) = torch.autograd.grad(task.reward(x0).sum(), x0)
    torch.testing.assert_close(task.optimal_score(0.0, x) - task.pretrained(0.0, x), grad_r / task.beta_kl)


# --- exact samplers and references -------------------------------------------------------------------

@pytest.mark.parametrize("options", GAUSSIAN_CONFIGS)
def test_gaussian_exact_samples_match_reference(options):
    task = make_task("gaussian", options)
    ref = task.reference()
    n, gen = 100_000, torch.Generator().manual_seed(1)
    for sampler, key in [(task.sample_pre, "p_pre"), (task.sample_optimal, "p_star")]:
        x = sampler(n, generator=gen)
        m_hat, m_se = mean_se(x)
        c_hat, c_se = cov_se(x)
        assert_close_mc(m_hat, ref[f"{key}_mean"], m_se, what=f"{key} mean")
        assert_close_mc(c_hat, ref[f"{key}_cov"], c_se, what=f"{key} cov")
        r = task.reward(x)
        r_key = "E_pre_r" if key == "p_pre" else "E_star_r"
        assert_close_mc(r.mean(), ref[r_key], r.std() / math.sqrt(n), what=r_key)
    # the two laws are far apart compared with the tolerance, so the check discriminates
    assert (as_time(ref["p_pre_mean"]) - as_time(ref["p_star_mean"])).abs().max() > 20 * Z * m_se.max()
    assert ref["J_star"] > ref["E_pre_r"] and ref["KL_star"] > 0
    assert ref["J_star"] == pytest.approx(ref["E_star_r"] - task.beta_kl * ref["KL_star"], rel=1e-12)


@pytest.mark.parametrize("options", GAUSSIAN_CONFIGS)
def test_gaussian_j_star_mc_matches_closed_form(options):
    """J* = beta E[log phi(0, X_0)] by Monte Carlo (tilt.log_phi) against the closed form of Eq. E21."""
    task = make_task("gaussian", options)
    j, se = task.j_star_mc(100_000, seed=3)
    assert_close_mc(j, task.reference()["J_star"], se, what="J*")
    assert Z * se < 0.02 * abs(task.reference()["J_star"] - task.reference()["E_pre_r"])


@pytest.mark.parametrize("name, options", [("gaussian", GAUSS4), ("mixture", {})])
def test_log_phi_against_nested_monte_carlo(name, options):
    """phi(s, x) = E[exp(r(X_data) / beta) | X_s = x] (Eq. E8) estimated from exact posterior draws at a few
    (s, x): |log mean(e) - log_phi| <= 4 SE, SE = std(e) / (mean(e) sqrt(N)) (delta method)."""
    task = make_task(name, options)
    gen = torch.Generator().manual_seed(4)
    N = 50_000
    for s in [task.path.T, 0.3 * task.path.T]:
        xs = torch.randn(4, *task.shape, generator=gen, dtype=torch.float64) * 1.2
        for x in xs:
            draws = tilt.sample_posterior(task.pretrained, s, x.expand(N, -1).contiguous(), generator=gen)
            e = torch.exp(task.reward(draws) / task.beta_kl)
            est, se = float(torch.log(e.mean())), float(e.std() / (e.mean() * math.sqrt(N)))
            assert_close_mc(est, float(task.log_phi(s, x[None])), se, what=f"log phi({s}, {x.tolist()})")


def test_posterior_sampler_is_consistent_with_the_data():
    """Draw data, noise it to X_s, draw the posterior given X_s: the result is distributed as the data."""
    task = make_task("mixture")
    model, n, gen = task.pretrained, 100_000, torch.Generator().manual_seed(5)
    data = model.sample_data(n, generator=gen)
    x_s = task.path.marginal(data, 0.4, torch.randn(data.shape, generator=gen, dtype=torch.float64))
    post = tilt.sample_posterior(model, 0.4, x_s, generator=gen)
    fresh = model.sample_data(n, generator=gen)
    for stat in (mean_se, cov_se):
        (a, se_a), (b, se_b) = stat(post), stat(fresh)
        assert_close_mc(a, b, torch.sqrt(se_a**2 + se_b**2), what=stat.__name__)


def test_mixture_optimal_law_by_importance_weighting():
    """dP*/dP^pre = exp(r(X_T)/beta) / phi(0, X_0) (Eq. E8): reweighting pretrained pairs (X_0 ~ prior,
    X_T ~ pretrained posterior) reproduces the exact p* sampler's moments; the mean weight is 1."""
    task = make_task("mixture")
    n, gen = 200_000, torch.Generator().manual_seed(6)
    x0 = task.prior_sample(n, generator=gen, dtype=torch.float64)
    x_T = tilt.sample_posterior(task.pretrained, task.path.T, x0, generator=gen)
    w = torch.exp(task.reward(x_T) / task.beta_kl - task.log_phi(task.path.T, x0))
    assert_close_mc(w.mean(), 1.0, w.std() / math.sqrt(n), what="mean weight")
    exact = task.sample_optimal(n, generator=gen)
    (m_w, m_w_se), (m_e, m_e_se) = weighted_mean_se(x_T, w), mean_se(exact)
    (c_w, c_w_se), (c_e, c_e_se) = weighted_cov_se(x_T, w), cov_se(exact)
    m_tol = torch.sqrt(m_w_se**2 + m_e_se**2)
    assert_close_mc(m_w, m_e, m_tol, what="p* mean")
    assert_close_mc(c_w, c_e, torch.sqrt(c_w_se**2 + c_e_se**2), what="p* cov")
    # discrimination: the unweighted (pretrained) moments are rejected by the same tolerance
    assert ((x_T.mean(0) - m_e).abs() > Z * m_tol).all()


def test_mixture_reference_and_j_star_consistency():
    task = make_task("mixture")
    ref = task.compute_reference(n=50_000, seed=0)
    j, se = task.j_star_mc(50_000, seed=0)
    assert (ref["J_star"], ref["J_star_se"]) == (j, se)
    # j_star_mc is beta * the mean of log phi(0, X_0) over prior draws, with an honest standard error
    gen = torch.Generator().manual_seed(0)
    vals = task.beta_kl * task.log_phi(task.path.T, task.prior_sample(50_000, generator=gen, dtype=torch.float64))
    assert j == pytest.approx(float(vals.mean()), rel=1e-12)
    assert se == pytest.approx(float(vals.std()) / math.sqrt(50_000), rel=1e-12)
    j2, se2 = task.j_star_mc(50_000, seed=1)  # an independent estimate agrees
    assert_close_mc(j2, j, math.hypot(se, se2), what="J* across seeds")
    # the optimum beats the pretrained model, and KL(P* || P^pre) > 0
    assert ref["J_star"] - ref["E_pre_r"] > Z * math.hypot(ref["J_star_se"], ref["E_pre_r_se"])
    assert ref["KL_star"] > 0


# --- simulating the optimal action -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("options", GAUSSIAN_CONFIGS)
def test_gaussian_optimal_action_attains_j_star(options):
    """Roll out a* (eta = 1) and the pretrained policy. J_hat = mean(r(X_T) - beta path_kl) matches J*,
    and X_T's moments match p* (resp. p_pre, E_pre[r]), within 4 SE + the exact discretisation bias of
    the K-step chain (linear-Gaussian: its law and E[path KL] are propagated exactly). The pretrained
    policy's J is rejected by the J* tolerance."""
    task = make_task("gaussian", options)
    ref, d, beta = task.reference(), task.shape[0], task.beta_kl
    A, y = task.reward.A, task.reward.y
    K, n = 200, 4000
    ts = make_grid("uniform", task.path, K)
    optimal = ScoreAsAction(task.path, task.pretrained, action=task.optimal_score, eta=1.0)
    pretrained = ScoreAsAction(task.path, task.pretrained, eta=1.0)
    gen = torch.Generator().manual_seed(7)
    prior_cov = task.path.prior_std**2 * torch.eye(d, dtype=torch.float64)
    tols = {}
    for name, policy, key, j_ref in [("optimal", optimal, "p_star", ref["J_star"]),
                                      ("pretrained", pretrained, "p_pre", ref["E_pre_r"])]:
        traj = policy.rollout(task.prior_sample(n, generator=gen, dtype=torch.float64), ts, generator=gen)
        J = task.reward(traj.x_final) - beta * traj.path_kl
        j_hat, j_se = float(J.mean()), float(J.std() / math.sqrt(n))
        c_mean, c_cov, c_kl = policy_chain_law(policy, ts, d, torch.zeros(d), prior_cov, reference=pretrained)
        j_chain = expected_quadratic_reward(A, y, c_mean, c_cov) - beta * c_kl
        assert_close_mc(j_hat, j_chain, j_se, what=f"{name}: J vs chain")  # the rollout simulates the chain
        bias_j = abs(j_chain - j_ref)
        assert bias_j < 0.03 * abs(ref["J_star"] - ref["E_pre_r"]), (name, bias_j)  # small next to the gap
        assert_close_mc(j_hat, j_ref, j_se, bias_j, what=f"{name}: J")
        tols[name] = (j_hat, Z * j_se + bias_j)
        m_hat, m_se = mean_se(traj.x_final)
        c_hat, c_se = cov_se(traj.x_final)
        assert_close_mc(m_hat, ref[f"{key}_mean"], m_se, (c_mean - as_time(ref[f"{key}_mean"])).abs(), what=f"{name} mean")
        assert_close_mc(c_hat, ref[f"{key}_cov"], c_se, (c_cov - as_time(ref[f"{key}_cov"])).abs(), what=f"{name} cov")
        if name == "pretrained":
            assert torch.all(traj.kls == 0)
    # discrimination: the pretrained policy's J is far outside the J* tolerance
    assert abs(tols["pretrained"][0] - ref["J_star"]) > 10 * tols["optimal"][1]


@pytest.mark.slow
def test_mixture_optimal_action_attains_p_star_and_j_star():
    """Roll out a* = s_pre + grad log phi (autograd) on the mixture task. Runs with 100 and 200 steps share
    one Brownian path per sample (BrownianNoise), so J_100 - J_200 estimates the first-order bias of
    J_200 with little noise; allowance = 2 |J_100 - J_200| + 4 SE of that difference. Same for the mean."""
    task = make_task("mixture")
    ref = task.compute_reference(n=100_000, seed=1)
    n, fine = 2000, 200
    gen = torch.Generator().manual_seed(8)
    x_init = task.prior_sample(n, generator=gen, dtype=torch.float64)
    ts = make_grid("uniform", task.path, fine)
    noise = BrownianNoise(ts, (n, 2), generator=gen)
    policy = ScoreAsAction(task.path, task.pretrained, action=task.optimal_score, eta=1.0)

    def run(grid):
        x, kl = x_init, torch.zeros(n, dtype=torch.float64)
        for k in range(len(grid) - 1):
            t0, t1 = float(grid[k]), float(grid[k + 1])
            out = policy.step(t0, t1, x, noise=noise(t0, t1))
            x, kl = out.x_next, kl + out.kl
        return task.reward(x) - task.beta_kl * kl, x

    (J_c, x_c), (J_f, x_f) = run(ts[::2]), run(ts)
    j_hat, j_se = float(J_f.mean()), float(J_f.std() / math.sqrt(n))
    diff = J_c - J_f
    allow_j = 2 * abs(float(diff.mean())) + Z * float(diff.std() / math.sqrt(n))
    assert allow_j < 0.1 * (ref["J_star"] - ref["E_pre_r"]), allow_j
    assert_close_mc(j_hat, ref["J_star"], math.hypot(j_se, ref["J_star_se"]), allow_j, what="J")
    dx = x_c - x_f
    allow_m = 2 * dx.mean(0).abs() + Z * dx.std(0) / math.sqrt(n)
    m_hat, m_se = mean_se(x_f)
    star_se = torch.sqrt(torch.diag(as_time(ref["p_star_cov"])) / ref["n_mc"])
    assert_close_mc(m_hat, ref["p_star_mean"], torch.sqrt(m_se**2 + star_se**2), allow_m, what="p* mean")
    # discrimination: the pretrained law and value are rejected by the same tolerances
    assert abs(ref["E_pre_r"] - ref["J_star"]) > 5 * (Z * j_se + allow_j)
    assert ((as_time(ref["p_pre_mean"]) - as_time(ref["p_star_mean"])).abs() > Z * m_se + allow_m).any()


# --- bad input -----------------------------------------------------------------------------------

def test_task_registry():
    assert {"gaussian", "mixture"} <= set(TASKS)
    for name in ["gaussian", "mixture"]:
        task = make_task(name)
        assert task.name == name and task.shape == (2,)
        assert task.prior_sample(3).shape == (3, 2)


@pytest.mark.parametrize("name, options, match", [
    ("nope", None, r"task must be one of \[.*'gaussian', 'mixture'.*\], found 'nope'"),
    ("gaussian", {"sigma": 1.0}, r"unknown option 'sigma' for task 'gaussian'; expected one of \[.*'dim'.*\]"),
    ("mixture", {"dim": 3}, r"unknown option 'dim' for task 'mixture'; expected one of \[.*'means'.*\]"),
    ("gaussian", {"cov": [[1.0, 2.0], [2.0, 1.0]]}, r"positive definite, found smallest eigenvalue -1"),
    ("gaussian", {"cov": [1.0, 2.0, 3.0]}, r"cov must be a number, 2 numbers or a \(2, 2\) matrix, found shape \(3,\)"),
    ("gaussian", {"reward_matrix": [[1.0, 0.5], [0.0, 1.0]]}, r"reward_matrix must be symmetric, found an asymmetric"),
    ("gaussian", {"reward_matrix": [[1.0, 0.0], [0.0, -1.0]]}, r"positive semi-definite, found smallest eigenvalue -1"),
    ("gaussian", {"mean": [0.0, 1.0, 2.0]}, r"mean must be a number or a list of 2 numbers, found shape \(3,\)"),
    ("gaussian", {"target": [0.0] * 3, "dim": 4}, r"target must be a number or a list of 4 numbers, found shape \(3,\)"),
    ("gaussian", {"dim": 0}, r"dim must be a positive integer, found 0"),
    ("gaussian", {"beta_kl": -1.0}, r"beta_kl must be a number >= 0, found -1.0"),
    ("gaussian", {"eta": -0.5}, r"eta must be a number >= 0, found -0.5"),
    ("gaussian", {"path": "nope"}, r"path must be one of .*found 'nope'"),
    ("mixture", {"covs": [0.1, 0.1]}, r"covs must list 3 covariances \(one per mean\), found 2"),
    ("mixture", {"weights": [0.5, 0.5]}, r"weights must be a number or a list of 3 numbers, found shape \(2,\)"),
    ("mixture", {"weights": [0.5, 0.5, -0.1]}, r"mixture weights must be positive, found"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, options)


@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_zero_beta_kl_has_no_tilt(name):
    task = make_task(name, {"beta_kl": 0.0})
    x = torch.zeros(2, 2, dtype=torch.float64)
    assert task.reference() is None  # no tilt, so no reference
    for call in (task.compute_reference, lambda: task.log_phi(0.5, x), lambda: task.optimal_score(0.5, x),
                 lambda: task.sample_optimal(3), lambda: task.j_star_mc(10)):
        with pytest.raises(ValueError, match=r"needs beta_kl > 0, found 0.0"):
            call()
    task.sample_pre(3)  # the pretrained law needs no tilt


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_prior_sample_rejects_bad_counts(n):
    with pytest.raises(ValueError, match=rf"positive integer, found {n!r}"):
        make_task("gaussian").prior_sample(n)


@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_x0_residual_is_the_score_residual_times_the_posterior_gain(name):
    """residual: x0 reads the MLP's output as K_s net (models.residual.posterior_gain), K_s for the data's mean
    variance per dimension; the optimal correction of E21 is K_s times a field that stays bounded in the noise."""
    from scoreaction.models.residual import posterior_gain

    score, x0 = (make_task(name, {"residual": r}).make_action() for r in ("score", "x0"))
    task = make_task(name, {"residual": "x0"})
    torch.nn.init.normal_(score.net.head.weight, generator=torch.Generator().manual_seed(0))
    x0.load_state_dict(score.state_dict())
    data = task.pretrained.sample_data(200_000, generator=torch.Generator().manual_seed(1))
    assert x0.data_var == pytest.approx(float(data.var(0).mean()), rel=0.02)
    x = task.prior_sample(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    score.double(), x0.double()
    for s in (0.0, 0.5, 1.0):
        s_pre = task.pretrained(s, x)
        torch.testing.assert_close(x0(s, x) - s_pre, posterior_gain(task.path, s, x0.data_var) * (score(s, x) - s_pre))
    assert float(posterior_gain(task.path, 0.0, 0.5)) == pytest.approx(1.0)
    # E21: grad log phi = -K_s^T Q_s (...) fades in the noise as K_s does (K_s -> alpha(T) v): over K_s it stays O(1)
    g = make_task("gaussian", {"cov": 0.5})  # S = 0.5 I: K_s of E21 is posterior_gain(s, 0.5) I
    xs = torch.tensor([[-2.0, 1.0], [0.0, 0.0], [1.5, -0.5]], dtype=torch.float64)
    ratios = [(g.optimal_score(s, xs) - g.pretrained(s, xs)) / posterior_gain(g.path, s, 0.5) for s in (0.0, 0.5, 1.0)]
    assert all(0.3 < float(r.abs().max()) < 4 for r in ratios)  # while K_s itself falls from 1 to 0.003
    with pytest.raises(ValueError, match="residual must be one of"):
        make_task("gaussian", {"residual": "eps"})
