"""A small class-conditional UNet for 8x8 (or 16x16) images, classifier-free guidance, and its training.

Clock: the network itself never sees a clock; it takes `time_input`, whatever NetworkScore hands it.
The digits model is trained with time_input = "log_snr", lambda(s) = log(alpha(s) / sigma(s)) of
DIFFUSION time s, so the same weights describe the process on any path with the same log-SNR range.

Notation:
    eps_theta(x_s, lambda, c)   the network: predicts the noise eps of x_s = alpha(s) x_0 + sigma(s) eps
    c in 0..num_classes-1       a class; c = num_classes is the NULL class ("no condition")
    w                           classifier-free guidance weight (Ho & Salimans 2022):
                                eps_w = (1 + w) eps(x, lambda, c) - w eps(x, lambda, null)
Training (`train_unet`): L = E || eps_theta(alpha x_0 + sigma eps, lambda(s), c~) - eps ||^2 with
s stratified-uniform on [s_min, T] and c~ = null with probability p_uncond; EMA of the weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from scoreaction.paths import GaussianPath


@dataclass
class UNetConfig:
    """Architecture. `mults[i]` scales `base` channels at resolution image_size / 2^i."""

    image_size: int = 8
    channels: int = 1
    base: int = 32
    mults: list = field(default_factory=lambda: [1, 2, 2])
    blocks: int = 2  # residual blocks per resolution (down path; the up path has blocks + 1)
    attention: list = field(default_factory=lambda: [4])  # resolutions with self-attention
    num_classes: int = 10
    groups: int = 8
    time_scale: float = 0.1  # the time input is multiplied by this before the Fourier features

    def __post_init__(self):
        for name in ("image_size", "channels", "base", "blocks", "num_classes", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"unet {name} must be a positive integer, found {value!r}")
        self.mults, self.attention = list(self.mults), list(self.attention)
        if not self.mults or self.image_size % 2 ** (len(self.mults) - 1):
            raise ValueError(f"unet image_size {self.image_size} must be divisible by 2^{len(self.mults) - 1} "
                             f"(one halving per entry of mults={self.mults} after the first)")
        for m in self.mults:
            if (self.base * m) % self.groups:
                raise ValueError(f"unet channels base*mult = {self.base * m} must be divisible by groups={self.groups}")

    def to_dict(self) -> dict:
        return asdict(self)


def fourier_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(w_k t), sin(w_k t)] with w_k geometric in [1, 100], shape (B, dim)."""
    half = dim // 2
    w = torch.exp(torch.linspace(0.0, math.log(100.0), half, device=t.device, dtype=t.dtype))
    ang = t[:, None] * w
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale-shift by the embedding, GN-SiLU-conv (zero-initialised), plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(groups, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], attn: bool, c: int, groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(Attention(c, groups) for _ in blocks) if attn else None


class UNet(nn.Module):
    """eps_theta(x, time_input, cond): x (B, C, H, W); time_input (B,) float; cond (B,) long in
    0..num_classes (num_classes = the null class) or None (= null for every sample)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        c0, emb, g = cfg.base, 4 * cfg.base, cfg.groups
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb)
        self.conv_in = nn.Conv2d(cfg.channels, c0, 3, padding=1)
        chans = [c0 * m for m in cfg.mults]
        self.down, self.downsample, skips, c, res = nn.ModuleList(), nn.ModuleList(), [c0], c0, cfg.image_size
        for i, ch in enumerate(chans):
            blocks = []
            for _ in range(cfg.blocks):
                blocks.append(ResBlock(c, ch, emb, g))
                c = ch
                skips.append(c)
            self.down.append(Level(blocks, res in cfg.attention, c, g))
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, emb, g), Attention(c, g), ResBlock(c, c, emb, g)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            blocks = []
            for _ in range(cfg.blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch, emb, g))
                c = ch
            self.up.append(Level(blocks, res in cfg.attention, c, g))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        assert not skips
        self.norm_out, self.conv_out = nn.GroupNorm(g, c), nn.Conv2d(c, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        if cond is None:
            cond = torch.full((b,), cfg.num_classes, dtype=torch.long, device=x.device)
        t = torch.as_tensor(time_input, device=x.device, dtype=x.dtype).reshape(-1).expand(b)
        emb = self.time_mlp(fourier_embedding(t * cfg.time_scale, cfg.base)) + self.class_embed(cond.long())
        emb = F.silu(emb)
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.blocks):
                h = block(h, emb)
                if level.attn is not None:
                    h = level.attn[j](h)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up):
            for j, block in enumerate(level.blocks):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                if level.attn is not None:
                    h = level.attn[j](h)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def check_classes(cond: torch.Tensor | None, num_classes: int, *, allow_null: bool = False) -> None:
    """Conditions must be integers in 0..num_classes-1 (or the null class num_classes when allowed)."""
    if cond is None:
        return
    if not torch.is_tensor(cond) or cond.is_floating_point() or cond.is_complex() or cond.ndim != 1:
        found = f"dtype {cond.dtype} shape {tuple(cond.shape)}" if torch.is_tensor(cond) else type(cond).__name__
        raise ValueError(f"conditions must be a 1-D integer tensor of class labels, found {found}")
    if len(cond):
        lo, hi = int(cond.min()), int(cond.max())
        top = num_classes if allow_null else num_classes - 1
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            raise ValueError(f"class labels must lie in 0..{top}, found {bad}")


class GuidedUNet(nn.Module):
    """Classifier-free guidance around a UNet: eps_w = (1 + w) eps(x, c) - w eps(x, null).

    Both passes run as one batch. cond None means unconditional (the null class, no guidance)."""

    def __init__(self, unet: UNet, guidance: float = 0.0):
        super().__init__()
        if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, found {guidance!r}")
        self.unet, self.guidance = unet, float(guidance)

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        k = self.unet.config.num_classes
        check_classes(cond, k)
        if cond is None or self.guidance == 0:
            return self.unet(x, time_input, cond)
        t = torch.as_tensor(time_input, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.full_like(cond, k)]))
        eps_c, eps_u = both.chunk(2)
        return (1 + self.guidance) * eps_c - self.guidance * eps_u


# --- training --------------------------------------------------------------------------------------
@dataclass
class UNetTrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    s_min: float = 1e-4  # smallest diffusion time trained on (fraction of T)
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, found {value!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), found {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), found {self.ema_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


class EMA:
    """Exponential moving average of a model's parameters, decay min(d, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.n = copy.deepcopy(model).requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def eps_loss(unet: UNet, path: GaussianPath, x0: torch.Tensor, labels: torch.Tensor, s: torch.Tensor,
             eps: torch.Tensor, time_input: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of || eps_theta(x_s, time_input(s), c) - eps ||^2 / dim (diffusion time s)."""
    x_s = path.marginal(x0, s, eps)
    pred = unet(x_s, time_input(s).to(x0), labels)
    return ((pred - eps) ** 2).mean()


def train_unet(unet: UNet, path: GaussianPath, images: torch.Tensor, labels: torch.Tensor, config: UNetTrainConfig,
               *, generator: torch.Generator, time_input: Callable[[torch.Tensor], torch.Tensor],
               log: Callable[[dict], None] | None = None, log_every: int = 100) -> tuple[UNet, list[dict]]:
    """Denoising score matching (eps prediction) with CFG label dropout and EMA; returns (EMA model, history).

    All randomness (minibatches, times, noise, label dropout) comes from `generator`: the same seed,
    thread count and torch build give the same weights."""
    cfg, n = config, len(images)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = lambda k: min(1.0, (k + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * k / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema, history, perm, pos = EMA(unet, cfg.ema_decay), [], torch.randperm(n, generator=generator), 0
    k_null = unet.config.num_classes
    start, running = time.perf_counter(), []
    unet.train()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x0, c = images[idx], labels[idx].clone()
        b = len(idx)
        drop = torch.rand(b, generator=generator) < cfg.p_uncond
        c[drop] = k_null
        u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(b, dtype=torch.float64) / b) % 1.0
        s = path.T * (cfg.s_min + (1 - cfg.s_min) * u)  # stratified times in [s_min T, T]
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        loss = eps_loss(unet, path, x0, c, s, eps, time_input)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        ema.update(unet)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            running = []
            if log is not None:
                log(entry)
    unet.eval()
    return ema.model.eval(), history


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "EMA",
    "GuidedUNet",
    "UNet",
    "UNetConfig",
    "UNetTrainConfig",
    "check_classes",
    "count_parameters",
    "train_unet",
]
