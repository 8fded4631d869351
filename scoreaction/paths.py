"""Gaussian paths of the forward process and the parameterisation converters.

Clock: every function here takes DIFFUSION time s in [0, T] (s = 0 data, s = T noise).

A Gaussian path (Eq. E1, docs/maths.md) is x_s = alpha(s) x_0 + sigma(s) eps, eps ~ N(0, I). From
(alpha, sigma) alone follow the forward SDE dx = f(s, x) ds + g(s) dW with

    f(s, x) = (d log alpha / ds) x,        g(s)^2 = d sigma^2 / ds - 2 (d log alpha / ds) sigma^2.

Each family below only supplies log alpha(s), sigma(s)^2 and their s-derivatives; drift, diffusion,
prior, log-SNR and the eps / x0 / score / velocity converters (Eq. E2) are shared. Coefficients
broadcast against points (B, d) and images (B, C, H, W) alike through `append_dims`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

Time = float | torch.Tensor
PREDICTIONS = ("eps", "x0", "score", "velocity")


def append_dims(c: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample coefficient of shape (B,) (or a scalar) to broadcast over `ndim` dims."""
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def coef_like(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A time coefficient (a scalar or one per sample) on x's device and dtype, broadcastable against x."""
    return append_dims(c.to(device=x.device, dtype=x.dtype), x.ndim)


def as_time(s: Time) -> torch.Tensor:
    """Times are computed in float64 whatever the data dtype; the result is cast at use."""
    return torch.as_tensor(s, dtype=torch.float64)


class GaussianPath:
    """Base class: subclasses define `_log_alpha`, `_dlog_alpha`, `_sigma2`, `_dsigma2` and `T`."""

    name: str = "path"
    T: float = 1.0

    # --- what a family defines (float64 tensors of diffusion time s) ----------------------------
    def _log_alpha(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dlog_alpha(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma2(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dsigma2(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- public coefficients (float or tensor s, float64 tensor out) ----------------------------
    def log_alpha(self, s: Time) -> torch.Tensor:
        return self._log_alpha(as_time(s))

    def dlog_alpha(self, s: Time) -> torch.Tensor:
        """d log alpha / ds."""
        return self._dlog_alpha(as_time(s))

    def sigma2(self, s: Time) -> torch.Tensor:
        """sigma(s)^2, clamped at 0 against round-off (1 - alpha^2 can come out as -1e-20 at s = 0)."""
        return torch.clamp(self._sigma2(as_time(s)), min=0.0)

    def dsigma2(self, s: Time) -> torch.Tensor:
        """d sigma^2 / ds."""
        return self._dsigma2(as_time(s))

    # --- derived quantities -----------------------------------------------------------------
    def alpha(self, s: Time) -> torch.Tensor:
        return torch.exp(self.log_alpha(as_time(s)))

    def sigma(self, s: Time) -> torch.Tensor:
        return torch.sqrt(self.sigma2(as_time(s)))

    def g2(self, s: Time) -> torch.Tensor:
        """Squared diffusion coefficient g(s)^2 (Eq. E1)."""
        s = as_time(s)
        return self.dsigma2(s) - 2.0 * self.dlog_alpha(s) * self.sigma2(s)

    def g(self, s: Time) -> torch.Tensor:
        return torch.sqrt(torch.clamp(self.g2(s), min=0.0))

    def f(self, s: Time, x: torch.Tensor) -> torch.Tensor:
        """Forward drift f(s, x) = (d log alpha / ds) x (Eq. E1)."""
        return coef_like(self.dlog_alpha(as_time(s)), x) * x

    def log_snr(self, s: Time) -> torch.Tensor:
        """lambda(s) = log(alpha / sigma); decreasing in s."""
        s = as_time(s)
        return self.log_alpha(s) - 0.5 * torch.log(self.sigma2(s))

    def noise_ratio(self, s: Time) -> torch.Tensor:
        """sigma(s) / alpha(s), the EDM noise level of the path; increasing in s."""
        return torch.exp(-self.log_snr(s))

    def d_alpha(self, s: Time) -> torch.Tensor:
        s = as_time(s)
        return self.dlog_alpha(s) * torch.exp(self.log_alpha(s))

    def d_sigma(self, s: Time) -> torch.Tensor:
        s = as_time(s)
        return self.dsigma2(s) / (2.0 * torch.sqrt(self.sigma2(s)))

    def s_from_log_snr(self, lam: float) -> float:
        """Invert lambda(s) by bisection on [0, T] (lambda is monotone for every family here)."""
        return _bisect(lambda s: float(-self.log_snr(s)), -lam, 0.0, self.T)

    def s_from_noise_ratio(self, r: float) -> float:
        return self.s_from_log_snr(-math.log(r)) if r > 0 else 0.0

    # --- marginals and prior ------------------------------------------------------------------
    def marginal(self, x0: torch.Tensor, s: Time, eps: torch.Tensor) -> torch.Tensor:
        """x_s = alpha(s) x_0 + sigma(s) eps (Eq. E1)."""
        return coef_like(self.alpha(s), x0) * x0 + coef_like(self.sigma(s), x0) * eps

    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, prior_std^2 I) the reverse process starts from (RL time t = 0):
        1 for the families whose sigma(T) is (nearly) 1, sigma_max for VE."""
        return 1.0

    def prior_sample(self, shape: Sequence[int], *, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.prior_std * z

    # --- parameterisation converters (Eq. E2) -------------------------------------------------
    def to_score(self, kind: str, pred: torch.Tensor, s: Time, x: torch.Tensor) -> torch.Tensor:
        """Turn a network prediction of `kind` in {eps, x0, score, velocity} into a score."""
        a, sg = coef_like(self.alpha(s), x), coef_like(self.sigma(s), x)
        if kind == "score":
            return pred
        if kind == "eps":
            return -pred / sg
        if kind == "x0":
            return -(x - a * pred) / sg**2
        if kind == "velocity":
            da, ds = coef_like(self.d_alpha(s), x), coef_like(self.d_sigma(s), x)
            eps = (a * pred - da * x) / (a * ds - sg * da)
            return -eps / sg
        raise ValueError(f"prediction kind must be one of {PREDICTIONS}, found {kind!r}")

    def from_score(self, kind: str, score: torch.Tensor, s: Time, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_score`: express a score as eps, x0 (Tweedie), score or velocity."""
        a, sg = coef_like(self.alpha(s), x), coef_like(self.sigma(s), x)
        if kind == "score":
            return score
        eps = -sg * score
        x0 = (x + sg**2 * score) / a
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "velocity":
            return coef_like(self.d_alpha(s), x) * x0 + coef_like(self.d_sigma(s), x) * eps
        raise ValueError(f"prediction kind must be one of {PREDICTIONS}, found {kind!r}")

    def tweedie(self, score: torch.Tensor, s: Time, x: torch.Tensor) -> torch.Tensor:
        """x0_hat = (x + sigma^2 score) / alpha (Eq. E2)."""
        return self.from_score("x0", score, s, x)

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def _bisect(fn, target: float, lo: float, hi: float, iters: int = 80) -> float:
    """Solve fn(s) = target for increasing fn on [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class VP(GaussianPath):
    """Variance preserving (Song et al. 2021): beta(s) = beta_min + s (beta_max - beta_min)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    name: str = field(default="vp", init=False)

    def __post_init__(self):
        _check_positive(beta_min=self.beta_min, T=self.T)
        if self.beta_max <= self.beta_min:
            raise ValueError(f"vp: beta_max must exceed beta_min={self.beta_min}, found {self.beta_max}")

    def beta(self, s):
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def _log_alpha(self, s):
        return -0.5 * (self.beta_min * s + 0.5 * s**2 * (self.beta_max - self.beta_min))

    def _dlog_alpha(self, s):
        return -0.5 * self.beta(s)

    def _sigma2(self, s):
        return -torch.expm1(2.0 * self._log_alpha(s))

    def _dsigma2(self, s):
        return self.beta(s) * torch.exp(2.0 * self._log_alpha(s))


@dataclass
class SubVP(VP):
    """sub-VP (Song et al. 2021): alpha as VP, sigma^2 = (1 - alpha^2)^2."""

    name: str = field(default="subvp", init=False)

    def _sigma2(self, s):
        return torch.expm1(2.0 * self._log_alpha(s)) ** 2

    def _dsigma2(self, s):
        a2 = torch.exp(2.0 * self._log_alpha(s))
        return 2.0 * (1.0 - a2) * self.beta(s) * a2


@dataclass
class VE(GaussianPath):
    """Variance exploding: alpha = 1, sigma(s) = sigma_min (sigma_max / sigma_min)^(s / T)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0
    name: str = field(default="ve", init=False)

    def __post_init__(self):
        _check_positive(sigma_min=self.sigma_min, T=self.T)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"ve: sigma_max must exceed sigma_min={self.sigma_min}, found {self.sigma_max}")

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def _log_alpha(self, s):
        return torch.zeros_like(s)

    def _dlog_alpha(self, s):
        return torch.zeros_like(s)

    def _sigma2(self, s):
        return self.sigma_min**2 * (self.sigma_max / self.sigma_min) ** (2.0 * s / self.T)

    def _dsigma2(self, s):
        return self._sigma2(s) * 2.0 * math.log(self.sigma_max / self.sigma_min) / self.T


@dataclass
class Cosine(GaussianPath):
    """Cosine schedule (Nichol & Dhariwal 2021): alpha^2 = cos^2(pi/2 (s+k)/(1+k)) / cos^2(pi/2 k/(1+k)),
    sigma^2 = 1 - alpha^2. T < 1 keeps the drift finite (it diverges at alpha = 0)."""

    offset: float = 0.008
    T: float = 0.995
    name: str = field(default="cosine", init=False)

    def __post_init__(self):
        _check_positive(offset=self.offset, T=self.T)
        if self.T >= 1.0:
            raise ValueError(f"cosine: T must be below 1 (alpha vanishes at 1), found {self.T}")

    def _u(self, s):
        return 0.5 * math.pi * (s + self.offset) / (1.0 + self.offset)

    def _log_alpha(self, s):
        # both cosines from torch, so that log_alpha(0) is exactly 0
        return torch.log(torch.cos(self._u(s)) / torch.cos(self._u(torch.zeros_like(s))))

    def _dlog_alpha(self, s):
        return -torch.tan(self._u(s)) * 0.5 * math.pi / (1.0 + self.offset)

    def _sigma2(self, s):
        return -torch.expm1(2.0 * self._log_alpha(s))

    def _dsigma2(self, s):
        return -2.0 * self._dlog_alpha(s) * torch.exp(2.0 * self._log_alpha(s))


@dataclass
class RectifiedFlow(GaussianPath):
    """Rectified flow / linear interpolant: alpha = 1 - s, sigma = s. T < 1 keeps f finite."""

    T: float = 0.999
    name: str = field(default="flow", init=False)

    def __post_init__(self):
        if not 0.0 < self.T < 1.0:
            raise ValueError(f"flow: T must lie in (0, 1), found {self.T}")

    def _log_alpha(self, s):
        return torch.log1p(-s)

    def _dlog_alpha(self, s):
        return -1.0 / (1.0 - s)

    def _sigma2(self, s):
        return s**2

    def _dsigma2(self, s):
        return 2.0 * s


class Discrete(GaussianPath):
    """A DDPM schedule given by `alphas_cumprod` (what a diffusers scheduler holds).

    Step index i in 0..N-1 sits at s = (i + 1) / N (times T); log alphas_cumprod is interpolated
    linearly in s with alphas_cumprod = 1 at s = 0, so d log alpha / ds is the discrete beta
    spread over its step. sigma^2 = 1 - alpha^2 as in DDPM. `timestep(s)` maps s back to the
    (fractional) index a diffusers network takes.
    """

    name = "discrete"

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor, T: float = 1.0):
        ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"discrete: alphas_cumprod must be a 1-D array of length >= 2, found shape {tuple(ac.shape)}")
        if not torch.all((ac > 0) & (ac < 1)) or not torch.all(ac[1:] < ac[:-1]):
            raise ValueError("discrete: alphas_cumprod must be strictly decreasing inside (0, 1)")
        _check_positive(T=T)
        self.T = float(T)
        self.N = len(ac)
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])
        self._knots = torch.linspace(0.0, self.T, self.N + 1, dtype=torch.float64)

    def _interval(self, s):
        s = torch.clamp(s, 0.0, self.T)
        i = torch.clamp((s / self.T * self.N).floor().long(), max=self.N - 1)
        return s, i

    def _log_alpha(self, s):
        s, i = self._interval(s)
        w = (s - self._knots[i]) * self.N / self.T
        return 0.5 * ((1 - w) * self._log_ab[i] + w * self._log_ab[i + 1])

    def _dlog_alpha(self, s):
        _, i = self._interval(s)
        return 0.5 * (self._log_ab[i + 1] - self._log_ab[i]) * self.N / self.T

    def _sigma2(self, s):
        return -torch.expm1(2.0 * self._log_alpha(s))

    def _dsigma2(self, s):
        return -2.0 * self._dlog_alpha(s) * torch.exp(2.0 * self._log_alpha(s))

    def timestep(self, s: Time) -> torch.Tensor:
        """Step index (0-based) of diffusion time s, as diffusers networks take it: exact integers on the
        knots s = (i + 1) T / N (round-off within 1e-6 is snapped, so a 20-step grid hands the network 649,
        not 648.9999999999999), fractional between them."""
        i = as_time(s) / self.T * self.N - 1.0
        return torch.where((i - i.round()).abs() < 1e-6, i.round(), i)

    def config(self) -> dict:
        return {"name": self.name, "T": self.T, "alphas_cumprod": torch.exp(self._log_ab[1:]).tolist()}


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, found {value}")


PATHS = {"vp": VP, "subvp": SubVP, "ve": VE, "cosine": Cosine, "flow": RectifiedFlow}


def make_path(name: str = "vp", **kwargs) -> GaussianPath:
    """Build a path family by name: vp, subvp, ve, cosine, flow, or discrete (alphas_cumprod=...)."""
    if name == "discrete":
        return Discrete(**kwargs)
    if name not in PATHS:
        raise ValueError(f"path must be one of {sorted([*PATHS, 'discrete'])}, found {name!r}")
    try:
        return PATHS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"path {name!r}: {err}") from None


def linear_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear beta schedule as alphas_cumprod, the array a diffusers DDPMScheduler holds."""
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return np.cumprod(1.0 - betas)
