"""The networks of a Bradley-Terry reward ensemble: K members in one module, weights with a leading
ensemble axis (rewards/preference.py fits and saves them), and the size checks made before building one.

Conditioning: a class embedding (row num_classes: "no class") is added after the first layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scoreaction.config import check_memory, check_size, memory_bytes


# --- networks: K members in one module (weights with a leading ensemble axis) ---------------------

class EnsembleLinear(nn.Module):
    """K independent affine maps: (K, N, fan_in) -> (K, N, fan_out); nn.Linear's initialisation per member."""

    def __init__(self, K: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(K, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(K, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class PointRewardNet(nn.Module):
    """K members r_k(x, c) for flat samples: an MLP whose class embedding is added after the first layer.

    trunk(x): x (K, N, *shape) -> h (K, N, hidden); head(h, c): c (N,) or (K, N) embedding rows
    (num_classes = no class) -> rewards (K, N). Conditional and no-class rewards share the trunk."""

    def __init__(self, K: int, dim: int, hidden: int = 64, layers: int = 3, num_classes: int = 0):
        super().__init__()
        self.first = EnsembleLinear(K, dim, hidden)
        self.embed = nn.Parameter(0.1 * torch.randn(K, num_classes + 1, hidden)) if num_classes > 0 else None
        self.body = nn.ModuleList(EnsembleLinear(K, hidden, hidden) for _ in range(layers - 2))
        self.out = EnsembleLinear(K, hidden, 1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x.flatten(2))

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            rows = c.expand(h.shape[0], -1)  # (K, N)
            h = h + torch.gather(self.embed, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
        h = nn.functional.silu(h)
        for layer in self.body:
            h = nn.functional.silu(layer(h))
        return self.out(h).squeeze(-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x), c)


class ImageRewardNet(PointRewardNet):
    """K members r_k(x, c) for images (C, H, W): per member, two 3x3 convolutions (the second with
    stride 2) over the image plus two coordinate channels (so position, e.g. centring, is visible),
    global average pooling, then PointRewardNet's head. Small on purpose: few comparisons."""

    def __init__(self, K: int, shape: tuple[int, int, int], hidden: int = 64, layers: int = 3,
                 num_classes: int = 0, channels: int = 8):
        C, H, W = shape
        super().__init__(K, 2 * channels, hidden, layers, num_classes)
        self.convs = nn.ModuleList(nn.Sequential(
            nn.Conv2d(C + 2, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU()) for _ in range(K))
        coords = torch.stack(torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij"))
        self.register_buffer("coords", coords, persistent=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        K, N = x.shape[:2]
        x = torch.cat([x, self.coords.to(x).expand(K, N, -1, -1, -1)], dim=2)  # (K, N, C + 2, H, W)
        # a loop over members: on CPU it beats one grouped convolution (measured 40 vs 120 ms)
        return self.first(torch.stack([conv(x[k]).mean((-2, -1)) for k, conv in enumerate(self.convs)]))


ARCHITECTURES = ("mlp", "cnn")


def build_net(arch: str, K: int, shape: tuple[int, ...], num_classes: int, hidden: int, layers: int,
              channels: int = 8) -> nn.Module:
    if arch == "mlp":
        return PointRewardNet(K, math.prod(shape), hidden, layers, num_classes)
    if arch == "cnn":
        if len(shape) != 3:
            raise ValueError(f"architecture 'cnn' needs image samples (C, H, W), found sample shape {shape}")
        return ImageRewardNet(K, shape, hidden, layers, num_classes, channels)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, found {arch!r}")


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


LAYER_BYTES = 4096  # what one layer of a network costs beyond its weights (the module, its tensors), at least


def check_net_sizes(*, ensemble, hidden, layers, channels) -> None:
    """The sizes of an ensemble's networks, refused before anything is built: positive integers (layers >= 2)
    whose weights (a hidden x hidden float32 matrix per layer and member, at least) fit in this machine's memory."""
    for name, value in (("ensemble", ensemble), ("hidden", hidden), ("channels", channels)):
        if not is_count(value):
            raise ValueError(f"{name} must be a positive integer, found {value!r}")
    if not (is_count(layers) and layers >= 2):
        raise ValueError(f"layers must be an integer >= 2, found {layers!r}")
    check_size("hidden", hidden, math.isqrt(memory_bytes() // 4),
               "a hidden x hidden float32 matrix must fit in this machine's memory")
    layer = 4 * max(hidden, channels) ** 2 + LAYER_BYTES
    check_memory("ensemble", ensemble, 2 * layer, f"two layers of {layer} bytes per member at least")
    check_memory("layers", layers, layer, f"{layer} bytes per layer")
    check_memory("ensemble x layers", ensemble * layers, layer, f"{layer} bytes per layer of each member")
