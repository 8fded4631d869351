"""Adapter from a network that predicts eps, x0, score or velocity to a score function (Eq. E2).

Clock: DIFFUSION time s. The wrapped network is called as `net(x, time_input, cond)` (or
`net(x, time_input)` when cond is None); `time_input` is what the network was trained to see:
the diffusion time itself, a diffusers step index, the log-SNR, or the noise ratio sigma/alpha.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from scoreaction.paths import PREDICTIONS, Discrete, GaussianPath, as_time

TIME_INPUTS = ("s", "timestep", "log_snr", "noise_ratio")


class NetworkScore(nn.Module):
    """s_pre(s, x, cond) from a trained network; points and images alike."""

    def __init__(self, net: nn.Module, path: GaussianPath, prediction: str = "eps",
                 time_input: str | Callable[[torch.Tensor], torch.Tensor] = "s"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, found {prediction!r}")
        if isinstance(time_input, str):
            if time_input not in TIME_INPUTS:
                raise ValueError(f"time_input must be one of {TIME_INPUTS} or a callable, found {time_input!r}")
            if time_input == "timestep" and not isinstance(path, Discrete):
                raise ValueError(f"time_input 'timestep' needs a discrete path, found {path.name!r}")
        self.net, self.path, self.prediction, self.time_input = net, path, prediction, time_input

    def _time(self, s: torch.Tensor) -> torch.Tensor:
        if callable(self.time_input):
            return self.time_input(s)
        return {"s": lambda: s, "timestep": lambda: self.path.timestep(s),
                "log_snr": lambda: self.path.log_snr(s), "noise_ratio": lambda: self.path.noise_ratio(s)}[self.time_input]()

    def forward(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = as_time(s).expand(x.shape[0]) if as_time(s).ndim == 0 else as_time(s)
        t_in = self._time(s).to(device=x.device, dtype=x.dtype)
        pred = self.net(x, t_in) if cond is None else self.net(x, t_in, cond)
        if pred.shape != x.shape:
            raise ValueError(f"network output must match x's shape {tuple(x.shape)}, found {tuple(pred.shape)}")
        return self.path.to_score(self.prediction, pred, s, x)
