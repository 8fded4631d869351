"""Labelers: whoever answers "which of these two is better?". One small protocol, two kinds:

  - a person, through the labeling web app (scoreaction.feedback.app writes the answers to the store);
  - SimulatedLabeler, for experiments without people: it judges by a hidden utility u(x, c)
    (scoreaction.rewards.utilities) that the learner never sees, so the ground truth is known.

Simulated choice model, for a pair (l, r) of condition c with du = u(l, c) - u(r, c):

    tie                     if |du| < tie_margin                           (deterministic)
    P(left | not tie)  =  (1 - error_rate) * sigmoid(du / temperature) + error_rate / 2

i.e. a Bradley-Terry choice at `temperature` (0: always the better one), and with probability
`error_rate` a lapse: the answer is a fair coin flip (error_rate = 1 is pure noise).
The ceiling is the expected accuracy of the hidden utility itself against these noisy answers,
mean over non-tied pairs of max(P(left), 1 - P(left)): no learned reward can beat it in expectation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from scoreaction.config import check_nonnegative, check_range
from scoreaction.errors import ScoreactionError
from scoreaction.rewards.preference import CHOICES, Comparisons
from scoreaction.rewards.utilities import make_utility

ANSWERS = ("left", "right", "tie")


@runtime_checkable
class Labeler(Protocol):
    """Answers pairwise comparisons: one of "left" / "right" / "tie" per pair."""

    name: str

    def choose(self, left: torch.Tensor, right: torch.Tensor, cond: torch.Tensor | None = None) -> list[str]:
        ...


class SimulatedLabeler:
    """Bradley-Terry answers from a hidden utility, with a temperature, a lapse (error) rate and ties.

    utility: a callable (x, cond) -> (B,) (see make_utility); seed: its own generator, advanced by
    every call to `choose`, so a run of questions is reproducible."""

    def __init__(self, utility, temperature: float = 1.0, error_rate: float = 0.0, tie_margin: float = 0.0,
                 seed: int = 0, name: str | None = None):
        if not callable(utility):
            raise TypeError(f"utility must be a callable (x, cond) -> (B,), found {type(utility).__name__}")
        check_nonnegative("temperature", temperature)
        check_range("error_rate", error_rate, 0, 1)
        check_nonnegative("tie_margin", tie_margin)
        self.utility = utility
        self.temperature, self.error_rate, self.tie_margin = float(temperature), float(error_rate), float(tie_margin)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        util_name = getattr(utility, "name", type(utility).__name__)
        self.name = name or f"sim-{util_name}-T{self.temperature:g}-e{self.error_rate:g}"

    def __repr__(self) -> str:
        return (f"SimulatedLabeler({self.name!r}, temperature={self.temperature:g}, error_rate={self.error_rate:g}, "
                f"tie_margin={self.tie_margin:g}, seed={self.seed})")

    @torch.no_grad()
    def utility_difference(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> torch.Tensor:
        """du = u(l, c) - u(r, c), shape (N,), float64."""
        left, right = torch.as_tensor(left), torch.as_tensor(right)
        if left.shape != right.shape or left.ndim < 2:
            raise ScoreactionError(f"left and right must have the same shape (N, *sample_shape), found "
                             f"{tuple(left.shape)} and {tuple(right.shape)}")
        du = self.utility(left.double(), cond).double() - self.utility(right.double(), cond).double()
        if du.shape != (left.shape[0],):
            raise ScoreactionError(f"the utility must return shape ({left.shape[0]},), found {tuple(du.shape)}")
        return du

    def probabilities(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(left | not tie) of shape (N,), tie mask of shape (N,)): the choice model above."""
        du = self.utility_difference(left, right, cond)
        if self.temperature > 0:
            bt = torch.sigmoid(du / self.temperature)
        else:
            bt = torch.where(du > 0, 1.0, torch.where(du < 0, 0.0, 0.5)).double()
        p_left = (1 - self.error_rate) * bt + self.error_rate / 2
        return p_left, du.abs() < self.tie_margin

    def choose(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> list[str]:
        """One answer per pair: "left", "right" or "tie"."""
        p_left, tie = self.probabilities(left, right, cond)
        u = torch.rand(p_left.shape, generator=self.generator, dtype=torch.float64)
        return ["tie" if t else ("left" if b else "right") for t, b in zip(tie.tolist(), (u < p_left).tolist())]

    def label(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> Comparisons:
        """choose(), packed as Comparisons (choice 1.0 / 0.0 / 0.5)."""
        answers = self.choose(left, right, cond)
        return Comparisons(left, right, torch.tensor([CHOICES[a] for a in answers]), cond)

    def expected_accuracy(self, left: torch.Tensor, right: torch.Tensor, predicted_left: torch.Tensor,
                          cond=None) -> float:
        """Expected accuracy, against this labeler's answers, of a predictor saying P(left) =
        `predicted_left` (N,) (left if > 0.5; exactly 0.5 counts as half), on non-tied pairs."""
        p_left, tie = self.probabilities(left, right, cond)
        q = torch.as_tensor(predicted_left, dtype=torch.float64).reshape(-1)
        if q.shape != p_left.shape:
            raise ScoreactionError(f"predicted_left must have shape {tuple(p_left.shape)}, found {tuple(q.shape)}")
        says_left = torch.where(q > 0.5, 1.0, torch.where(q < 0.5, 0.0, 0.5)).double()
        acc = says_left * p_left + (1 - says_left) * (1 - p_left)
        keep = ~tie
        if not bool(keep.any()):
            raise ScoreactionError("every pair is a tie for this labeler; accuracy is undefined")
        return float(acc[keep].mean())

    def ceiling_accuracy(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> float:
        """Expected accuracy of the hidden utility itself under this labeler's noise, on non-tied pairs."""
        p_left, tie = self.probabilities(left, right, cond)
        keep = ~tie
        if not bool(keep.any()):
            raise ScoreactionError("every pair is a tie for this labeler; accuracy is undefined")
        return float(torch.maximum(p_left, 1 - p_left)[keep].mean())


__all__ = ["Labeler", "SimulatedLabeler", "make_utility", "ANSWERS"]
