"""Simulated labelers: Bradley-Terry choice frequencies with lapses and ties, the ceiling, hidden utilities."""

import math

import pytest
import torch
from helpers import Z

from scoreaction.feedback.labelers import Labeler, SimulatedLabeler, make_utility
from scoreaction.rewards.utilities import ink_and_offset


def first_coordinate(x, cond=None):
    return x[:, 0]


def pairs_with_differences(du: list[float], repeats: int):
    """Points whose first-coordinate utility differs by du[k], each pair repeated `repeats` times."""
    d = torch.tensor(du, dtype=torch.float64).repeat_interleave(repeats)
    base = torch.linspace(-1, 1, len(d), dtype=torch.float64)
    left = torch.stack([base + d, torch.zeros_like(d)], 1)
    right = torch.stack([base, torch.zeros_like(d)], 1)
    return left, right


def test_choice_frequencies_match_bradley_terry_with_lapses():
    """P(left) = (1 - e) sigmoid(du / T) + e / 2 per utility gap, within Z standard errors."""
    T, e, M = 0.7, 0.1, 4000
    du = [-2.0, -0.5, 0.0, 0.3, 1.0, 3.0]
    labeler = SimulatedLabeler(first_coordinate, temperature=T, error_rate=e, seed=3)
    left, right = pairs_with_differences(du, M)
    answers = labeler.choose(left, right)
    assert set(answers) <= {"left", "right"}
    chose_left = torch.tensor([a == "left" for a in answers], dtype=torch.float64).reshape(len(du), M)
    for k, gap in enumerate(du):
        p = (1 - e) / (1 + math.exp(-gap / T)) + e / 2
        se = math.sqrt(p * (1 - p) / M)
        assert abs(float(chose_left[k].mean()) - p) < Z * se, (gap, float(chose_left[k].mean()), p)


def test_ties_inside_the_margin_only():
    labeler = SimulatedLabeler(first_coordinate, temperature=1.0, tie_margin=0.4, seed=0)
    left, right = pairs_with_differences([-0.39, 0.0, 0.2, 0.41, -1.0], 200)
    answers = torch.tensor([{"tie": 0, "left": 1, "right": 2}[a] for a in labeler.choose(left, right)]).reshape(5, 200)
    assert bool((answers[:3] == 0).all())
    assert bool((answers[3:] != 0).all())


def test_ceiling_matches_empirical_accuracy():
    """The hidden utility's accuracy against the noisy answers, on non-tied pairs, is the ceiling."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    left = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    right = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    labeler = SimulatedLabeler(first_coordinate, temperature=0.5, error_rate=0.1, tie_margin=0.05, seed=1)
    answers = labeler.choose(left, right)
    du = left[:, 0] - right[:, 0]
    decided = torch.tensor([a != "tie" for a in answers])
    right_answer = torch.tensor([(a == "left") == bool(d > 0) for a, d in zip(answers, du)], dtype=torch.float64)
    empirical = float(right_answer[decided].mean())
    ceiling = labeler.ceiling_accuracy(left, right)
    se = math.sqrt(ceiling * (1 - ceiling) / int(decided.sum()))
    assert abs(empirical - ceiling) < Z * se
    assert 0.5 < ceiling < 1.0
    # the utility itself, as a predictor, reaches exactly the ceiling; its opposite 1 - ceiling
    assert labeler.expected_accuracy(left, right, (du > 0).double()) == pytest.approx(ceiling, abs=1e-12)
    assert labeler.expected_accuracy(left, right, (du < 0).double()) == pytest.approx(1 - ceiling, abs=1e-12)


def test_limits_and_reproducibility():
    gen = torch.Generator().manual_seed(1)
    left, right = torch.randn(3000, 2, generator=gen), torch.randn(3000, 2, generator=gen)
    perfect = SimulatedLabeler(first_coordinate, temperature=0.0, seed=0)
    answers = perfect.choose(left, right)
    assert all((a == "left") == bool(x[0] > y[0]) for a, x, y in zip(answers, left, right))
    assert perfect.ceiling_accuracy(left, right) == 1.0
    coin = SimulatedLabeler(first_coordinate, temperature=0.1, error_rate=1.0, seed=0)
    share = sum(a == "left" for a in coin.choose(left, right)) / len(left)
    assert abs(share - 0.5) < Z * 0.5 / math.sqrt(len(left))
    assert coin.ceiling_accuracy(left, right) == pytest.approx(0.5)
    a = SimulatedLabeler(first_coordinate, temperature=1.0, seed=7).choose(left, right)
    b = SimulatedLabeler(first_coordinate, temperature=1.0, seed=7).choose(left, right)
    assert a == b


def test_label_packs_comparisons():
    left, right = pairs_with_differences([-1.0, 0.0, 2.0], 1)
    comps = SimulatedLabeler(first_coordinate, temperature=0.0, tie_margin=0.5).label(left.float(), right.float())
    assert comps.choice.tolist() == [0.0, 0.5, 1.0]
    assert comps.left.dtype == torch.float32


def test_protocol_and_bad_arguments():
    assert isinstance(SimulatedLabeler(first_coordinate), Labeler)
    for kwargs in ({"temperature": -1.0}, {"error_rate": 1.5}, {"tie_margin": -0.1}):
        with pytest.raises(ValueError):
            SimulatedLabeler(first_coordinate, **kwargs)
    with pytest.raises(TypeError):
        SimulatedLabeler("not a function")
    labeler = SimulatedLabeler(first_coordinate)
    with pytest.raises(ValueError, match="same shape"):
        labeler.choose(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="every pair is a tie"):
        SimulatedLabeler(first_coordinate, tie_margin=1.0).ceiling_accuracy(torch.zeros(3, 2), torch.zeros(3, 2))


def test_make_utility_names():
    for task in ("gaussian", "mixture", "digits"):
        assert callable(make_utility(task))
    with pytest.raises(ValueError, match="must be one of"):
        make_utility("mixture", "taste")
    with pytest.raises(ValueError, match="no hidden utilities"):
        make_utility("imagenet")
    with pytest.raises(ValueError, match="points of shape"):
        make_utility("mixture")(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="images of shape"):
        make_utility("digits")(torch.zeros(3, 2))


def test_point_utility_is_smooth_and_peaks_at_its_bumps():
    u = make_utility("mixture")
    centres = torch.tensor([[1.2, 0.6], [-1.8, 0.3]], dtype=torch.float64)
    assert bool((u(centres) > u(centres + 1.0)).all())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)  # higher dimensions: centres padded with 0
    (grad,) = torch.autograd.grad(u(x).sum(), x)
    assert torch.isfinite(grad).all()
    distance = make_utility("gaussian", "distance")(torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    assert distance.tolist() == pytest.approx([0.0, -1.0], abs=1e-5)


def test_digit_utility_prefers_bold_centred_ink():
    """ink = (x + 1) / 2 in [-1, 1] images; a bold or centred blob beats a thin or off-centre one."""
    blank = -torch.ones(1, 1, 8, 8)
    centred, bold, corner = blank.clone(), blank.clone(), blank.clone()
    centred[..., 3:5, 3:5] = 1.0
    bold[..., 2:6, 2:6] = 1.0
    corner[..., 0:2, 0:2] = 1.0
    ink, offset = ink_and_offset(torch.cat([centred, corner]))
    assert ink.tolist() == pytest.approx([4 / 64, 4 / 64])
    assert offset[0] < 1e-2 and offset[1] == pytest.approx(3 * math.sqrt(2), rel=1e-3)
    taste = make_utility("digits")
    u = taste(torch.cat([centred, bold, corner]))
    assert u[1] > u[0] > u[2]
    assert make_utility("digits", "ink")(torch.cat([centred, corner])).tolist() == pytest.approx([24 / 16, 24 / 16])
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(taste(2 * x - 1).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
