"""Pairwise comparisons as data: what a labeler answered about two samples of one condition, their file
format (safetensors + JSON metadata, never pickle), and how well a model's win probabilities fit them.

One comparison: samples l, r of one condition c (a class label, or none) and the labeler's choice y in
[0, 1] (1 = left preferred, 0 = right, 0.5 = tie).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from scoreaction.io import atomic_write_bytes

CHOICES = {"left": 1.0, "right": 0.0, "tie": 0.5}


# --- data ------------------------------------------------------------------------------------------

@dataclass
class Comparisons:
    """N pairwise comparisons. left, right: (N, *shape) float32 samples; choice: (N,) in [0, 1]
    (1.0 left preferred, 0.0 right preferred, 0.5 tie); cond: (N,) long class labels, or None."""

    left: torch.Tensor
    right: torch.Tensor
    choice: torch.Tensor
    cond: torch.Tensor | None = None

    def __post_init__(self):
        self.left = torch.as_tensor(self.left).detach().to(torch.float32)
        self.right = torch.as_tensor(self.right).detach().to(torch.float32)
        self.choice = torch.as_tensor(self.choice).detach().to(torch.float32)
        if self.left.ndim < 2 or self.left.shape != self.right.shape:
            raise ValueError(f"left and right must have the same shape (N, *sample_shape), found "
                             f"{tuple(self.left.shape)} and {tuple(self.right.shape)}")
        n = self.left.shape[0]
        if self.choice.shape != (n,):
            raise ValueError(f"choice must have shape ({n},), found {tuple(self.choice.shape)}")
        if not bool(((self.choice >= 0) & (self.choice <= 1)).all()):
            raise ValueError("choice must lie in [0, 1] (1 left preferred, 0 right preferred, 0.5 tie), "
                             f"found values in [{float(self.choice.min()):g}, {float(self.choice.max()):g}]")
        if self.cond is not None:
            cond = torch.as_tensor(self.cond).detach()
            if cond.shape != (n,) or cond.is_floating_point() or cond.is_complex():
                raise ValueError(f"cond must be integer class labels of shape ({n},), found "
                                 f"{cond.dtype} of shape {tuple(cond.shape)}")
            if n and int(cond.min()) < 0:
                raise ValueError(f"class labels must be >= 0, found {int(cond.min())}")
            self.cond = cond.long()

    def __len__(self) -> int:
        return self.left.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.left.shape[1:])

    @property
    def tied(self) -> torch.Tensor:
        """(N,) bool: comparisons answered with a tie."""
        return self.choice == 0.5

    @classmethod
    def from_choices(cls, left, right, choices: list[str], cond=None) -> Comparisons:
        """From the labelers' answers "left" / "right" / "tie"."""
        bad = sorted({c for c in choices if c not in CHOICES})
        if bad:
            raise ValueError(f"choices must be one of {sorted(CHOICES)}, found {bad[0]!r}")
        return cls(left, right, torch.tensor([CHOICES[c] for c in choices], dtype=torch.float32), cond)

    def subset(self, index) -> Comparisons:
        """The comparisons at `index` (a bool mask or integer indices)."""
        index = torch.as_tensor(index)
        return Comparisons(self.left[index], self.right[index], self.choice[index],
                           None if self.cond is None else self.cond[index])

    def finite_mask(self) -> torch.Tensor:
        """(N,) bool: both samples entirely finite."""
        n = len(self)
        return torch.isfinite(self.left.reshape(n, -1)).all(1) & torch.isfinite(self.right.reshape(n, -1)).all(1)

    @staticmethod
    def cat(parts: list[Comparisons]) -> Comparisons:
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({p.cond is None for p in parts}) > 1:
            raise ValueError("cannot concatenate conditional and unconditional comparisons")
        cond = None if parts[0].cond is None else torch.cat([p.cond for p in parts])
        return Comparisons(torch.cat([p.left for p in parts]), torch.cat([p.right for p in parts]),
                           torch.cat([p.choice for p in parts]), cond)


def save_comparisons(path: str | os.PathLike, comparisons: Comparisons, metadata: dict | None = None) -> Path:
    """A safetensors file with tensors left, right, choice[, cond] (written atomically)."""
    tensors = {"left": comparisons.left, "right": comparisons.right, "choice": comparisons.choice}
    if comparisons.cond is not None:
        tensors["cond"] = comparisons.cond
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    atomic_write_bytes(path, save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=meta or None))
    return path


def load_comparisons(path: str | os.PathLike) -> Comparisons:
    """Read a comparisons file (tensors left, right, choice[, cond]); problems are a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"comparisons file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"comparisons file {str(path)!r} is not a readable safetensors file ({err})") from None
    missing = [k for k in ("left", "right", "choice") if k not in tensors]
    if missing:
        raise ValueError(f"comparisons file {str(path)!r} lacks tensor {missing[0]!r}; "
                         f"expected left, right, choice[, cond], found {sorted(tensors)}")
    try:
        comparisons = Comparisons(tensors["left"], tensors["right"], tensors["choice"], tensors.get("cond"))
        check_finite(comparisons)
    except ValueError as err:
        raise ValueError(f"comparisons file {str(path)!r}: {err}") from None
    return comparisons


def check_finite(comparisons: Comparisons) -> None:
    """Refuse comparisons with a non-finite sample: one NaN would poison every gradient step."""
    finite = comparisons.finite_mask()
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{len(bad)} of {len(comparisons)} comparisons have non-finite samples (first at row "
                         f"{int(bad[0])}); remove them first, e.g. comparisons.subset(comparisons.finite_mask())")



# --- evaluation ------------------------------------------------------------------------------------

MAX_BINS = 10_000


def calibration(prob: torch.Tensor, target: torch.Tensor, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of P(left preferred) over `bins` equal-width probability bins,
    ECE = sum_b (n_b / n) |mean prob_b - mean target_b|, and the reliability table (one row per
    non-empty bin: lo, hi, count, mean predicted, observed frequency of left)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, found {bins!r}")
    if bins > MAX_BINS:
        raise ValueError(f"bins must be at most {MAX_BINS} (each bin is a row of the table), found {bins}")
    prob, target = prob.double().reshape(-1), target.double().reshape(-1)
    which = (prob * bins).floor().clamp(0, bins - 1).long()
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        if count == 0:
            continue
        p_mean, freq = float(prob[sel].mean()), float(target[sel].mean())
        ece += count / len(prob) * abs(p_mean - freq)
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "count": count, "predicted": p_mean, "observed": freq})
    return ece, table


def comparison_metrics(prob: torch.Tensor, choice: torch.Tensor, bins: int = 10) -> dict:
    """Accuracy on non-tied pairs (a prediction of exactly 0.5 counts as half right), mean
    log-likelihood per pair (ties as 1/2, 1/2 targets), ECE and the reliability table."""
    prob, choice = prob.double(), choice.double()
    if len(prob) == 0:
        raise ValueError("cannot evaluate on 0 comparisons")
    eps = 1e-12
    ll = choice * torch.log(prob.clamp_min(eps)) + (1 - choice) * torch.log((1 - prob).clamp_min(eps))
    decided = choice != 0.5
    pred = torch.where(prob > 0.5, 1.0, torch.where(prob < 0.5, 0.0, 0.5)).double()
    right = 1.0 - (pred - (choice > 0.5).double()).abs()
    ece, table = calibration(prob, choice, bins)
    n_dec = int(decided.sum())
    return {"n": len(prob), "n_non_tied": n_dec,
            "accuracy": float(right[decided].mean()) if n_dec else float("nan"),
            "log_likelihood": float(ll.mean()), "ece": ece, "reliability": table}
