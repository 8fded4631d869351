"""Reward models learned from pairwise comparisons (Bradley-Terry), with an ensemble for uncertainty.

Notation (one comparison): samples l, r of one condition c (a class label, or none), and the
labeler's choice y in [0, 1] (1 = left preferred, 0 = right, 0.5 = tie). The Bradley-Terry model is

    P(left preferred | l, r, c) = sigmoid( r_theta(l, c) - r_theta(r, c) ),

fitted by maximum likelihood with y as a soft target (a tie contributes 1/2 log p + 1/2 log (1 - p)).
An ensemble of K members r_1..r_K, each fitted on its own bootstrap resample from its own
initialisation, gives the reward r = mean_k r_k and its uncertainty std_k r_k; its win probability
is the mean of the members' probabilities. Rewards are identified only up to a constant per
condition, so each member is centred: mean 0 over the training items of each class.

Conditioning: a class embedding is added after the first layer. Each comparison is also fitted
with the "no class" embedding (row num_classes), so a conditional model answers cond=None with
a class-agnostic reward instead of failing. Unconditional models ignore cond.

A fitted model is a folder (written atomically): model.safetensors (weights) + reward.json
(architecture, sample shape, num_classes, input normalisation, fit summary). Never pickle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scoreaction.config import check_memory, check_seed
from scoreaction.io import atomic_folder, atomic_write_bytes
from scoreaction.rewards.comparisons import (
    CHOICES,
    Comparisons,
    calibration,
    check_finite,
    comparison_metrics,
    load_comparisons,
    save_comparisons,
)
from scoreaction.rewards.networks import (  # noqa: F401  (ARCHITECTURES and the nets are part of this module's API)
    ARCHITECTURES,
    EnsembleLinear,
    ImageRewardNet,
    PointRewardNet,
    build_net,
    check_net_sizes,
    is_count,
)

FORMAT = "scoreaction.bradley_terry"
FORMAT_VERSION = 1


# --- the ensemble reward model ---------------------------------------------------------------------

class BTRewardModel(nn.Module):
    """An ensemble of Bradley-Terry rewards with the RewardModel signature: model(x, cond=None) -> (B,).

    x: samples (B, *shape) (any float dtype; computed in float32, returned in x's dtype);
    cond: class labels (B,) or one label, in [0, num_classes); ignored by an unconditional model,
    and cond=None on a conditional model uses its class-agnostic ("no class") reward.
    Differentiable in x; the weights are frozen after fitting or loading."""

    differentiable = True

    CONFIG_KEYS = ("architecture", "shape", "num_classes", "ensemble", "hidden", "layers", "channels", "normalisation")

    def __init__(self, config: dict, metadata: dict | None = None):
        super().__init__()
        self.config = {k: config[k] for k in self.CONFIG_KEYS if k in config}
        self.metadata = dict(metadata or {})  # how it was fitted (reward.json "metadata")
        shape = config["shape"]
        if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4 and all(is_count(d) for d in shape)):
            raise ValueError(f"shape must be a list of 1 to 4 positive integers, found {shape!r}")
        self.shape = tuple(shape)
        check_memory("shape", math.prod(self.shape), 4, "one float32 sample")
        if not (is_count(config["num_classes"]) or config["num_classes"] == 0):
            raise ValueError(f"num_classes must be an integer >= 0, found {config['num_classes']!r}")
        self.num_classes = int(config["num_classes"])
        K = config["ensemble"]
        check_net_sizes(ensemble=K, hidden=config["hidden"], layers=config["layers"],
                        channels=config.get("channels", 8))
        check_memory("num_classes", self.num_classes + 1, 4 * K, "one float32 offset per class and member")
        self.net = build_net(config["architecture"], K, self.shape, self.num_classes, int(config["hidden"]),
                             int(config["layers"]), int(config.get("channels", 8)))
        norm = config.get("normalisation", {"mean": 0.0, "std": 1.0})
        self.register_buffer("input_mean", torch.as_tensor(norm["mean"], dtype=torch.float32))
        self.register_buffer("input_std", torch.as_tensor(norm["std"], dtype=torch.float32))
        check_normalisation(self.input_mean, self.input_std)
        self.register_buffer("offset", torch.zeros(K, self.num_classes + 1))

    @property
    def ensemble_size(self) -> int:
        return self.offset.shape[0]

    def condition_index(self, cond, batch: int) -> torch.Tensor:
        """cond -> (B,) embedding rows (num_classes = no class); validates labels."""
        if self.num_classes == 0 or cond is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long)
        c = torch.as_tensor(cond)
        if c.is_floating_point() and not bool((c == c.round()).all()):
            raise ValueError(f"class labels must be integers, found {c.flatten()[:4].tolist()}")
        c = c.long().reshape(-1)
        if c.numel() == 1:
            c = c.expand(batch)
        if c.shape != (batch,):
            raise ValueError(f"cond must be one label or {batch} labels, "
                             f"found shape {tuple(torch.as_tensor(cond).shape)}")
        if batch and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
            bad = int(c.min()) if int(c.min()) < 0 else int(c.max())
            raise ValueError(f"class label {bad} is outside this reward model's classes 0..{self.num_classes - 1}")
        return c

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or tuple(x.shape[1:]) != self.shape or not x.is_floating_point():
            found = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"reward model expects float samples of shape (B, {', '.join(map(str, self.shape))}), "
                             f"found {found}")
        return (x.to(self.input_mean) - self.input_mean) / self.input_std

    def member_rewards(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """r_k(x, c) for every member k, centred per class: shape (K, B)."""
        c = self.condition_index(cond, x.shape[0]).to(x.device)
        z = self.normalise(x).expand(self.ensemble_size, *x.shape)
        return (self.net(z, c) - self.offset[:, c]).to(x.dtype)

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """The reward: ensemble mean, shape (B,)."""
        return self.member_rewards(x, cond).mean(0)

    def uncertainty(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Ensemble standard deviation of the reward, shape (B,) (zeros for a single member)."""
        r = self.member_rewards(x, cond)
        return r.std(0) if len(r) > 1 else torch.zeros_like(r[0])

    def member_win_probability(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> torch.Tensor:
        """sigmoid(r_k(l, c) - r_k(r, c)) per member: shape (K, N)."""
        return torch.sigmoid(self.member_rewards(left, cond) - self.member_rewards(right, cond))

    def win_probability(self, left: torch.Tensor, right: torch.Tensor, cond=None) -> torch.Tensor:
        """P(left preferred): the mean of the members' Bradley-Terry probabilities, shape (N,)."""
        return self.member_win_probability(left, right, cond).mean(0)

    def save(self, folder: str | os.PathLike, metadata: dict | None = None, *, overwrite: bool = False) -> Path:
        """model.safetensors + reward.json, written into a temporary folder and renamed into place (over an
        existing folder only with `overwrite`); a model with a non-finite weight is refused (nothing is written)."""
        metadata = self.metadata if metadata is None else metadata
        config = {"format": FORMAT, "version": FORMAT_VERSION, **self.config, "metadata": metadata}
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"reward model {str(folder)!r} not written: tensor {name!r} has non-finite values")
        with atomic_folder(folder, replace=overwrite) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                      str(tmp / "model.safetensors"))
            atomic_write_bytes(tmp / "reward.json", json.dumps(config, indent=1, default=float).encode())
        return Path(folder)


def check_normalisation(mean: torch.Tensor, std: torch.Tensor, where: str = "normalisation ") -> None:
    """The input normalisation (x - mean) / std: every mean finite, every std finite and > 0."""
    for name, value, bad, want in (("mean", mean, ~torch.isfinite(mean), "finite"),
                                   ("std", std, ~(torch.isfinite(std) & (std > 0)), "finite and > 0")):
        if bool(bad.any()):
            raise ValueError(f"{where}{name} must be {want}, found {float(value[bad].flatten()[0])}")


def load_reward_model(folder: str | os.PathLike) -> BTRewardModel:
    """A saved BTRewardModel; a missing, corrupt or mismatched file is a ValueError naming it, and so is a
    non-finite weight or a normalisation scale that is not finite and > 0 (such a model would score NaN)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"reward model {str(folder)!r} is not a folder")
    json_path, weights_path = folder / "reward.json", folder / "model.safetensors"
    for p in (json_path, weights_path):
        if not p.is_file():
            raise ValueError(f"reward model {str(folder)!r} is missing {p.name}")
    try:
        config = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"reward model file {str(json_path)!r} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"reward model file {str(json_path)!r} is not a {FORMAT} description")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(f"reward model file {str(json_path)!r} has version {config.get('version')!r}, "
                         f"this scoreaction reads version {FORMAT_VERSION}")
    unknown = sorted(set(config) - {"format", "version", "metadata", *BTRewardModel.CONFIG_KEYS}, key=str)
    if unknown:
        raise ValueError(f"reward model file {str(json_path)!r}: unknown key {unknown[0]!r}; expected "
                         f"{sorted(['format', 'version', 'metadata', *BTRewardModel.CONFIG_KEYS])}")
    try:
        model = BTRewardModel(config, config.get("metadata"))
    except KeyError as err:
        raise ValueError(f"reward model file {str(json_path)!r} describes no valid model (it lacks {err})") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"reward model file {str(json_path)!r} describes no valid model ({err})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"reward model file {str(weights_path)!r} is truncated or corrupt ({err})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"reward model file {str(weights_path)!r}: tensor {bad!r} has non-finite values (NaN or inf)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"reward model file {str(weights_path)!r} does not match {json_path.name} ({first})") from None
    check_normalisation(model.input_mean, model.input_std, f"reward model file {str(weights_path)!r}: tensor input_")
    return model.eval().requires_grad_(False)


# --- fitting ---------------------------------------------------------------------------------------

# Per-architecture optimisation defaults, tuned on the benchmark (docs/benchmarks/feedback.md): the
# 2-D point MLP needs many small-batch updates to resolve local bumps; the image CNN overfits with them.
ARCH_DEFAULTS = {"mlp": {"lr": 1e-2, "min_steps": 500}, "cnn": {"lr": 3e-3, "min_steps": 150}}


@dataclass
class FitConfig:
    """How to fit a Bradley-Terry ensemble. Updates per member = max(min_steps, epochs * ceil(n_train / batch_size))."""

    architecture: str = "auto"  # auto: mlp for flat samples (N, d), cnn for images (N, C, H, W)
    ensemble: int = 5
    epochs: int = 25
    min_steps: int | None = None  # None: the architecture's default (ARCH_DEFAULTS)
    batch_size: int = 128
    lr: float | None = None  # None: the architecture's default (ARCH_DEFAULTS)
    weight_decay: float = 1e-3
    hidden: int = 64
    layers: int = 3
    channels: int = 8  # convolution width of the image network
    val_fraction: float = 0.2
    bootstrap: bool = True  # each member on its own bootstrap resample of the training pairs
    num_classes: int | None = None  # None: 1 + the largest class label in the data (0 if unconditional)
    seed: int = 0

    def __post_init__(self):
        positive = {"ensemble": self.ensemble, "epochs": self.epochs, "batch_size": self.batch_size,
                    "hidden": self.hidden, "channels": self.channels}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, found {value!r}")
        if self.min_steps is not None and (isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int)
                                           or self.min_steps < 0):
            raise ValueError(f"min_steps must be an integer >= 0 or None, found {self.min_steps!r}")
        check_net_sizes(ensemble=self.ensemble, hidden=self.hidden, layers=self.layers, channels=self.channels)
        if self.architecture not in ("auto", *ARCHITECTURES):
            raise ValueError(f"architecture must be one of {('auto', *ARCHITECTURES)}, found {self.architecture!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in [0, 1), found {self.val_fraction!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0 or None, found {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, found {self.weight_decay!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 0):
            raise ValueError(f"num_classes must be an integer >= 0 or None, found {self.num_classes!r}")
        check_seed("seed", self.seed)

    @classmethod
    def from_dict(cls, values: dict) -> FitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fit option {unknown[0]!r}; expected one of {sorted(known)}")
        return cls(**values)


@dataclass
class FitResult:
    model: BTRewardModel
    train: dict  # metrics on the training pairs (evaluate_comparisons)
    validation: dict | None  # metrics on the held-out pairs, None when val_fraction = 0
    config: FitConfig
    n_train: int
    n_val: int
    history: list = field(default_factory=list)  # (step, mean training loss per member)

    def summary(self) -> dict:
        return {"n_train": self.n_train, "n_val": self.n_val, "config": asdict(self.config),
                "train": strip_table(self.train), "validation": strip_table(self.validation)}


def strip_table(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "reliability"}


def split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (train, validation) split of range(n); validation gets round(val_fraction * n) pairs."""
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return perm[n_val:], perm[:n_val]


def bt_loss(logits: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Negative Bradley-Terry log-likelihood per pair, choice as a soft target (ties: 1/2, 1/2)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, choice.expand_as(logits), reduction="none")


def fit_reward_model(comparisons: Comparisons, config: FitConfig | None = None, **overrides) -> FitResult:
    """Fit a Bradley-Terry ensemble on a random train split and evaluate it on the validation split.

    The K members are one batched network (weights with a leading ensemble axis) trained with AdamW
    and a cosine learning rate; each member starts from its own initialisation and draws its
    minibatches from its own bootstrap resample (config.bootstrap). Comparisons with a non-finite
    sample are refused. Deterministic given config.seed; the global RNG is not touched."""
    if not isinstance(comparisons, Comparisons):
        raise TypeError(f"comparisons must be a Comparisons, found {type(comparisons).__name__}")
    config = FitConfig(**{**(asdict(config) if config else {}), **overrides})
    n = len(comparisons)
    if n < 1:
        raise ValueError("cannot fit a reward model on 0 comparisons")
    check_finite(comparisons)
    if bool(comparisons.tied.all()):
        raise ValueError(f"cannot fit a reward model: all {n} comparisons are ties (it learns from winners)")
    shape = comparisons.shape
    arch = config.architecture if config.architecture != "auto" else ("cnn" if len(shape) == 3 else "mlp")
    config = FitConfig(**{**asdict(config), "architecture": arch,
                          **{k: v for k, v in ARCH_DEFAULTS[arch].items() if getattr(config, k) is None}})
    data_classes = 0 if comparisons.cond is None else int(comparisons.cond.max()) + 1
    num_classes = data_classes if config.num_classes is None else config.num_classes
    if comparisons.cond is not None and data_classes > num_classes:
        raise ValueError(f"class label {data_classes - 1} is outside num_classes={num_classes}")
    if comparisons.cond is None and num_classes > 0:
        raise ValueError(f"num_classes={num_classes} needs comparisons with class labels (cond), found none")

    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = split(n, config.val_fraction, gen)
    train = comparisons.subset(train_idx)
    for part, idx in (("training", train_idx), ("validation", val_idx)):
        if len(idx) and bool(comparisons.tied[idx].all()):
            raise ValueError(f"the {part} split ({len(idx)} of {n} comparisons) holds only ties (its accuracy is "
                             f"undefined); add comparisons with a winner or change val_fraction")
    items = torch.cat([train.left, train.right])
    if arch == "cnn":
        norm = {"mean": float(items.mean()), "std": max(float(items.std()), 1e-6)}
    else:
        std = items.std(0) if len(items) > 1 else torch.ones(shape)
        norm = {"mean": items.mean(0).tolist(), "std": std.clamp_min(1e-6).tolist()}
    model_config = {"architecture": arch, "shape": list(shape), "num_classes": num_classes,
                    "ensemble": config.ensemble, "hidden": config.hidden, "layers": config.layers,
                    "channels": config.channels,
                    "normalisation": norm}
    with torch.random.fork_rng(devices=[]):  # seeded member initialisations; the global RNG is left alone
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        model = BTRewardModel(model_config)
    history = train_members(model, train, config, gen)
    model.eval().requires_grad_(False)
    centre(model, items, None if train.cond is None else torch.cat([train.cond, train.cond]))
    val = comparisons.subset(val_idx) if len(val_idx) else None
    with torch.no_grad():
        train_metrics = evaluate_comparisons(model, train)
        val_metrics = evaluate_comparisons(model, val) if val is not None else None
    result = FitResult(model, train_metrics, val_metrics, config, len(train_idx), len(val_idx), history)
    model.metadata = result.summary()
    return result


def train_members(model: BTRewardModel, train: Comparisons, config: FitConfig, gen: torch.Generator) -> list:
    """Fit all K members at once on the Bradley-Terry loss (summed over members), plus the no-class
    loss for a conditional model. Member k draws minibatches from its own resample of the pairs."""
    K, n, B = config.ensemble, len(train), min(config.batch_size, len(train))
    steps = max(config.min_steps, config.epochs * math.ceil(n / B))
    left, right = model.normalise(train.left), model.normalise(train.right)
    cond_idx = model.condition_index(train.cond, n)
    null = torch.full((K, B), model.num_classes, dtype=torch.long)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pools = (torch.randint(n, (K, n), generator=gen) if config.bootstrap
             else torch.arange(n).expand(K, n))
    history, running = [], 0.0
    for step in range(steps):
        idx = pools.gather(1, torch.randint(n, (K, B), generator=gen))  # (K, B): member k's minibatch
        h_l, h_r = model.net.trunk(torch.cat([left[idx], right[idx]], 1)).split(B, 1)  # one trunk pass
        y = train.choice[idx]
        loss = bt_loss(model.net.head(h_l, cond_idx[idx]) - model.net.head(h_r, cond_idx[idx]), y).mean(1).sum()
        if model.num_classes > 0:
            loss = loss + bt_loss(model.net.head(h_l, null) - model.net.head(h_r, null), y).mean(1).sum()
        if not torch.isfinite(loss):
            raise ValueError(f"reward model training diverged (non-finite loss at update {step}); "
                             "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach()) / K
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append((step + 1, running / (((step + 1) - 1) % 50 + 1)))
            running = 0.0
    return history


@torch.no_grad()
def centre(model: BTRewardModel, items: torch.Tensor, cond: torch.Tensor | None) -> None:
    """Set each member's offsets so its reward has mean 0 over the training items of each class
    (and over all of them for the no-class reward)."""
    model.offset.zero_()
    z_cond = None if cond is None else cond
    model.offset[:, model.num_classes] = model.member_rewards(items, None).mean(1)
    if model.num_classes > 0 and z_cond is not None:
        for c in z_cond.unique().tolist():
            sel = z_cond == c
            model.offset[:, c] = model.member_rewards(items[sel], torch.full((int(sel.sum()),), c)).mean(1)


@torch.no_grad()
def evaluate_comparisons(model: BTRewardModel, comparisons: Comparisons, bins: int = 10) -> dict:
    """comparison_metrics of the model's win probability on `comparisons`."""
    if tuple(comparisons.shape) != model.shape:
        raise ValueError(f"comparisons hold samples of shape {comparisons.shape}, "
                         f"the reward model expects {model.shape}")
    check_finite(comparisons)
    if comparisons.cond is None and model.num_classes > 0:
        cond = None  # the class-agnostic reward
    else:
        cond = comparisons.cond
    prob = torch.cat([model.win_probability(comparisons.left[i:i + 4096], comparisons.right[i:i + 4096],
                                            None if cond is None else cond[i:i + 4096])
                      for i in range(0, len(comparisons), 4096)]) if len(comparisons) else torch.zeros(0)
    if not bool(torch.isfinite(prob).all()):
        bad = int((~torch.isfinite(prob)).sum())
        raise ValueError(f"the reward model gives non-finite win probabilities for {bad} of {len(prob)} comparisons "
                         f"of finite samples (its rewards overflow); it cannot be evaluated")
    return comparison_metrics(prob, comparisons.choice, bins)


__all__ = ["Comparisons", "CHOICES", "save_comparisons", "load_comparisons", "BTRewardModel", "load_reward_model",
           "FitConfig", "FitResult", "fit_reward_model", "evaluate_comparisons", "comparison_metrics", "calibration",
           "PointRewardNet", "ImageRewardNet", "EnsembleLinear", "bt_loss"]
