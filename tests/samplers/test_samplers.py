"""Samplers: convergence orders against the exact Gaussian flow map, strong order of Euler-Maruyama,
the data law, grids and bad input. Grids are in RL time t; scores take diffusion time s = T - t."""

import math

import pytest
import torch
from conftest import FAMILIES, build_path
from helpers import Z, assert_close_mc, cov_se, mean_se, pair_slopes, sampler_chain_law, slope

from scoreaction.models import GaussianScore
from scoreaction.samplers import GRIDS, SOLVERS, BrownianNoise, get_solver, make_grid
from scoreaction.samplers.euler_maruyama import drift
from scoreaction.samplers.grids import check_grid

STEPS = [16, 32, 64, 128, 256]


def exact_flow(path, m, S, x, s_from: float, s_to: float) -> torch.Tensor:
    """Exact probability-flow map for data N(m, S): in S's eigenbasis (S = U diag(lam) U^T),
    (x - alpha(s) m) / sqrt(alpha(s)^2 lam + sigma(s)^2) is constant along the flow.

    (Sigma_s = alpha^2 lam + sigma^2 obeys Sigma_s' = 2 (log alpha)' Sigma_s + g2, so
    d/ds log sqrt(Sigma_s) = (log alpha)' + g2 / (2 Sigma_s), which is the linear ODE's rate.)"""
    lam, U = torch.linalg.eigh(S)
    a0, v0 = float(path.alpha(s_from)), max(float(path.sigma2(s_from)), 0.0)
    a1, v1 = float(path.alpha(s_to)), max(float(path.sigma2(s_to)), 0.0)
    z = (x - a0 * m) @ U / torch.sqrt(a0**2 * lam + v0)
    return a1 * m + (z * torch.sqrt(a1**2 * lam + v1)) @ U.T


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).reshape(a.shape[0], -1).sum(-1).mean().sqrt())


@pytest.fixture
def setup(vp, gaussian_data):
    m, S = gaussian_data
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return vp, m, S, GaussianScore(vp, m, S), x


@pytest.mark.parametrize("name", list(SOLVERS))
def test_declared_stochasticity_and_default_eta_hold(setup, name):
    """`stochastic` solvers draw noise at eta > 0 (two generators, two answers); the others refuse eta != 0;
    at `default_eta` every solver is deterministic exactly when its default is 0. (ORDER is measured by the
    convergence tests below.)"""
    vp, m, S, score, x = setup
    ts = make_grid("uniform", vp, 8)
    solver = get_solver(name)

    def run(eta, seed):
        return solver.sample(vp, score, x, ts, eta=eta, generator=torch.Generator().manual_seed(seed))

    if solver.stochastic:
        assert not torch.equal(run(1.0, 0), run(1.0, 1))
        assert torch.equal(run(0.0, 0), run(0.0, 1))
    else:
        with pytest.raises(ValueError, match="needs eta = 0"):
            run(1.0, 0)
    same = torch.equal(run(solver.default_eta, 0), run(solver.default_eta, 1))
    assert same == (solver.default_eta == 0.0)
    assert solver.name == name and get_solver(name) is solver


def test_exact_flow_solves_the_probability_flow_ode(setup):
    """The reference itself: d/dt of the exact flow (central differences) equals the ODE drift (Eq. E3, eta=0)."""
    path, m, S, score, x = setup
    for s in [0.9, 0.5, 0.1, 0.01]:
        h = 1e-5
        xs = exact_flow(path, m, S, x, path.T, s)
        dxdt = (exact_flow(path, m, S, x, path.T, s - h) - exact_flow(path, m, S, x, path.T, s + h)) / (2 * h)
        torch.testing.assert_close(dxdt, drift(path, s, xs, score(s, xs), 0.0), rtol=1e-6, atol=1e-6)


def _ode_errors(path, m, S, score, x, name, steps, s_end=0.0):
    ref = exact_flow(path, m, S, x, path.T, s_end)
    errors = []
    for K in steps:
        ts = torch.linspace(0.0, path.T - s_end, K + 1, dtype=torch.float64)
        errors.append(rms(SOLVERS[name].sample(path, score, x, ts, eta=0.0), ref))
    return errors


@pytest.mark.parametrize("name, lo, hi", [("heun", 1.7, 2.4), ("ddim", 0.8, 1.3), ("em", 0.8, 1.3)])
def test_ode_order_on_vp_uniform_grid(setup, name, lo, hi):
    path, m, S, score, x = setup
    errors = _ode_errors(path, m, S, score, x, name, STEPS)
    order = slope(STEPS, errors)
    assert lo <= order <= hi, (name, errors, order)
    # every halving of the step, not only the fit: a perturbed Heun weight (0.45, 0.55), first order
    # with a small constant, still fits a slope of 2.3 over 16..256 but has a pair slope of 2.7
    assert all(lo <= p <= hi for p in pair_slopes(STEPS, errors)), (name, errors, pair_slopes(STEPS, errors))
    assert errors[-1] < 0.01  # converges to the right answer, not merely at the right rate
    assert round(order) == SOLVERS[name].order


def test_dpm2_order_away_from_sigma_zero(setup):
    """DPM-Solver++(2S) is second order in the log-SNR step. On a uniform t grid that stops at
    s = 0.02 (where lambda is finite) the log-SNR steps shrink with dt and the order is 2."""
    path, m, S, score, x = setup
    steps = STEPS[:4]
    errors = _ode_errors(path, m, S, score, x, "dpm2", steps, s_end=0.02)
    order = slope(steps, errors)
    assert 1.7 <= order <= 2.4, (errors, order)
    assert all(1.7 <= p <= 2.4 for p in pair_slopes(steps, errors)), errors


@pytest.mark.slow
def test_dpm2_order_on_logsnr_grid(setup):
    """On DPM-Solver's own grid (uniform in log-SNR, stopping at s = 1e-3 T, grids.logsnr with
    to_zero=False) the order is 2, measured against the exact flow to s = 1e-3 T."""
    from scoreaction.samplers.grids import logsnr

    path, m, S, score, x = setup
    steps = STEPS[:4]
    ref = exact_flow(path, m, S, x, path.T, 1e-3 * path.T)
    errors = [rms(SOLVERS["dpm2"].sample(path, score, x, logsnr(path, K, to_zero=False), eta=0.0), ref) for K in steps]
    assert 1.7 <= slope(steps, errors) <= 2.4, errors
    assert all(1.7 <= p <= 2.4 for p in pair_slopes(steps, errors)), errors


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known limitation, documented in dpm_solver.py: ORDER = 2 is the order in the log-SNR step. On "
    "make_grid('uniform') (ends at s = 0) on VP the last step into sigma = 0 is a DDIM step with error "
    "O(sigma(s_{K-1})^2) = O(beta_min dt), and the last interior steps have log-SNR increments "
    "1/2 log((k+1)/k) that do not shrink with dt: observed order 1.6 falling towards 1; use grid='logsnr'"))
def test_dpm2_order_on_vp_uniform_grid(setup):
    path, m, S, score, x = setup
    steps = STEPS[:4]
    errors = _ode_errors(path, m, S, score, x, "dpm2", steps)  # pair slopes 1.59, 1.59, 1.52 (then 1.41, 1.29)
    assert 1.7 <= slope(steps, errors) <= 2.4, errors


def test_em_strong_order_one(setup):
    """Euler-Maruyama (eta = 1) has strong order 1 under additive noise: coarse runs on sub-grids of a
    2048-step grid see the same Brownian path (BrownianNoise); the reference is EM on the fine grid."""
    path, _, _, score, _ = setup
    n, fine = 400, 2048
    gen = torch.Generator().manual_seed(7)
    x = path.prior_sample((n, 2), generator=gen, dtype=torch.float64)
    ts = make_grid("uniform", path, fine)
    noise = BrownianNoise(ts, (n, 2), generator=gen)
    ref = SOLVERS["em"].sample(path, score, x, ts, eta=1.0, noise_sampler=noise)
    steps = STEPS[:4]  # 16..128: sub-grids with at least 16 fine steps each
    errors = [rms(SOLVERS["em"].sample(path, score, x, ts[::fine // K], eta=1.0, noise_sampler=noise), ref)
              for K in steps]
    order = slope(steps, errors)
    assert 0.8 <= order <= 1.2, (errors, order)
    # with independent noise the "error" would not shrink at all: the coupling is what is measured
    indep = SOLVERS["em"].sample(path, score, x, ts[::fine // 128], eta=1.0, generator=gen)
    assert rms(indep, ref) > 10 * errors[-1]


def test_brownian_noise_increments():
    ts = make_grid("uniform", build_path("vp"), 64)
    noise = BrownianNoise(ts, (20_000, 3), generator=torch.Generator().manual_seed(1))
    z = noise(float(ts[8]), float(ts[40]))
    assert z.shape == (20_000, 3) and z.dtype == torch.float64
    mean, se = mean_se(z.reshape(-1, 1))
    assert_close_mc(mean, 0.0, se, what="mean of z")
    var, var_se = cov_se(z.reshape(-1, 1))
    assert_close_mc(var, 1.0, var_se, what="variance of z")
    # additivity: sqrt(dt) z over [t8, t40] is the sum of the increments over [t8, t20] and [t20, t40]
    dW = lambda a, b: noise(float(ts[a]), float(ts[b])) * math.sqrt(float(ts[b] - ts[a]))
    torch.testing.assert_close(dW(8, 40), dW(8, 20) + dW(20, 40), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only points of its fine grid, found t=0.5001"):
        noise(0.5001, float(ts[-1]))


# --- the data law ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, eta, K", [
    pytest.param("em", 1.0, 500, marks=pytest.mark.slow),
    pytest.param("em", 0.5, 500, marks=pytest.mark.slow),  # every eta has the data's marginals (Eq. E3); eta = 0.5 tells 1 + eta^2 from 1 + eta
    pytest.param("ddim", 1.0, 1000, marks=pytest.mark.slow),  # first order with a large constant
    ("heun", 0.0, 30),
    ("dpm2", 0.0, 60),  # (its first-order end game, see the xfail above, needs more steps than heun)
])
def test_solvers_reproduce_data_moments(setup, name, eta, K):
    """From the prior N(0, I), every solver's output has the data's mean and covariance within
    4 SE + an allowance. The allowance is the exact deviation from N(m, S) of the law of the K-step
    chain (all four solvers are affine in (x, noise) for Gaussian data, so that law is computed
    exactly from the per-step maps); it covers discretisation and the prior mismatch alpha(T) > 0,
    and is itself required to be below 0.01."""
    path, m, S, score, _ = setup
    n = 20_000
    gen = torch.Generator().manual_seed(11)
    x = path.prior_sample((n, 2), generator=gen, dtype=torch.float64)
    ts = make_grid("uniform", path, K)
    out = SOLVERS[name].sample(path, score, x, ts, eta=eta, generator=gen)
    chain_mean, chain_cov = sampler_chain_law(SOLVERS[name].sample, path, score, ts, 2, eta,
                                              torch.zeros(2), torch.eye(2))
    m_hat, m_se = mean_se(out)
    c_hat, c_se = cov_se(out)
    # the discrete chain is simulated correctly ...
    assert_close_mc(m_hat, chain_mean, m_se, what=f"{name} mean vs chain")
    assert_close_mc(c_hat, chain_cov, c_se, what=f"{name} cov vs chain")
    # ... and its law is close to the data law
    bias_m, bias_c = (chain_mean - m).abs(), (chain_cov - S).abs()
    assert bias_m.max() < 0.01 and bias_c.max() < 0.01, (bias_m, bias_c)
    assert_close_mc(m_hat, m, m_se, bias_m, what=f"{name} mean")
    assert_close_mc(c_hat, S, c_se, bias_c, what=f"{name} cov")
    # discrimination: a 10 % error in any covariance entry's scale would be rejected
    assert torch.all(Z * c_se + bias_c < 0.1 * S.diag().min())


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_noise_is_eta_times_the_posterior_std(vp, gaussian_data, eta):
    """DDIM's injected noise c satisfies c^2 = eta^2 Var[x_{s1} | x_{s0}, x_0], the DDPM posterior variance
    sigma1^2 (1 - (alpha0 sigma1 / (alpha1 sigma0))^2), and c^2 / (eta^2 g^2 dt) -> 1 as dt -> 0, so eta
    is the eta of Eq. E3 (any c in [0, sigma1] keeps the marginals: moments alone cannot tell)."""
    m, S = gaussian_data
    score = GaussianScore(vp, m, S)
    for s0, dt in [(0.5, 0.05), (0.5, 1e-4), (0.9, 1e-4), (0.05, 1e-4)]:
        s1 = s0 - dt
        ts = torch.tensor([vp.T - s0, vp.T - s1], dtype=torch.float64)
        z = torch.ones(1, 2, dtype=torch.float64)
        x0 = torch.zeros(1, 2, dtype=torch.float64)
        outs = [SOLVERS["ddim"].sample(vp, score, x0, ts, eta=eta, noise_sampler=lambda t0, t1, v=v: v) for v in (z, 0 * z)]
        c = (outs[0] - outs[1])[0]
        a0, a1, sg0, sg1 = (float(f(v)) for f in (vp.alpha, vp.sigma) for v in (s0, s1))
        post_var = sg1**2 * (1 - (a0 * sg1 / (a1 * sg0)) ** 2)
        torch.testing.assert_close(c**2, torch.full((2,), eta**2 * post_var, dtype=torch.float64), rtol=1e-9, atol=0)
        if dt < 1e-3:
            # relative error O(dt / s0 + beta dt) <= 2e-3 + 2e-3
            assert float(c[0]) ** 2 / (eta**2 * float(vp.g2(s0)) * dt) == pytest.approx(1.0, abs=0.01)


# --- every solver on every family ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_on_every_family(family, name, gaussian_data):
    """Deterministic runs (eta = 0) from the prior land within 5 % (rms, relative) of the exact flow map
    on a uniform grid: 50 steps for second-order solvers, 400 for first-order ones (Euler on VE is
    13 % off with 100 steps and 3.4 % with 400: sigma = 0.01 * 5000^s spans 50 down to 0.01).
    (Regression: on cosine, ddim and dpm2 returned nan through sigma(0) = nan.)"""
    path, (m, S) = build_path(family), gaussian_data
    x = path.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact_flow(path, m, S, x, path.T, 0.0)
    steps = 50 if SOLVERS[name].order == 2 else 400
    out = SOLVERS[name].sample(path, GaussianScore(path, m, S), x, make_grid("uniform", path, steps), eta=0.0)
    assert rms(out, ref) < 0.05 * rms(ref, torch.zeros_like(ref)), rms(out, ref)


# --- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, eta", [("em", 1.0), ("em", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("heun", 0.0),
                                       ("dpm2", 0.0)])
def test_images_match_flattened_points(vp, name, eta):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    score = GaussianScore(vp, torch.randn(16, generator=g, dtype=torch.float64), A @ A.T / 16 + 0.1 * torch.eye(16))
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    ts = make_grid("uniform", vp, 12)
    flat = SOLVERS[name].sample(vp, score, x, ts, eta=eta, generator=torch.Generator().manual_seed(3))
    img = SOLVERS[name].sample(vp, score, x.reshape(5, 1, 4, 4), ts, eta=eta, generator=torch.Generator().manual_seed(3))
    assert img.shape == (5, 1, 4, 4)
    torch.testing.assert_close(img.reshape(5, 16), flat, rtol=1e-12, atol=1e-12)


def test_callback_sees_every_step(vp, gaussian_data):
    m, S = gaussian_data
    seen = []
    ts = make_grid("uniform", vp, 7)
    for name in SOLVERS:
        seen.clear()
        SOLVERS[name].sample(vp, GaussianScore(vp, m, S), torch.zeros(3, 2, dtype=torch.float64), ts, eta=0.0,
                             callback=seen.append)
        assert [info["k"] for info in seen] == list(range(7))
        assert [info["t"] for info in seen] == pytest.approx(ts[:-1].tolist())
        assert [info["s"] for info in seen] == pytest.approx((vp.T - ts[:-1]).tolist())


# --- grids ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_grids_are_valid(family, grid):
    """Regression at 50 steps: edm used to space r = sigma/alpha down to r(0) = 0, so on vp/discrete
    (sigma^2 ~ s) its last times were T - 1e-21 == T in float64 from 40 steps on."""
    path = build_path(family)
    for steps in [1, 2, 5, 50]:
        ts = make_grid(grid, path, steps, generator=torch.Generator().manual_seed(steps))
        assert ts.dtype == torch.float64 and ts.shape == (steps + 1,)
        assert float(ts[0]) == 0.0 and float(ts[-1]) == pytest.approx(path.T, abs=1e-15)
        assert torch.all(ts.diff() > 0), (grid, steps, ts)
        torch.testing.assert_close(check_grid(path, ts), ts)


def test_grid_shapes(vp):
    K = 10
    s_quad = vp.T - make_grid("quadratic", vp, K)
    torch.testing.assert_close(s_quad, vp.T * (1 - torch.arange(K + 1, dtype=torch.float64) / K) ** 2)
    ve = build_path("ve")  # r(0) = sigma_min > 0: K steps uniform in r^(1/7) from r(T) to r(0)
    r = ve.noise_ratio(ve.T - make_grid("edm", ve, K)) ** (1 / 7)
    torch.testing.assert_close(r.diff(), r.diff()[0].expand(K), rtol=1e-8, atol=1e-10)
    # vp reaches r = 0: K - 1 steps uniform in r^(1/7) from r(T) down to EDM's r_min = 2e-3, then to the data
    s_edm = vp.T - make_grid("edm", vp, K)
    r = vp.noise_ratio(s_edm[:-1]) ** (1 / 7)
    torch.testing.assert_close(r.diff(), r.diff()[0].expand(K - 1), rtol=1e-8, atol=1e-10)
    assert float(r[-1]) ** 7 == pytest.approx(2e-3, rel=1e-8) and float(s_edm[-1]) == 0.0
    # logsnr: K - 1 steps uniform in lambda from s = T to s = 1e-3 T, then to the data
    s_log = vp.T - make_grid("logsnr", vp, K)
    lam = vp.log_snr(s_log[:-1])
    torch.testing.assert_close(lam.diff(), lam.diff()[0].expand(K - 1), rtol=1e-8, atol=1e-10)
    assert float(s_log[-2]) == pytest.approx(1e-3 * vp.T, rel=1e-12) and float(s_log[-1]) == 0.0
    rnd = make_grid("random", vp, K, generator=torch.Generator().manual_seed(0))
    k = torch.arange(1, K, dtype=torch.float64)
    assert torch.all((rnd[1:-1] - k / K).abs() <= 0.5 / K)  # stratified: one point per cell


def test_random_grid_reproducible_and_fresh(vp):
    a = make_grid("random", vp, 20, generator=torch.Generator().manual_seed(5))
    b = make_grid("random", vp, 20, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    first, second = make_grid("random", vp, 20, generator=g), make_grid("random", vp, 20, generator=g)
    assert (first - second).abs().max() > 1e-3
    assert (make_grid("random", vp, 20, generator=torch.Generator().manual_seed(6)) - a).abs().max() > 1e-3


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "4"])
def test_bad_step_counts(vp, grid, steps):
    with pytest.raises(ValueError, match=rf"steps must be a positive integer, found {steps!r}"):
        make_grid(grid, vp, steps)


def test_unknown_names(vp):
    with pytest.raises(ValueError) as err:
        make_grid("linear", vp, 5)
    assert "'linear'" in str(err.value) and all(f"'{g}'" in str(err.value) for g in GRIDS)
    with pytest.raises(ValueError) as err:
        get_solver("euler")
    assert "'euler'" in str(err.value) and all(f"'{s}'" in str(err.value) for s in SOLVERS)


@pytest.mark.parametrize("name", ["heun", "dpm2"])
def test_ode_solvers_reject_noise(vp, gaussian_data, name):
    m, S = gaussian_data
    with pytest.raises(ValueError, match=rf"{name} .*needs eta = 0, found eta = 0.5"):
        SOLVERS[name].sample(vp, GaussianScore(vp, m, S), torch.zeros(2, 2), make_grid("uniform", vp, 4), eta=0.5)


def test_stochastic_solvers_reject_bad_eta(vp, gaussian_data):
    m, S = gaussian_data
    score, ts = GaussianScore(vp, m, S), make_grid("uniform", vp, 4)
    with pytest.raises(ValueError, match=r"eta must be >= 0, found -0.1"):
        SOLVERS["em"].sample(vp, score, torch.zeros(2, 2), ts, eta=-0.1)
    with pytest.raises(ValueError, match=r"0 <= eta <= 1.*found 1.5"):
        SOLVERS["ddim"].sample(vp, score, torch.zeros(2, 2), ts, eta=1.5)


@pytest.mark.parametrize("ts, match", [
    ([0.0, 0.5, 0.4, 1.0], "strictly increasing"),
    ([0.0, 0.5, 0.5, 1.0], "strictly increasing"),
    ([1.0, 0.5, 0.0], "strictly increasing"),
    ([0.0, 1.5], r"must lie in \[0, T=1.0\], found \[0.0, 1.5\]"),
    ([-0.1, 1.0], r"must lie in \[0, T=1.0\]"),
    ([0.5], "at least 2 points, found shape \\(1,\\)"),
    ([[0.0, 1.0]], "1-D"),
])
def test_check_grid_rejects_bad_grids(vp, ts, match):
    with pytest.raises(ValueError, match=match):
        check_grid(vp, torch.tensor(ts, dtype=torch.float64))
    for name in SOLVERS:  # every solver validates its grid
        with pytest.raises(ValueError, match=match):
            SOLVERS[name].sample(vp, lambda s, x, c: x, torch.zeros(2, 2), torch.tensor(ts), eta=0.0)
