"""Exact analytic scores (Eq. E22) and the network adapter (Eq. E2). Diffusion time s throughout."""

import math

import pytest
import torch
from helpers import assert_close_mc, cov_se, mean_se
from torch import nn

from scoreaction.models import GaussianScore, MixtureScore, NetworkScore, ScoreModel
from scoreaction.paths import PREDICTIONS, Discrete, linear_alphas_cumprod, make_path

MEANS = torch.tensor([[-1.0, 0.5, 0.0, 1.0], [1.5, 0.0, -0.5, 0.2], [0.0, 1.5, 1.0, -1.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _covs(J: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(J, d, d, generator=g, dtype=torch.float64) * 0.4
    return L @ L.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)


def _x(n: int = 6, d: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def _autograd_score(model, s, x):
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_density(s, xg).sum(), xg)
    return grad


@pytest.fixture(params=["vp", "ve", "flow"])
def any_path(request):
    return make_path(request.param)


@pytest.mark.parametrize("s_frac", [0.0, 1e-3, 0.3, 0.7, 1.0])
def test_mixture_score_is_grad_log_density(any_path, s_frac):
    model = MixtureScore(any_path, WEIGHTS, MEANS, _covs(3, 4))
    s, x = s_frac * any_path.T, _x()
    torch.testing.assert_close(model(s, x), _autograd_score(model, s, x), rtol=1e-10, atol=1e-10)


def test_mixture_log_density_matches_torch_distributions(any_path):
    """log p_s(x) for p_s = sum_j w_j N(alpha m_j, alpha^2 S_j + sigma^2 I), computed independently."""
    covs = _covs(3, 4)
    model = MixtureScore(any_path, WEIGHTS * 7.0, MEANS, covs)  # weights are normalised
    x = _x()
    for s in [0.0, 0.2 * any_path.T, 0.9 * any_path.T]:
        a, sig2 = float(any_path.alpha(s)), float(any_path.sigma2(s))
        comps = torch.distributions.MultivariateNormal(a * MEANS, a**2 * covs + sig2 * torch.eye(4, dtype=torch.float64))
        mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(WEIGHTS), comps)
        torch.testing.assert_close(model.log_density(s, x), mix.log_prob(x), rtol=1e-10, atol=1e-10)


def test_score_with_per_sample_times(any_path):
    model = MixtureScore(any_path, WEIGHTS, MEANS, _covs(3, 4))
    x = _x()
    s = torch.linspace(0.0, 1.0, x.shape[0], dtype=torch.float64) * any_path.T
    per_sample = model(s, x)
    one_by_one = torch.cat([model(float(s[i]), x[i:i + 1]) for i in range(len(s))])
    torch.testing.assert_close(per_sample, one_by_one, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_sample, _autograd_score(model, s, x), rtol=1e-10, atol=1e-10)


def test_gaussian_score_closed_form_and_one_component_mixture(any_path):
    m, S = MEANS[0], _covs(1, 4)[0]
    gauss = GaussianScore(any_path, m, S)
    mixture = MixtureScore(any_path, [1.0], m[None], S[None])
    x = _x()
    for s in [0.0, 0.4 * any_path.T, any_path.T]:
        a, sig2 = float(any_path.alpha(s)), float(any_path.sigma2(s))
        exact = -torch.linalg.solve(a**2 * S + sig2 * torch.eye(4, dtype=torch.float64), (x - a * m).T).T
        torch.testing.assert_close(gauss(s, x), exact, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mixture(s, x), exact, rtol=1e-10, atol=1e-10)
    assert isinstance(gauss, ScoreModel)


def test_images_score_like_flattened_points(vp):
    model = MixtureScore(vp, WEIGHTS, MEANS, _covs(3, 4))
    x = _x()
    img = x.reshape(-1, 1, 2, 2)
    for s in [0.1, torch.linspace(0.1, 0.9, x.shape[0], dtype=torch.float64)]:
        out = model(s, img)
        assert out.shape == img.shape
        torch.testing.assert_close(out.reshape(x.shape), model(s, x), rtol=0, atol=0)
        torch.testing.assert_close(model.log_density(s, img), model.log_density(s, x), rtol=0, atol=0)


def test_float32_inputs_give_float32_scores(vp):
    model = GaussianScore(vp, MEANS[0], _covs(1, 4)[0])
    out = model(0.5, _x().float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), model(0.5, _x()), rtol=1e-5, atol=1e-5)


def test_sample_data_moments(vp):
    """Exact draws from the data mixture: mean and covariance within 4 SE of the exact values."""
    covs = _covs(3, 4)
    model = MixtureScore(vp, WEIGHTS, MEANS, covs)
    n = 40_000
    x = model.sample_data(n, generator=torch.Generator().manual_seed(5))
    mean = WEIGHTS @ MEANS
    cov = (WEIGHTS[:, None, None] * (covs + MEANS[:, :, None] * MEANS[:, None, :])).sum(0) - torch.outer(mean, mean)
    m_hat, m_se = mean_se(x)
    assert_close_mc(m_hat, mean, m_se, what="data mean")
    c_hat, c_se = cov_se(x)
    assert_close_mc(c_hat, cov, c_se, what="data covariance")
    assert torch.all(4 * c_se < 0.1 * torch.diag(cov).min())  # a 10 % error in a variance is rejected


# --- NetworkScore -------------------------------------------------------------------------------

class _ExactPredictor(nn.Module):
    """A 'network' net(x, s) that predicts `kind` (eps, x0, score, velocity) computed from an exact score."""

    def __init__(self, path, exact, kind, time_to_s=lambda t: t):
        super().__init__()
        self.path, self.exact, self.kind, self.time_to_s = path, exact, kind, time_to_s
        self.calls = []

    def forward(self, x, t_in):
        self.calls.append(t_in)
        s = self.time_to_s(t_in)
        return self.path.from_score(self.kind, self.exact(s, x), s, x)


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("shape", [(6, 4), (6, 1, 2, 2)], ids=["points", "images"])
def test_network_score_reproduces_the_exact_score(any_path, kind, shape):
    exact = MixtureScore(any_path, WEIGHTS, MEANS, _covs(3, 4))
    net = _ExactPredictor(any_path, exact, kind)
    model = NetworkScore(net, any_path, prediction=kind)
    x = _x().reshape(shape)
    for s in [0.3 * any_path.T, torch.linspace(0.05, 0.95, 6, dtype=torch.float64) * any_path.T]:
        torch.testing.assert_close(model(s, x), exact(s, x), rtol=1e-9, atol=1e-9)
    # the network sees one time per sample, in x's dtype
    assert net.calls[0].shape == (6,) and net.calls[0].dtype == x.dtype


@pytest.mark.parametrize("time_input, to_s", [
    ("timestep", lambda path, t: (t + 1.0) / path.N * path.T),
    ("log_snr", lambda path, t: torch.tensor([path.s_from_log_snr(float(v)) for v in t], dtype=torch.float64)),
    ("noise_ratio", lambda path, t: torch.tensor([path.s_from_noise_ratio(float(v)) for v in t], dtype=torch.float64)),
])
def test_network_score_time_inputs(time_input, to_s):
    path = Discrete(linear_alphas_cumprod())
    exact = MixtureScore(path, WEIGHTS, MEANS, _covs(3, 4))
    net = _ExactPredictor(path, exact, "eps", time_to_s=lambda t: to_s(path, t))
    model = NetworkScore(net, path, prediction="eps", time_input=time_input)
    s = torch.tensor([0.1005, 0.25, 0.5, 0.7005, 0.8, 0.95], dtype=torch.float64)
    x = _x()
    torch.testing.assert_close(model(s, x), exact(s, x), rtol=1e-7, atol=1e-7)


def test_network_score_with_condition(vp):
    class Cond(nn.Module):
        def forward(self, x, t, cond):
            return x * cond[:, None]

    model = NetworkScore(Cond(), vp, prediction="score")
    x, cond = _x(), torch.arange(6, dtype=torch.float64)
    torch.testing.assert_close(model(0.5, x, cond), x * cond[:, None])


def test_network_score_bad_input(vp):
    net = nn.Identity()
    with pytest.raises(ValueError, match=r"prediction must be one of .*'eps'.*found 'noise'"):
        NetworkScore(net, vp, prediction="noise")
    with pytest.raises(ValueError, match=r"time_input must be one of .*found 'sigma'"):
        NetworkScore(net, vp, time_input="sigma")
    with pytest.raises(ValueError, match=r"needs a discrete path, found 'vp'"):
        NetworkScore(net, vp, time_input="timestep")

    class Wrong(nn.Module):
        def forward(self, x, t):
            return x[:, :2]

    with pytest.raises(ValueError, match=r"must match x's shape \(6, 4\), found \(6, 2\)"):
        NetworkScore(Wrong(), vp)(0.5, _x())


def test_analytic_scores_bad_input(vp):
    not_pd = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3, -1
    with pytest.raises(ValueError, match=r"positive definite, found smallest eigenvalue -1"):
        GaussianScore(vp, [0.0, 0.0], not_pd)
    with pytest.raises(ValueError, match=r"symmetric"):
        GaussianScore(vp, [0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"covs must have shape \(1, 3, 3\), found \(1, 2, 2\)"):
        GaussianScore(vp, [0.0, 0.0, 0.0], torch.eye(2))
    with pytest.raises(ValueError, match=r"weights must be positive, found"):
        MixtureScore(vp, [1.0, -0.5], MEANS[:2], _covs(2, 4))
    with pytest.raises(ValueError, match=r"means must have shape \(3, d\)"):
        MixtureScore(vp, WEIGHTS, MEANS[:2], _covs(3, 4))
    model = GaussianScore(vp, [0.0, 0.0], torch.eye(2))
    with pytest.raises(ValueError, match=r"2 values per sample, found \(5, 3\)"):
        model(0.5, torch.zeros(5, 3))
    assert math.isfinite(float(model(0.5, torch.zeros(5, 2)).sum()))
