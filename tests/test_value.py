"""The structured value network (Eq. E15)."""

import math

import torch

from scoreaction.models.residual import MLP
from scoreaction.tasks import make_task
from scoreaction.value import ValueNet


def make_value(task, zero_head=False):
    head = MLP(2, 1, hidden=16, zero_init=zero_head).to(torch.float64)
    return ValueNet(task.path, task.pretrained, task.reward, head)


def test_terminal_value_is_the_reward_exactly():
    task = make_task("gaussian")
    value = make_value(task)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(value(task.path.T, x), task.reward(x))
    t = torch.full((64,), task.path.T, dtype=torch.float64)  # per-sample times too
    assert torch.equal(value(t, x), task.reward(x))


def test_structure_away_from_the_terminal_time():
    task = make_task("gaussian")
    value = make_value(task)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = 0.3
    s = task.path.T - t
    c_skip, c_out = math.cos(math.pi * s / 2), math.sin(math.pi * s / 2)
    x0_hat = task.path.tweedie(task.pretrained(s, x), s, x)
    expected = c_skip * task.reward(x0_hat) + c_out * value.head(s, x).squeeze(-1)
    torch.testing.assert_close(value(t, x), expected, rtol=1e-12, atol=1e-12)
    # at t = 0 (pure noise) only the learned head remains
    torch.testing.assert_close(value(0.0, x), value.head(task.path.T, x).squeeze(-1), rtol=1e-12, atol=1e-12)


def test_value_is_differentiable_in_x_for_the_gradient_form():
    task = make_task("gaussian")
    value = make_value(task, zero_head=True)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(value(task.path.T, x).sum(), x)
    torch.testing.assert_close(grad, -(x - task.reward.y) @ task.reward.A, rtol=1e-12, atol=1e-12)
