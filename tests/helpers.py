"""Statistics and exact linear-Gaussian propagation shared by the tests.

Monte-Carlo tolerances are built from standard errors (SE) computed here; discretisation
allowances are computed EXACTLY where the scheme is affine in the state and noise (Gaussian data),
by propagating mean and covariance through the per-step affine maps of the discrete chain.
"""

from __future__ import annotations

import math

import torch

Z = 4.0  # tolerance in standard errors: two-sided tail probability 6e-5 per check


def mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean of the rows of x (n, ...) and its standard error, per coordinate."""
    n = x.shape[0]
    return x.mean(0), x.std(0) / math.sqrt(n)


def cov_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample covariance of x (n, d) and the SE of each entry, from the empirical variance of
    (x_i - m_i)(x_j - m_j) (valid for any distribution with finite fourth moments)."""
    n = x.shape[0]
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    return prods.sum(0) / (n - 1), prods.std(0) / math.sqrt(n)


def weighted_mean_se(f: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance-sampling estimate of E[f] (f: (n, ...)) with weights w (n,),
    and its delta-method SE: sqrt(sum w_i^2 (f_i - est)^2) / sum w_i."""
    w = w.reshape(-1, *([1] * (f.ndim - 1)))
    est = (w * f).sum(0) / w.sum()
    se = torch.sqrt((w**2 * (f - est) ** 2).sum(0)) / w.sum()
    return est, se


def weighted_cov_se(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised IS estimate of Cov[x] (x: (n, d)) and the SE of each entry."""
    m, _ = weighted_mean_se(x, w)
    xc = x - m
    return weighted_mean_se(xc[:, :, None] * xc[:, None, :], w)


def assert_close_mc(estimate, exact, se, allowance=0.0, what: str = "") -> None:
    """|estimate - exact| <= Z * se + allowance, elementwise, with a readable failure."""
    estimate, exact = torch.as_tensor(estimate, dtype=torch.float64), torch.as_tensor(exact, dtype=torch.float64)
    se, allowance = torch.as_tensor(se, dtype=torch.float64), torch.as_tensor(allowance, dtype=torch.float64)
    err = (estimate - exact).abs()
    tol = Z * se + allowance
    assert torch.all(err <= tol), (f"{what}: |estimate - exact| exceeds {Z} SE + allowance\n"
                                   f"estimate={estimate}\nexact={exact}\nerr={err}\ntol={tol}")


def affine_map(fn, d: int, dtype=torch.float64, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Phi, b) with fn(x) = x @ Phi.T + b for an affine map fn of a batch (B, d) -> (B, d').

    Read off from fn at 0 and the unit vectors; with `check`, affinity is verified at random points,
    so a non-affine fn fails loudly instead of giving wrong moments."""
    basis = torch.cat([torch.zeros(1, d, dtype=dtype), torch.eye(d, dtype=dtype)])
    out = fn(basis)
    b, Phi = out[0], (out[1:] - out[0]).T
    if check:
        x = torch.randn(3, d, generator=torch.Generator().manual_seed(123), dtype=dtype)
        torch.testing.assert_close(fn(x), x @ Phi.T + b, rtol=1e-9, atol=1e-9)
    return Phi, b


def sampler_chain_law(sample, path, score, ts, d: int, eta: float, mean0, cov0):
    """Exact law N(mean, cov) of a sampler's output when every step is affine in (x, z), i.e. for
    a Gaussian score: x_{k+1} = Phi_k x_k + b_k + G_k z_k, z_k ~ N(0, I) independent.

    The per-step maps are read off by running `sample` on the one-step grid ts[k:k+2] with
    prescribed noise."""
    mean, cov = torch.as_tensor(mean0, dtype=torch.float64), torch.as_tensor(cov0, dtype=torch.float64)
    for k in range(len(ts) - 1):
        grid = ts[k:k + 2]
        check = k % 50 == 0  # affinity verified on a sample of steps (it costs as much again)
        Phi, b = affine_map(lambda x, grid=grid: sample(path, score, x, grid, eta=eta,
                                                        noise_sampler=lambda t0, t1: torch.zeros_like(x)),
                            d, check=check)
        if eta > 0:
            G, _ = affine_map(lambda z, grid=grid: sample(path, score, torch.zeros_like(z), grid, eta=eta,
                                                          noise_sampler=lambda t0, t1: z), d, check=check)
        else:
            G = torch.zeros(d, d, dtype=torch.float64)
        mean = Phi @ mean + b
        cov = Phi @ cov @ Phi.T + G @ G.T
    return mean, 0.5 * (cov + cov.T)


def policy_chain_law(policy, ts, d: int, mean0, cov0, reference=None):
    """Exact moments of a ScoreAsAction rollout whose action and pretrained score are affine in x.

    The chain is X_{k+1} = mean_k(X_k) + std_k z_k with mean_k affine. Returns the final (mean, cov)
    and E[path KL] = sum_k E ||mean_k(X_k) - mean_pre_k(X_k)||^2 / (2 std_k^2), the KL between the
    two Gaussian transitions (Eq. E6, discrete form), with mean_pre from `reference` (a policy that
    plays the pretrained score)."""
    mean, cov = torch.as_tensor(mean0, dtype=torch.float64), torch.as_tensor(cov0, dtype=torch.float64)
    kl = 0.0
    for k in range(len(ts) - 1):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        check = k % 50 == 0  # affinity verified on a sample of steps (it costs as much again)
        Phi, b = affine_map(lambda x, t0=t0, t1=t1: policy.transition(t0, t1, x)[0], d, check=check)
        std = policy.transition_std(t0, t1)
        if reference is not None:
            Phi_pre, b_pre = affine_map(lambda x, t0=t0, t1=t1: reference.transition(t0, t1, x)[0], d, check=check)
            D, e = Phi - Phi_pre, b - b_pre
            r = D @ mean + e
            kl += float(r @ r + torch.trace(D @ cov @ D.T)) / (2 * std**2)
        mean = Phi @ mean + b
        cov = Phi @ cov @ Phi.T + std**2 * torch.eye(d, dtype=torch.float64)
    return mean, 0.5 * (cov + cov.T), kl


def expected_quadratic_reward(A, y, mean, cov) -> float:
    """E[-1/2 (X - y)^T A (X - y)] for X ~ N(mean, cov)."""
    A, y = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    diff = torch.as_tensor(mean, dtype=torch.float64) - y
    return -0.5 * float(diff @ A @ diff + torch.trace(A @ torch.as_tensor(cov, dtype=torch.float64)))


def pair_slopes(steps, errors) -> list[float]:
    """Observed order between consecutive step counts: log(e_i / e_{i+1}) / log(K_{i+1} / K_i)."""
    return [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]


def slope(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed order of convergence."""
    x = torch.log(torch.as_tensor(steps, dtype=torch.float64))
    y = -torch.log(torch.as_tensor(errors, dtype=torch.float64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x**2).sum())


def run_cli(capsys, *argv):
    """`scoreaction ARGV` in this process: (exit code, stdout, stderr); argparse's usage errors included."""
    from scoreaction.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    """The CLI's promise for bad input: exit code 2 and one line on stderr that names what was wrong."""
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("scoreaction: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def numbers(value):
    """Every number in a parsed JSON document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value
