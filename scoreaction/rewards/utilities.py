"""Hidden utilities: the "taste" a simulated labeler judges by, with the RewardModel signature.

A utility u(x, cond) -> (B,) is the ground truth of a simulated human-feedback experiment: the
labeler (scoreaction.feedback.labelers) sees it, the learner never does. Utilities are smooth and
differentiable in x (so they can also serve as an oracle reward), and scaled so that their standard
deviation over the task's data is about 1: a labeler temperature of 1 then means "noticeable noise".

Points (`gaussian`, `mixture`: samples of shape (B, d)):
  bumps     sum_j h_j exp(-|x - c_j|^2 / (2 w_j^2)) with three bumps placed across the mixture's
            modes (default). Nonlinear and unlike the tasks' quadratic reward. Centres are 2-D and
            padded with zeros in higher dimensions. Std ~0.93 over `mixture` pretrained samples.
  distance  -|x - (1, 1)|: the negative distance to a point.

Digit images (`digits`: shape (B, 1, H, W), any H, W; pixel values in [-1, 1] by default):
  ink(x)    mean ink in [0, 1], ink = (x + 1) / 2 clamped to [0, 1] (value_range=(-1, 1));
            with value_range=(0, 1) the pixels are the ink.
  offset(x) distance in pixels from the ink's centre of mass to the image centre.
  taste     24 ink - 2.4 offset: bold, centred strokes are preferred (default). On sklearn's 8x8
            digits ink has std 0.034 and offset std 0.26 px, so taste has std ~1.1.
  ink       24 ink          (stroke boldness only)
  centred   -2.4 offset     (centring only)
The class label is accepted and ignored by every built-in utility.
"""

from __future__ import annotations

import torch

POINT_TASKS = ("gaussian", "mixture")
IMAGE_TASKS = ("digits",)


class BumpsUtility:
    """u(x) = sum_j h_j exp(-|x - c_j|^2 / (2 w_j^2)) on points (B, d); 2-D centres padded with zeros."""

    differentiable = True

    def __init__(self, centres, heights, widths, name: str = "bumps"):
        self.centres = torch.as_tensor(centres, dtype=torch.float64)
        self.heights = torch.as_tensor(heights, dtype=torch.float64)
        self.widths = torch.as_tensor(widths, dtype=torch.float64)
        if self.centres.ndim != 2 or not (len(self.centres) == len(self.heights) == len(self.widths)):
            raise ValueError(f"bumps need centres (J, d), heights (J,) and widths (J,), found shapes "
                             f"{tuple(self.centres.shape)}, {tuple(self.heights.shape)}, {tuple(self.widths.shape)}")
        self.name = name

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = check_points(x, self.name)
        d, d0 = x.shape[1], self.centres.shape[1]
        if d < d0:
            raise ValueError(f"utility {self.name!r} needs samples of at least {d0} values, found {d}")
        c = torch.nn.functional.pad(self.centres, (0, d - d0)).to(x)
        sq = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        return (self.heights.to(x) * torch.exp(-sq / (2 * self.widths.to(x) ** 2))).sum(-1)


class DistanceUtility:
    """u(x) = -|x - y| on points (B, d); y (2-D) padded with zeros in higher dimensions."""

    differentiable = True

    def __init__(self, target, name: str = "distance"):
        self.target = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
        self.name = name

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = check_points(x, self.name)
        if x.shape[1] < len(self.target):
            raise ValueError(f"utility {self.name!r} needs samples of at least {len(self.target)} values, "
                             f"found {x.shape[1]}")
        y = torch.nn.functional.pad(self.target, (0, x.shape[1] - len(self.target))).to(x)
        return -torch.sqrt(((x - y) ** 2).sum(-1) + 1e-12)


def check_points(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"utility {name!r} expects float points of shape (B, d), found "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    return x


def ink_and_offset(x: torch.Tensor,
                   value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ink in [0, 1], distance in pixels of the ink's centre of mass from the image centre), each (B,).

    x: images (B, 1, H, W) with pixel values in `value_range` (low = no ink, high = full ink)."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"digit utilities expect float images of shape (B, 1, H, W), found "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    lo, hi = value_range
    ink = ((x[:, 0] - lo) / (hi - lo)).clamp(0.0, 1.0)
    H, W = ink.shape[-2:]
    gy = torch.arange(H, dtype=x.dtype, device=x.device) - (H - 1) / 2
    gx = torch.arange(W, dtype=x.dtype, device=x.device) - (W - 1) / 2
    mass = ink.sum((-2, -1)) + 1e-6
    cy = (ink * gy[:, None]).sum((-2, -1)) / mass
    cx = (ink * gx[None, :]).sum((-2, -1)) / mass
    return ink.mean((-2, -1)), torch.sqrt(cx**2 + cy**2 + 1e-6)


class DigitUtility:
    """u(x) = ink_weight * mean ink - offset_weight * centre-of-mass offset (pixels); images (B, 1, H, W)."""

    differentiable = True

    def __init__(self, ink_weight: float = 24.0, offset_weight: float = 2.4,
                 value_range: tuple[float, float] = (-1.0, 1.0), name: str = "taste"):
        if not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, found {value_range}")
        self.ink_weight, self.offset_weight = float(ink_weight), float(offset_weight)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.name = name

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ink, offset = ink_and_offset(x, self.value_range)
        return self.ink_weight * ink - self.offset_weight * offset


UTILITIES = {
    "gaussian": {
        "bumps": lambda: BumpsUtility([[1.2, 0.6], [-1.8, 0.3], [0.3, 1.8]], [4.0, 2.5, 1.7], [0.8, 0.5, 0.4]),
        "distance": lambda: DistanceUtility([1.0, 1.0]),
    },
    "digits": {
        "taste": lambda: DigitUtility(24.0, 2.4, name="taste"),
        "ink": lambda: DigitUtility(24.0, 0.0, name="ink"),
        "centred": lambda: DigitUtility(0.0, 2.4, name="centred"),
    },
}
UTILITIES["mixture"] = UTILITIES["gaussian"]
DEFAULT_UTILITY = {"gaussian": "bumps", "mixture": "bumps", "digits": "taste"}


def make_utility(task_name: str, name: str | None = None):
    """The hidden utility `name` (default: the task's default) for a task: a callable (x, cond) -> (B,)."""
    if task_name not in UTILITIES:
        raise ValueError(f"no hidden utilities for task {task_name!r}; expected one of {sorted(UTILITIES)}")
    name = DEFAULT_UTILITY[task_name] if name is None else name
    if name not in UTILITIES[task_name]:
        raise ValueError(f"utility for task {task_name!r} must be one of {sorted(UTILITIES[task_name])}, "
                         f"found {name!r}")
    return UTILITIES[task_name][name]()


__all__ = ["BumpsUtility", "DistanceUtility", "DigitUtility", "ink_and_offset", "make_utility", "UTILITIES"]
