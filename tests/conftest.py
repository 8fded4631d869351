"""Shared fixtures. Everything runs on CPU; numerics are checked in float64 with fixed seeds."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may touch the network

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` under any pytest import mode

from scoreaction.paths import Discrete, linear_alphas_cumprod, make_path

# One intra-op thread: the tensors here are small, and with a busy 2-core machine two threads
# oversubscribe and run ~20x slower (measured: 60 ms vs 3 ms per Euler step on 20000 x 4).
torch.set_num_threads(1)

FAMILIES = ["vp", "subvp", "ve", "cosine", "flow", "discrete"]


def build_path(name: str):
    """Every Gaussian path family with its default parameters; `discrete` is DDPM's linear schedule."""
    if name == "discrete":
        return Discrete(linear_alphas_cumprod())
    return make_path(name)


@pytest.fixture(params=FAMILIES)
def path(request):
    return build_path(request.param)


@pytest.fixture
def vp():
    return make_path("vp")


@pytest.fixture
def gen():
    """A fresh, fixed-seed generator per test."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def gaussian_data():
    """Mean and covariance of 2-D Gaussian data: correlated, eigenvalues well inside (0.1, 1)."""
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    S = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    return m, S
