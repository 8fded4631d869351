"""A small CNN digit classifier on the diffusion model's image format, with a feature layer.

It serves three purposes: the differentiable reward log p(c | x) of the digits task, the class
accuracy of conditional samples, and the feature space of the Frechet distance (image_metrics.py).
Images are (B, 1, H, W) in [-1, 1]. Training sees the clean images plus, with probability
`noisy_fraction`, lightly noised ones (x + sigma z, sigma ~ U(0, max_sigma)), so the reward stays
informative on slightly imperfect samples and on Tweedie estimates x0_hat.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ClassifierConfig:
    image_size: int = 8
    channels: int = 1
    width: int = 32
    features: int = 64
    num_classes: int = 10

    def __post_init__(self):
        for name in ("image_size", "channels", "width", "features", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"classifier {name} must be a positive integer, found {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    """conv(w) - conv(w) - pool - conv(2w) - conv(2w) - global mean pool - linear(features) - linear(classes)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        cfg = self.config = config or ClassifierConfig()
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
        )
        self.fc = nn.Linear(2 * w, cfg.features)
        self.head = nn.Linear(cfg.features, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, (B, features): the space of the Frechet distance."""
        return F.silu(self.fc(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(x))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(c | x) for every class, (B, num_classes)."""
        return F.log_softmax(self(x), dim=-1)


@dataclass
class ClassifierTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noisy_fraction: float = 0.5
    max_sigma: float = 0.3
    max_shift: int = 1  # random translations by up to this many pixels

    def to_dict(self) -> dict:
        return asdict(self)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by integers in [-max_shift, max_shift], filling with the background -1."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (b,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def train_classifier(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
                     config: ClassifierTrainConfig, *, generator: torch.Generator) -> tuple[DigitClassifier, dict]:
    """Cross-entropy training with Adam; all randomness from `generator`. Returns (model in eval mode, log)."""
    cfg, n = config, len(images)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=generator).split(cfg.batch_size):
            x = _shift(images[idx], cfg.max_shift, generator)
            noisy = torch.rand(len(idx), generator=generator) < cfg.noisy_fraction
            sigma = cfg.max_sigma * torch.rand(len(idx), generator=generator) * noisy
            x = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": loss.item()}


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images).argmax(-1) == labels).float().mean())
