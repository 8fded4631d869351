"""Gaussian paths (Eq. E1) and the parameterisation converters (Eq. E2). Diffusion time s throughout."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, build_path
from helpers import Z
from scipy.integrate import quad, solve_ivp

from scoreaction.paths import PREDICTIONS, VP, Discrete, append_dims, linear_alphas_cumprod, make_path

# Interior times, as fractions of T. For the discrete schedule (N = 1000 steps on [0, 1]) these sit in
# the middle of a step, where log alpha is linear, so central differences of width < 5e-4 are exact.
S_FRACTIONS = [0.1005, 0.3335, 0.5005, 0.9005]


def _fd(fn, s: float, h: float = 1e-6) -> float:
    return (float(fn(s + h)) - float(fn(s - h))) / (2 * h)


# --- (a) coefficients consistent with alpha and sigma ---------------------------------------------

@pytest.mark.parametrize("frac", S_FRACTIONS)
def test_g2_and_derivatives_match_finite_differences_of_alpha_and_sigma(path, frac):
    s = frac * path.T
    dlog_alpha = _fd(lambda u: torch.log(path.alpha(u)), s)
    dsigma2 = _fd(lambda u: path.sigma(u) ** 2, s)
    g2_fd = dsigma2 - 2.0 * dlog_alpha * float(path.sigma(s)) ** 2
    # central differences with h = 1e-6: truncation ~1e-12 f''', round-off ~1e-10; rtol 1e-6 is ample
    assert float(path.dlog_alpha(s)) == pytest.approx(dlog_alpha, rel=1e-6, abs=1e-8)
    assert float(path.dsigma2(s)) == pytest.approx(dsigma2, rel=1e-6, abs=1e-8)
    assert float(path.g2(s)) == pytest.approx(g2_fd, rel=1e-6, abs=1e-8)
    assert float(path.g2(s)) > 0
    assert float(path.g(s)) ** 2 == pytest.approx(float(path.g2(s)), rel=1e-12)
    assert float(path.d_alpha(s)) == pytest.approx(_fd(path.alpha, s), rel=1e-6, abs=1e-8)
    assert float(path.d_sigma(s)) == pytest.approx(_fd(path.sigma, s), rel=1e-6, abs=1e-8)


def test_drift_is_dlog_alpha_times_x(path):
    x = torch.randn(3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = 0.4 * path.T
    torch.testing.assert_close(path.f(s, x), float(path.dlog_alpha(s)) * x, rtol=1e-14, atol=0)


# --- (b) the forward SDE has the marginals of the path ---------------------------------------------

def test_forward_sde_euler_maruyama_reproduces_marginal_moments(path):
    """dx = f ds + g dW from X_0 = x0 + sigma(0) eps (sigma(0) = sigma_min for VE, else 0) has law
    N(alpha(s) x0, sigma(s)^2 I). Euler-Maruyama on a fine grid, compared at s = 0.4 T and 0.8 T.

    Tolerance: 4 SE + the EXACT discretisation bias of the Euler chain, whose moments obey
    m_{k+1} = (1 + f_k ds) m_k and V_{k+1} = (1 + f_k ds)^2 V_k + g2_k ds (deterministic); the bias
    is asserted to be small, so the allowance cannot hide a wrong f or g."""
    gen = torch.Generator().manual_seed(2)
    n, K = 10_000, 1000
    x0 = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    s_end = 0.8 * path.T
    ss = torch.linspace(0.0, s_end, K + 1, dtype=torch.float64)
    ds = float(ss[1] - ss[0])
    dla, g = path.dlog_alpha(ss[:-1]), path.g(ss[:-1])
    sigma2_0 = float(path.sigma2(0.0))
    x = x0 + math.sqrt(sigma2_0) * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    chain_m, chain_v = 1.0, sigma2_0
    checkpoints = {K // 2: None, K: None}
    for k in range(K):
        x = x + float(dla[k]) * x * ds + float(g[k]) * math.sqrt(ds) * torch.randn(n, 4, generator=gen, dtype=torch.float64)
        chain_m, chain_v = (1 + float(dla[k]) * ds) * chain_m, (1 + float(dla[k]) * ds) ** 2 * chain_v + float(g[k]) ** 2 * ds
        if k + 1 in checkpoints:
            checkpoints[k + 1] = (x.clone(), chain_m, chain_v)
    for k, (xk, cm, cv) in checkpoints.items():
        s = float(ss[k])
        alpha, sigma2 = float(path.alpha(s)), float(path.sigma2(s))
        # mean, per coordinate
        mean_se = math.sqrt(sigma2 / n)
        bias_m = abs(cm - alpha) * x0.abs()
        err_m = (xk.mean(0) - alpha * x0).abs()
        assert torch.all(err_m <= Z * mean_se + bias_m), (path.name, s, err_m, mean_se, bias_m)
        # variance, pooled over the 4 independent coordinates
        sq = (xk - xk.mean(0)) ** 2
        var_hat, var_se = float(sq.mean()), float(sq.std() / math.sqrt(sq.numel()))
        bias_v = abs(cv - sigma2)
        assert bias_v < 0.01 * sigma2, (path.name, s, bias_v, sigma2)  # the allowance stays small
        assert abs(var_hat - sigma2) <= Z * var_se + bias_v, (path.name, s, var_hat, sigma2, var_se, bias_v)
        # discrimination: the tolerance rejects a 5 % error in the variance
        assert Z * var_se + bias_v < 0.05 * sigma2
    # ... and at s = 0.4 T a 10 % error in alpha (the mean)
    s_mid = float(ss[K // 2])
    if path.name != "ve":
        assert Z * math.sqrt(float(path.sigma2(s_mid)) / n) < 0.1 * float(path.alpha(s_mid)) * 3.0


def test_sigma_at_zero(path):
    """sigma(0) is sigma_min for VE and exactly 0 otherwise, so log-SNR(0) = +inf and noise_ratio(0) is
    finite; the samplers (ddim, dpm2 test `sigma(s1) == 0`) and the edm grid rely on it. (Regression:
    cosine's log_alpha(0) came out as 1.4e-20, so sigma2(0) < 0 and sigma(0) = nan.)"""
    expected = path.sigma_min if path.name == "ve" else 0.0
    assert float(path.sigma(0.0)) == pytest.approx(expected, abs=1e-15)
    assert float(path.sigma2(0.0)) >= 0.0
    assert float(path.alpha(0.0)) == pytest.approx(1.0, abs=1e-15)
    assert not math.isnan(float(path.log_snr(0.0))) and not math.isnan(float(path.noise_ratio(0.0)))


# --- (c) the variance ODE ------------------------------------------------------------------------

def test_variance_ode_integrates_to_sigma2(path):
    """dV/ds = 2 (d log alpha/ds) V + g2, V(0) = sigma(0)^2, solved to rtol 1e-10, equals sigma(s)^2.

    The discrete schedule's coefficients jump at its N knots, so it is integrated knot to knot."""
    s_end = 0.95 * path.T
    if isinstance(path, Discrete):
        breaks = np.linspace(0.0, path.T, path.N + 1)
        breaks = breaks[breaks <= s_end + 1e-12]
    else:
        breaks = np.linspace(0.0, s_end, 5)

    v = max(float(path.sigma2(0.0)), 0.0)
    for lo, hi in itertools.pairwise(breaks):
        if isinstance(path, Discrete):  # constant coefficients inside a step, read at its middle
            mid = 0.5 * (lo + hi)
            c, g2 = float(path.dlog_alpha(mid)), float(path.g2(mid))

            def rhs(s, v, c=c, g2=g2):
                return [2.0 * c * v[0] + g2]
        else:
            def rhs(s, v):
                return [2.0 * float(path.dlog_alpha(s)) * v[0] + float(path.g2(s))]

        sol = solve_ivp(rhs, (lo, hi), [v], rtol=1e-10, atol=1e-13, method="DOP853")
        assert sol.success
        v = float(sol.y[0, -1])
        assert v == pytest.approx(float(path.sigma2(hi)), rel=1e-7, abs=1e-10), (path.name, hi)


# --- closed forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"beta_min": 0.5, "beta_max": 8.0, "T": 2.0}])
def test_vp_closed_forms(params):
    path = make_path("vp", **params)
    bmin, bmax = path.beta_min, path.beta_max
    beta = lambda s: bmin + s * (bmax - bmin)
    for s in np.linspace(0.0, path.T, 7):
        integral = quad(beta, 0.0, s, epsabs=1e-13)[0]
        alpha = math.exp(-0.5 * integral)
        assert float(path.alpha(s)) == pytest.approx(alpha, rel=1e-12)
        assert float(path.sigma2(s)) == pytest.approx(1.0 - alpha**2, rel=1e-12, abs=1e-15)
        assert float(path.g2(s)) == pytest.approx(beta(s), rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_discrete_schedule_matches_alphas_cumprod(T):
    ac = linear_alphas_cumprod(1000)
    path = Discrete(ac, T=T)
    N = len(ac)
    s = torch.arange(1, N + 1, dtype=torch.float64) / N * T
    np.testing.assert_allclose((path.alpha(s) ** 2).numpy(), ac, rtol=1e-12)
    np.testing.assert_allclose(path.timestep(s).numpy(), np.arange(N), atol=1e-9)
    assert float(path.alpha(0.0)) == 1.0 and float(path.sigma2(0.0)) == 0.0
    # log alpha is linear in s inside each step
    s_mid = (torch.arange(N, dtype=torch.float64) + 0.5) / N * T
    log_ab = np.concatenate([[0.0], np.log(ac)])
    np.testing.assert_allclose(2 * path.log_alpha(s_mid).numpy(), 0.5 * (log_ab[:-1] + log_ab[1:]), rtol=1e-12)


# --- converters (Eq. E2) -------------------------------------------------------------------------

SHAPES = [(5, 3), (5, 2, 3, 3)]


def _times(path, kind: str, batch: int):
    """Mid-step times for the discrete schedule (finite differences must not straddle a kink)."""
    if kind == "scalar":
        return 0.3005 * path.T
    return torch.linspace(0.0505, 0.9505, batch, dtype=torch.float64) * path.T


@pytest.mark.parametrize("shape", SHAPES, ids=["points", "images"])
@pytest.mark.parametrize("time_kind", ["scalar", "per_sample"])
def test_converters_round_trip(path, shape, time_kind):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    score = torch.randn(shape, generator=gen, dtype=torch.float64)
    pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    s = _times(path, time_kind, shape[0])
    for kind in PREDICTIONS:
        back = path.to_score(kind, path.from_score(kind, score, s, x), s, x)
        torch.testing.assert_close(back, score, rtol=1e-10, atol=1e-10)
        again = path.from_score(kind, path.to_score(kind, pred, s, x), s, x)
        torch.testing.assert_close(again, pred, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=["points", "images"])
@pytest.mark.parametrize("time_kind", ["scalar", "per_sample"])
def test_converters_on_the_path(path, shape, time_kind):
    """For x = alpha x0 + sigma eps and score = -eps / sigma: eps, x0 (Tweedie) and the velocity
    d/ds (alpha x0 + sigma eps) = alpha' x0 + sigma' eps come back, with alpha', sigma' by finite differences."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    s = _times(path, time_kind, shape[0])
    s_vec = torch.as_tensor(s, dtype=torch.float64).expand(shape[0])
    col = lambda v: append_dims(torch.as_tensor(v, dtype=torch.float64), len(shape))
    alpha = col([float(path.alpha(float(u))) for u in s_vec])
    sigma = col([float(path.sigma(float(u))) for u in s_vec])
    d_alpha = col([_fd(path.alpha, float(u)) for u in s_vec])
    d_sigma = col([_fd(path.sigma, float(u)) for u in s_vec])
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(path.marginal(x0, s, eps), x, rtol=1e-12, atol=1e-12)
    score = -eps / sigma
    torch.testing.assert_close(path.from_score("eps", score, s, x), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.from_score("x0", score, s, x), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.tweedie(score, s, x), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.from_score("score", score, s, x), score)
    torch.testing.assert_close(path.from_score("velocity", score, s, x), d_alpha * x0 + d_sigma * eps,
                               rtol=1e-6, atol=1e-6)


def test_converters_reject_unknown_kind(vp):
    x = torch.zeros(2, 2, dtype=torch.float64)
    for fn in (vp.to_score, vp.from_score):
        with pytest.raises(ValueError, match=r"one of .*eps.*x0.*score.*velocity.*found 'v'"):
            fn("v", x, 0.5, x)


# --- log-SNR -------------------------------------------------------------------------------------

def test_log_snr_decreasing_and_inverted(path):
    s = torch.linspace(1e-3, 1.0, 200, dtype=torch.float64) * path.T
    lam = path.log_snr(s)
    assert torch.all(lam[1:] < lam[:-1])
    assert torch.all(path.noise_ratio(s)[1:] > path.noise_ratio(s)[:-1])
    for u in s[::20].tolist():
        assert path.s_from_log_snr(float(path.log_snr(u))) == pytest.approx(u, abs=1e-9)
        assert path.s_from_noise_ratio(float(path.noise_ratio(u))) == pytest.approx(u, abs=1e-9)


def test_append_dims_shapes():
    c = torch.arange(3.0)
    assert append_dims(c, 2).shape == (3, 1)
    assert append_dims(c, 4).shape == (3, 1, 1, 1)
    assert append_dims(c, 1).shape == (3,)
    assert append_dims(torch.tensor(2.0), 4).shape == ()
    x = torch.ones(3, 2, 4, 4)
    torch.testing.assert_close((append_dims(c, x.ndim) * x)[:, 0, 0, 0], c)


# --- bad input -----------------------------------------------------------------------------------

def test_make_path_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        make_path("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in FAMILIES:
        assert f"'{name}'" in msg


def test_make_path_unknown_option_is_a_value_error():
    with pytest.raises(ValueError, match="vp"):
        make_path("vp", sigma_max=3.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta_min": -1.0}, r"beta_min must be > 0, found -1"),
    ({"beta_min": 1.0, "beta_max": 0.5}, r"beta_max must exceed beta_min=1.0, found 0.5"),
    ({"T": 0.0}, r"T must be > 0, found 0"),
])
def test_vp_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VP(**kwargs)
    with pytest.raises(ValueError, match=match):
        make_path("vp", **kwargs)


@pytest.mark.parametrize("name, kwargs", [("ve", {"sigma_min": 1.0, "sigma_max": 0.5}), ("ve", {"sigma_min": 0.0}),
                                          ("cosine", {"T": 1.0}), ("flow", {"T": 1.0})])
def test_other_families_reject_bad_parameters(name, kwargs):
    with pytest.raises(ValueError, match="found"):
        make_path(name, **kwargs)


@pytest.mark.parametrize("ac", [[0.9, 0.95, 0.5], [0.9, 0.9, 0.5], [1.0, 0.9], [0.9, 0.0], [0.5], [[0.9, 0.8]]])
def test_discrete_rejects_bad_schedules(ac):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Discrete(ac)


def test_build_path_covers_every_family():
    assert [build_path(name).name for name in FAMILIES] == FAMILIES
