"""`digits`: class-conditional 8x8 digits (sklearn's load_digits), our own UNet, a classifier reward.

Clock: the pretrained model and the action take DIFFUSION time s; rollouts run in RL time t = T - s.

Data: the 1797 8x8 images of `sklearn.datasets.load_digits`, grey levels 0..16 scaled to [-1, 1],
split once (stratified, random_state 0) into `train` (1197 images: the UNet and the classifier learn
from these only) and two disjoint held-out halves `heldout_a`, `heldout_b` (300 each) for the
classifier's accuracy and the Frechet distance with its real-vs-real floor.

Model: eps_theta of models/unet.py on the VP path, trained with time input lambda(s) = log SNR and
classifier-free guidance; `pretrained` is NetworkScore(GuidedUNet(frozen EMA weights, w)) with
guided eps_w = (1 + w) eps(x, c) - w eps(x, null). Reward "classifier": r(x, c) = log p(c | x) under
the project's classifier (differentiable in x); rewards are looked up in REWARDS, so others add
entries ("utility", "learned:DIR") without touching the task.

Checkpoint folder (what `scoreaction pretrain --task digits` writes, and what ships in
scoreaction/assets/digits): config.json (format, task, architectures, path, training options,
data split, metrics) + unet.safetensors (EMA weights) + classifier.safetensors. Never pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scoreaction.config import check_choice, check_nonnegative, check_positive_int
from scoreaction.image_metrics import image_report
from scoreaction.io import atomic_folder, atomic_write_bytes, load_matching
from scoreaction.models.adapter import NetworkScore
from scoreaction.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    DigitClassifier,
    accuracy,
    train_classifier,
)
from scoreaction.models.frozen import attach_frozen
from scoreaction.models.residual import posterior_gain
from scoreaction.models.unet import (
    GuidedUNet,
    UNet,
    UNetConfig,
    UNetTrainConfig,
    check_classes,
    fourier_embedding,
    train_unet,
)
from scoreaction.paths import GaussianPath, as_time, coef_like, make_path
from scoreaction.samplers import get_solver, make_grid
from scoreaction.tasks.base import Task, TaskConfig

FORMAT = "scoreaction-digits-1"
TASK_NAME = "digits"
NUM_CLASSES = 10
IMAGE_SIZE = 8
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "digits"
MANIFEST, UNET_FILE, CLASSIFIER_FILE = "config.json", "unet.safetensors", "classifier.safetensors"
SPLIT_SEED, HELDOUT = 0, 300  # two held-out halves of 300 images each
PREDICTION, TIME_INPUT = "eps", "log_snr"
RESIDUALS = ("x0", "eps")  # how EpsResidual's output is read
DATA_VAR = 0.29  # mean per-pixel variance of the train split (the scale of the `x0` residual's gain)


# --- data -----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.tensor(data.target, dtype=torch.long)
    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=2 * HELDOUT, stratify=data.target, random_state=SPLIT_SEED)
    a, b = train_test_split(held, test_size=HELDOUT, stratify=data.target[held], random_state=SPLIT_SEED)
    return {name: (images[i], labels[i]) for name, i in (("train", train), ("heldout_a", a), ("heldout_b", b))}


SPLITS = ("train", "heldout_a", "heldout_b")


def digits_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) long) of one split: train / heldout_a / heldout_b."""
    check_choice("split", split, SPLITS)
    images, labels = _digits()[split]
    return images.clone(), labels.clone()


# --- checkpoint folder ----------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict:
    """config.json of a digits checkpoint folder; anything missing or foreign is a one-line ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"digits checkpoint {str(folder)!r} is not a folder")
    file = folder / MANIFEST
    if not file.is_file():
        raise ValueError(f"digits checkpoint {str(folder)!r} is missing {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"digits checkpoint file {str(file)!r} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise ValueError(  # noqa: TRY004 (a corrupt file, not a wrong argument)
            f"digits checkpoint file {str(file)!r} must hold a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"digits checkpoint file {str(file)!r} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("task") != TASK_NAME:
        raise ValueError(f"digits checkpoint file {str(file)!r} is for task {manifest.get('task')!r}, expected {TASK_NAME!r}")
    return manifest


def _load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into `module`, checking every key, shape and that every value is finite; errors
    name the file."""
    if not file.is_file():
        raise ValueError(f"digits checkpoint {str(file.parent)!r} is missing {file.name}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"digits checkpoint file {str(file)!r} is truncated or corrupt ({err})") from None
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"digits checkpoint file {str(file)!r} has non-finite values (NaN or inf) in tensor {bad!r}")
    load_matching(module, tensors, f"digits checkpoint file {str(file)!r} does not match its config", allow_extra=False)


def _section(manifest: dict, name: str, folder: Path) -> dict:
    value = manifest.get(name)
    if not isinstance(value, dict) or not isinstance(value.get("config"), dict):
        raise ValueError(  # noqa: TRY004 (a corrupt file, not a wrong argument)
            f"digits checkpoint file {str(folder / MANIFEST)!r} has no {name!r} section with a 'config'")
    return value


def load_unet(folder: str | os.PathLike) -> tuple[UNet, GaussianPath, dict]:
    """(frozen UNet with the EMA weights, its path, its manifest section) from a checkpoint folder."""
    folder = Path(folder)
    section = _section(read_manifest(folder), "unet", folder)
    try:
        config = UNetConfig(**section["config"])
        path_options = dict(section.get("path", {}))
        path = make_path(path_options.pop("name", None), **path_options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"digits checkpoint file {str(folder / MANIFEST)!r}: bad unet section ({err})") from None
    if section.get("prediction") != PREDICTION or section.get("time_input") != TIME_INPUT:
        raise ValueError(f"digits checkpoint file {str(folder / MANIFEST)!r}: expected prediction {PREDICTION!r} and "
                         f"time_input {TIME_INPUT!r}, found {section.get('prediction')!r}, {section.get('time_input')!r}")
    if config.image_size != IMAGE_SIZE or config.channels != 1 or config.num_classes != NUM_CLASSES:
        raise ValueError(f"digits checkpoint file {str(folder / MANIFEST)!r}: expected 1x{IMAGE_SIZE}x{IMAGE_SIZE} "
                         f"images and {NUM_CLASSES} classes, found {config.channels}x{config.image_size}x"
                         f"{config.image_size} and {config.num_classes}")
    unet = UNet(config)
    _load_weights(unet, folder / UNET_FILE)
    return unet.eval().requires_grad_(False), path, section


def load_classifier(folder: str | os.PathLike) -> DigitClassifier:
    """The frozen digit classifier of a checkpoint folder."""
    folder = Path(folder)
    section = _section(read_manifest(folder), "classifier", folder)
    try:
        config = ClassifierConfig(**section["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"digits checkpoint file {str(folder / MANIFEST)!r}: bad classifier section ({err})") from None
    if config.image_size != IMAGE_SIZE or config.num_classes != NUM_CLASSES:
        raise ValueError(f"digits checkpoint file {str(folder / MANIFEST)!r}: classifier must take {IMAGE_SIZE}x"
                         f"{IMAGE_SIZE} images and {NUM_CLASSES} classes, found {config.image_size}, {config.num_classes}")
    model = DigitClassifier(config)
    _load_weights(model, folder / CLASSIFIER_FILE)
    return model.eval().requires_grad_(False)


def save_checkpoint(folder: str | os.PathLike, unet: UNet, classifier: DigitClassifier, manifest: dict, *,
                    replace: bool = False) -> Path:
    """Write the folder atomically: built beside its final name, then renamed into place (over an existing
    folder only with `replace`)."""
    with atomic_folder(folder, replace=replace) as tmp:
        save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(tmp / UNET_FILE))
        save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()},
                  str(tmp / CLASSIFIER_FILE))
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return Path(folder)


# --- rewards ----------------------------------------------------------------------------------------
class ClassifierReward:
    """r(x, c) = log p(c | x) under the project's digit classifier, shape (B,); differentiable in x.

    With cond None (unconditional samples) r(x) = max_c log p(c | x): how clearly x is some digit."""

    differentiable = True

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"digits reward expects images (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), found {tuple(x.shape)}")
        check_classes(cond, NUM_CLASSES)
        dtype = next(self.classifier.parameters()).dtype
        log_p = self.classifier.log_prob(x.to(dtype)).to(x.dtype)
        if cond is None:
            return log_p.max(-1).values
        if len(cond) != len(x):
            raise ValueError(f"digits reward needs one condition per image ({len(x)}), found {len(cond)}")
        return log_p.gather(1, cond.to(x.device).long()[:, None]).squeeze(1)


def classifier_reward(task: DigitsTask, argument: str) -> ClassifierReward:
    if argument:
        raise ValueError(f"reward 'classifier' takes no argument, found 'classifier:{argument}'")
    return ClassifierReward(task.classifier)


def utility_reward(task: DigitsTask, argument: str):
    """The hidden utility itself as the reward ('utility' or 'utility:NAME'): an oracle, for comparisons."""
    from scoreaction.rewards.utilities import make_utility

    return make_utility(TASK_NAME, argument or None)


def learned_reward(task: DigitsTask, argument: str):
    """A Bradley-Terry reward model fitted from comparisons ('learned:DIR', a `reward fit` folder)."""
    from scoreaction.rewards.preference import load_reward_model

    if not argument:
        raise ValueError("reward 'learned' needs the reward model's folder: 'learned:DIR'")
    model = load_reward_model(argument)
    shape, classes = tuple(model.config["shape"]), model.config["num_classes"]
    if shape != task.shape or classes not in (0, NUM_CLASSES):
        raise ValueError(f"reward model {argument!r} takes samples of shape {shape} with {classes} classes; the digits "
                         f"task needs shape {task.shape} and 0 or {NUM_CLASSES} classes")
    return model


# name -> factory(task, argument after the first ':') -> RewardModel
REWARDS: dict[str, Callable[[DigitsTask, str], Callable]] = {
    "classifier": classifier_reward, "utility": utility_reward, "learned": learned_reward}


def make_reward(task: DigitsTask, spec: str):
    """A reward by spec 'name' or 'name:argument' (e.g. 'learned:DIR')."""
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a string such as 'classifier', found {spec!r}")
    name, _, argument = spec.partition(":")
    if name not in REWARDS:
        raise ValueError(f"digits reward must be one of {sorted(REWARDS)} (optionally 'name:argument'), found {spec!r}")
    return REWARDS[name](task, argument)


# --- trainable actions ------------------------------------------------------------------------------
class EpsResidual(nn.Module):
    """A small conv net h(x, eps_pre, lambda, c) on top of the frozen model (zero-initialised output, so
    mu_theta starts exactly at the pretrained score), read in one of two ways (`residual`):

        eps  mu_theta = score of (eps_pre + h): h corrects the predicted noise, delta = -h / sigma(s)
        x0   mu_theta = s_pre + K_s h, K_s = `posterior_gain` (E2, E21): h corrects x0_hat by C_s h

    Under `eps` a correction the net keeps across noise levels is a score correction of the same size in the
    noise, where the reverse SDE of training forgets it (its effect on X_T scales as alpha(s)) but an ODE
    sampler carries it to the end: the fine-tuned model then gains more under DDIM than under the SDE it was
    trained with. Under `x0` it fades as alpha(s), as the optimal correction grad log phi does (E8). (Measured on
    the quickstart: the net can still learn to undo the fade, and does with E11's one-step TD advantages; with
    Monte-Carlo advantages, gae_lambda = 1, `x0` kept the gain across Euler-Maruyama step counts better than `eps`.)

    Works in score space on top of the pretrained score model, so a cached s_pre (`takes_pretrained`)
    saves the UNet: re-scoring stored transitions then costs only this net."""

    takes_pretrained = True

    def __init__(self, pretrained: NetworkScore, width: int = 32, residual: str = "eps"):
        super().__init__()
        check_choice("residual", residual, RESIDUALS)
        attach_frozen(self, "pretrained", pretrained)
        self.path, self.width, self.residual = pretrained.path, width, residual
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.classes = nn.Embedding(NUM_CLASSES + 1, 2 * width)
        self.conv_in = nn.Conv2d(2, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, s, x: torch.Tensor, cond: torch.Tensor | None = None, s_pre: torch.Tensor | None = None
                ) -> torch.Tensor:
        if s_pre is None:
            s_pre = self.pretrained(s, x, cond)
        b = x.shape[0]
        s = as_time(s).to(x).reshape(-1).expand(b)
        eps_pre = self.path.from_score(PREDICTION, s_pre, s, x)
        c = torch.full((b,), NUM_CLASSES, dtype=torch.long, device=x.device) if cond is None else cond.long()
        emb = self.time(fourier_embedding(0.1 * self.path.log_snr(s).to(x.dtype), self.width)) + self.classes(c)
        scale, shift = emb[:, :, None, None].chunk(2, 1)
        h = nn.functional.silu(self.conv_in(torch.cat([x, eps_pre], dim=1)))
        h = nn.functional.silu(self.conv_mid(h) * (1 + scale) + shift)
        if self.residual == "x0":
            return s_pre + coef_like(posterior_gain(self.path, s, DATA_VAR), x) * self.conv_out(h)
        return self.path.to_score(PREDICTION, eps_pre + self.conv_out(h), s, x)


class CastTo(nn.Module):
    """Run a frozen network in its own dtype whatever the dtype of x (the trainer may use float64)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, time_input, cond=None):
        dtype = next(self.net.parameters()).dtype
        return self.net(x.to(dtype), torch.as_tensor(time_input).to(dtype), cond).to(x.dtype)


# --- the task ---------------------------------------------------------------------------------------
ACTIONS = ("full", "residual")


@dataclass
class DigitsConfig(TaskConfig):
    """Options of the digits task. `checkpoint` / `classifier`: folders (None: the shipped model); `path`
    must name the checkpoint's path (its options come from the checkpoint)."""

    name: str = TASK_NAME
    checkpoint: str | None = None
    classifier: str | None = None  # the reward's and the metrics' classifier; None: the shipped one
    guidance: float = 0.0  # classifier-free guidance weight w of the pretrained model (and of the action)
    reward: str = "classifier"
    classes: list | None = None  # classes that conditions are drawn from; None: all ten
    # residual: frozen UNet + zero-initialised conv net on eps (14k parameters; stable at the trainer's default
    # lr 1e-3, ~30% cheaper per update); full: a trainable copy of the UNet (673k; needs lr <= 1e-4)
    action: str = "residual"
    residual_width: int = 32
    residual: str = "eps"  # how the residual net's output is read: eps or x0 (fades in the noise; EpsResidual)

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative("guidance", self.guidance)
        check_choice("action", self.action, ACTIONS)
        check_positive_int("residual_width", self.residual_width)
        check_choice("residual", self.residual, RESIDUALS)
        if self.classes is not None:
            if (not isinstance(self.classes, list) or not self.classes
                    or not all(isinstance(c, int) and not isinstance(c, bool) for c in self.classes)):
                raise ValueError(f"classes must be a non-empty list of class labels, found {self.classes!r}")
            bad = [c for c in self.classes if not 0 <= c < NUM_CLASSES]
            if bad:
                raise ValueError(f"classes must lie in 0..{NUM_CLASSES - 1}, found {bad[0]}")


class DigitsTask(Task):
    name = TASK_NAME
    num_classes = NUM_CLASSES
    shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    eval_n, eval_steps = 512, 50  # the trainer's evaluation defaults: 4096 x 200 steps of a UNet is ~20 CPU-min
    sample_n, sample_steps = 1000, 50  # `scoreaction sample`'s defaults (about a CPU-minute)

    def __init__(self, config: DigitsConfig | None = None):
        self.config = config = config or DigitsConfig()
        folder = Path(config.checkpoint) if config.checkpoint is not None else SHIPPED
        self.unet, self.path, self.unet_info = load_unet(folder)
        if config.path != self.path.name or (config.path_options and make_path(
                config.path, **config.path_options).config() != self.path.config()):
            raise ValueError(f"digits checkpoint {str(folder)!r} was trained on path {self.path.config()}; "
                             f"found path {config.path!r} with options {config.path_options}")
        self.classifier = load_classifier(Path(config.classifier) if config.classifier is not None else SHIPPED)
        self.guidance = float(config.guidance)
        self.pretrained = NetworkScore(CastTo(GuidedUNet(self.unet, self.guidance)), self.path, PREDICTION, TIME_INPUT)
        self.pretrained.requires_grad_(False)
        self.reward = make_reward(self, config.reward)
        self.beta_kl, self.eta = float(config.beta_kl), float(config.eta)
        self.classes = torch.tensor(config.classes if config.classes is not None else list(range(NUM_CLASSES)))

    def sample_conditions(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n class labels drawn uniformly from `classes`, (n,) long."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of conditions must be a positive integer, found {n!r}")
        return self.classes[torch.randint(len(self.classes), (n,), generator=generator)]

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Grey levels in [-1, 1] -> [0, 1]."""
        return (x.clamp(-1, 1) + 1) / 2

    def make_action(self, hidden: int = 128) -> nn.Module:
        """mu_theta(s, x, c), starting exactly at the pretrained score (Eq. E3): a trainable copy of the
        guided UNet (`action: full`) or the frozen one plus a zero-initialised conv net on eps (`residual`)."""
        if self.config.action == "residual":
            return EpsResidual(self.pretrained, self.config.residual_width, self.config.residual)
        return NetworkScore(GuidedUNet(copy.deepcopy(self.unet).requires_grad_(True), self.guidance), self.path,
                            PREDICTION, TIME_INPUT)

    # --- images and their metrics ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, score=None, cond: torch.Tensor | None = None, *, solver: str = "ddim", steps: int = 50,
               eta: float | None = None, seed: int = 0, grid: str = "uniform") -> torch.Tensor:
        """Images (B, 1, 8, 8) for the conditions `cond` from a score function (default: pretrained)."""
        check_classes(cond, NUM_CLASSES)
        sol = get_solver(solver)
        gen = torch.Generator().manual_seed(seed)
        n = 1 if cond is None else len(cond)
        x = self.prior_sample(n, generator=gen)
        ts = make_grid(grid, self.path, steps, generator=gen)
        return sol.sample(self.path, self.pretrained if score is None else score, x, ts, cond=cond,
                          eta=sol.default_eta if eta is None else eta, generator=gen)

    def image_report(self, score=None, *, per_class: int = 30, solver: str = "ddim", steps: int = 50,
                     seed: int = 0, eta: float | None = None) -> dict:
        """Class accuracy, Frechet distance to heldout_b with its floor FD(heldout_a, heldout_b), and
        diversity, of per_class samples of each class (per_class = 30 matches the 300 real images)."""
        cond = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        x = self.sample(score, cond, solver=solver, steps=steps, eta=eta, seed=seed)
        (real_a, labels_a), (real_b, _) = digits_data("heldout_a"), digits_data("heldout_b")
        out = image_report(self.classifier, x.float(), cond, real_a, real_b, labels_a)
        out.update({"solver": solver, "steps": steps, "n": len(cond), "guidance": self.guidance})
        return out


# --- pretraining ------------------------------------------------------------------------------------
PRETRAIN_STEPS = 1500


def pretrain(out: str | os.PathLike, *, steps: int = PRETRAIN_STEPS, seed: int = 0,
             unet_config: UNetConfig | None = None, train_config: UNetTrainConfig | None = None,
             classifier_config: ClassifierTrainConfig | None = None, evaluate: bool = True,
             log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Train the classifier and the UNet on the train split and write a checkpoint folder to `out` (an existing
    folder there is replaced only with `overwrite`).

    Everything is seeded from `seed`: same seed, torch build and thread count -> the same weights."""
    check_positive_int("steps", steps)
    train_config = dataclasses.replace(train_config or UNetTrainConfig(), steps=steps)
    unet_config = unet_config or UNetConfig(base=24, mults=[1, 2, 2], blocks=1, attention=[4])
    classifier_config = classifier_config or ClassifierTrainConfig()
    images, labels = digits_data("train")
    held_a, held_b = digits_data("heldout_a"), digits_data("heldout_b")
    start = time.perf_counter()

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights
    classifier = DigitClassifier(ClassifierConfig())
    classifier, clf_log = train_classifier(classifier, images, labels, classifier_config, generator=gen)
    clf_acc = {name: accuracy(classifier, *data) for name, data in (("heldout_a", held_a), ("heldout_b", held_b))}
    log(f"classifier: {clf_log['seconds']:.0f} s, held-out accuracy {clf_acc['heldout_a']:.4f} / {clf_acc['heldout_b']:.4f}")
    classifier.requires_grad_(False)

    path = make_path("vp")
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    unet = UNet(unet_config)
    ema, history = train_unet(unet, path, images, labels, train_config, generator=gen, time_input=path.log_snr,
                              log=lambda e: log(f"unet step {e['step']:6d}  loss {e['loss']:.4f}  {e['seconds']:.0f} s"),
                              log_every=max(1, min(100, steps // 10)))
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT, "task": TASK_NAME,
        "command": (f"scoreaction pretrain --task digits --steps {steps} --seed {seed} --threads {torch.get_num_threads()}"
                    + (f" --classifier-epochs {classifier_config.epochs}"
                       if classifier_config.epochs != ClassifierTrainConfig.epochs else "")),
        "seed": seed, "seconds": round(seconds, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data": {"source": "sklearn.datasets.load_digits", "scaling": "x / 8 - 1 (0..16 -> [-1, 1])",
                 "split_seed": SPLIT_SEED, "train": len(labels), "heldout_a": len(held_a[1]), "heldout_b": len(held_b[1])},
        "unet": {"config": unet_config.to_dict(), "path": path.config(), "prediction": PREDICTION,
                 "time_input": TIME_INPUT, "weights": "ema", "train": train_config.to_dict(),
                 "parameters": sum(p.numel() for p in ema.parameters()), "final_loss": history[-1]["loss"],
                 "history": history},
        "classifier": {"config": classifier.config.to_dict(), "train": classifier_config.to_dict(),
                       "parameters": sum(p.numel() for p in classifier.parameters()),
                       "heldout_accuracy": clf_acc, "seconds": round(clf_log["seconds"], 1)},
    }
    folder = save_checkpoint(out, ema, classifier, manifest, replace=overwrite)
    if evaluate:
        metrics = {}
        for w in (0.0, 1.0):
            task = DigitsTask(DigitsConfig(checkpoint=str(folder), classifier=str(folder), guidance=w))
            rep = task.image_report()
            rep.pop("class_per_class")
            metrics[f"guidance_{w:g}"] = rep
            log(f"samples (ddim, 50 steps, guidance {w:g}): class accuracy {rep['class_accuracy']:.3f}, "
                f"Frechet {rep['frechet']:.3f} (real-vs-real floor {rep['frechet_floor']:.3f}), "
                f"pixel diversity {rep['diversity_pixel_pairwise']:.3f} (real {rep['real_diversity_pixel_pairwise']:.3f})")
        manifest["metrics"] = metrics
        atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest
