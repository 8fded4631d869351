"""What the quickstart and the digits benchmark share: the RLHF loop on the shipped 8x8 digits model.

    DigitsLoopConfig    the feedback, reward-model and fine-tuning settings both experiments take
    learn_reward        pretrained samples -> preference store -> comparisons -> Bradley-Terry ensemble
    digits_train_config the fine-tuning run on that learned reward (a TrainConfig)
    image_metrics       class accuracy, Frechet distance (and its real-vs-real floor), diversity of samples

The results are typed: LearnedReward (with Feedback, RewardFit, FitScores, LearnSeconds) and ImageMetrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from scoreaction.config import (
    Options,
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_samples,
    check_seed,
    check_steps,
    option,
)
from scoreaction.feedback.labelers import SimulatedLabeler
from scoreaction.feedback.selection import select_pairs
from scoreaction.feedback.store import PreferenceStore
from scoreaction.rewards.preference import fit_reward_model
from scoreaction.rewards.utilities import make_utility
from scoreaction.samplers import GRIDS
from scoreaction.tasks.digits import NUM_CLASSES, RESIDUALS, DigitsConfig, DigitsTask, digits_data
from scoreaction.train import TrainConfig
from scoreaction.train.config import LR_SCHEDULES

TASK = "digits"
LABELER = "simulated"


@dataclass
class DigitsLoopConfig(Options):
    """Settings of the loop: feedback, the reward model and the fine-tuning budget."""

    seed: int = option(0, help="random seed of every stage")
    items: int = option(1000, help="pretrained samples shown for comparison (balanced over the ten classes)")
    pairs: int = option(2000, help="comparisons asked, each between two samples of the same class")
    utility: str = option("taste", help="the simulated labeler's hidden utility (never seen by the learner)")
    temperature: float = option(1.0, help="the simulated labeler's Bradley-Terry temperature (0: no noise)")
    beta_kl: float = option(0.4, help="weight of the KL penalty to the pretrained model during fine-tuning")
    updates: int = option(120, help="fine-tuning updates")
    batch_size: int = option(64, help="rollouts per fine-tuning update")
    steps: int = option(20, help="Euler-Maruyama steps of the training rollouts (and of the stage-1 samples)")
    grid: str = option("uniform", help="time grid of the training rollouts")
    # gae_lambda 1: Monte-Carlo advantages. With E11's one-step TD advantages the policy follows the value net's
    # x-gradient, which at high noise is spurious (the true one fades as alpha(s)): the control learned there is
    # nearly invisible to the training SDE but is carried to the end by ODE samplers. Quickstart, 1 thread: TD,
    # eps residual, constant lr: DDIM 50 gained 1.37x the EM-20 gain (Frechet 4.2 -> 32.7); lambda = 1, x0
    # residual, linear lr decay: 1.03x (4.2 -> 14.9, the exact tilt at that gain 16.4; docs/quickstart).
    algo: dict = option(factory=lambda: {"lr": 1e-3, "gae_lambda": 1.0}, flag=False,
                        help="options of the fine-tuning algorithm, e.g. {lr: 1e-3, gae_lambda: 1.0}")
    lr_schedule: str = option("linear", help="the policy's learning rate over the run: linear from algo.lr to 0, or "
                                             "constant (TrainConfig.lr_schedule)")
    residual: str = option("x0", help="how the trainable residual's output is read (DigitsConfig.residual): x0, a "
                                      "correction that fades in the noise as the optimal one does, or eps")
    per_class: int = option(30, help="evaluation samples per class (30 x 10 matches the 300 real digits of the "
                                     "Frechet floor)")

    def __post_init__(self):
        for name in ("items", "pairs", "updates", "batch_size", "steps", "per_class"):
            check_positive_int(name, getattr(self, name))
        check_samples("items", self.items, (1, 8, 8))  # digit images of 8 x 8 float32
        check_samples("per_class", self.per_class * 10, (1, 8, 8))
        check_steps("steps", self.steps)
        check_positive("beta_kl", self.beta_kl)
        check_nonnegative("temperature", self.temperature)
        check_seed("seed", self.seed)
        if self.items < 2 * NUM_CLASSES:
            raise ValueError(f"items must be at least {2 * NUM_CLASSES} (two per class), found {self.items}")
        counts = torch.bincount(balanced_classes(self.items), minlength=NUM_CLASSES)
        most = int((counts * (counts - 1) // 2).sum())
        if self.pairs > most:
            raise ValueError(f"pairs must be at most {most}, the same-class pairs among {self.items} items, "
                             f"found {self.pairs}")
        check_choice("grid", self.grid, GRIDS)
        check_choice("residual", self.residual, RESIDUALS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not isinstance(self.algo, dict):
            raise ValueError(f"algo must be a mapping of options, found {self.algo!r}")
        make_utility(TASK, self.utility)  # a clear error for an unknown utility, before any work


def balanced_classes(n: int) -> torch.Tensor:
    """n class labels cycling through 0..9: as equal a share of each class as n allows."""
    return torch.arange(n) % NUM_CLASSES


# --- typed results --------------------------------------------------------------------------------
@dataclass
class Feedback:
    labeler: str  # "simulated", or the person's name in the web app
    comparisons: int
    items: int
    temperature: float | None  # the simulated labeler's; None for a person
    utility: str  # the hidden utility (the simulated labeler's taste; for a person, a proxy only)


@dataclass
class ReliabilityBin:
    lo: float
    hi: float
    count: int
    predicted: float
    observed: float


@dataclass
class FitScores:
    """A reward model's scores on a set of comparisons (rewards.preference.comparison_metrics)."""

    n: int
    n_non_tied: int
    accuracy: float
    log_likelihood: float
    ece: float
    reliability: list[ReliabilityBin] = field(default_factory=list)

    @classmethod
    def from_metrics(cls, metrics: dict) -> FitScores:
        return cls(n=metrics["n"], n_non_tied=metrics["n_non_tied"], accuracy=metrics["accuracy"],
                   log_likelihood=metrics["log_likelihood"], ece=metrics["ece"],
                   reliability=[ReliabilityBin(**b) for b in metrics.get("reliability", [])])


@dataclass
class RewardFit:
    folder: str
    validation: FitScores  # held-out comparisons (the training ones where none are held out)
    train: FitScores
    ceiling: float | None  # the simulated labeler's own accuracy on these pairs; None for a person
    n_train: int
    n_val: int


@dataclass
class LearnSeconds:
    items: float
    feedback: float
    reward: float


@dataclass
class LearnedReward:
    """What stages 1-3 leave: the reward model's folder, the stage-1 items and what to report about them."""

    reward_dir: Path
    x: torch.Tensor  # the pretrained items (N, 1, 8, 8)
    cond: torch.Tensor  # their class labels (N,)
    feedback: Feedback
    fit: RewardFit
    seconds: LearnSeconds


@dataclass
class ImageMetrics:
    class_accuracy: float
    frechet: float  # in the digit classifier's features, against held-out real digits
    frechet_floor: float  # the same distance between two disjoint sets of real digits
    diversity_pixel_pairwise: float
    diversity_feature_variance: float


# --- stages 1-3: the learned reward -----------------------------------------------------------------
def learn_reward(config: DigitsLoopConfig, out: Path, utility, log: Callable[[str], None],
                 ask: Callable[[PreferenceStore], str] | None = None) -> LearnedReward:
    """Pretrained samples into OUT/store.sqlite, comparisons of same-class pairs, a Bradley-Terry reward
    ensemble in OUT/reward. The simulated labeler answers, unless `ask(store)` is given: it has a person
    answer the queue and returns the labeler's name."""
    task = DigitsTask(DigitsConfig(reward="classifier"))

    # 1. items: samples of the pretrained model under the training sampler, into the preference store
    t = time.perf_counter()
    store_path = out / "store.sqlite"
    if store_path.exists():  # a fresh experiment each run; the previous store would mix two runs' answers
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    store = PreferenceStore(store_path, create=True)
    cond = balanced_classes(config.items)
    x = task.sample(None, cond, solver="em", steps=config.steps, seed=config.seed).float()
    ids = store.add_items(x, task=TASK, conditions=[int(c) for c in cond], model="pretrained:digits")
    items_seconds = time.perf_counter() - t
    log(f"[1/5] {len(ids)} pretrained samples in {store_path} ({items_seconds:.0f} s)")

    # 2. comparisons: pairs within a class, answered by the simulated labeler or a person
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    pairs = select_pairs(len(ids), config.pairs, cond=cond, generator=gen)
    store.enqueue_pairs([(ids[i], ids[j]) for i, j in pairs])
    labeler = SimulatedLabeler(utility, temperature=config.temperature, seed=config.seed, name=LABELER)
    if ask is not None:
        who = ask(store)
    else:
        who = LABELER
        left, right = x[[i for i, _ in pairs]], x[[j for _, j in pairs]]
        choices = labeler.choose(left, right, cond[[i for i, _ in pairs]])
        store.add_comparisons([{"left": ids[i], "right": ids[j], "choice": c, "labeler": LABELER}
                               for (i, j), c in zip(pairs, choices)])
    comparisons = store.dataset(task=TASK, labeler=who)
    feedback_seconds = time.perf_counter() - t
    log(f"[2/5] {len(comparisons)} comparisons by {who!r} ({feedback_seconds:.0f} s)")

    # 3. the Bradley-Terry reward ensemble, fitted on those comparisons only
    t = time.perf_counter()
    fit = fit_reward_model(comparisons, seed=config.seed, num_classes=NUM_CLASSES)
    reward_dir = fit.model.save(out / "reward")
    val = fit.validation or fit.train
    ceiling = None if ask is not None else labeler.ceiling_accuracy(comparisons.left, comparisons.right,
                                                                     comparisons.cond)
    reward_seconds = time.perf_counter() - t
    log(f"[3/5] reward model {reward_dir}: held-out accuracy {val['accuracy']:.3f}"
        + (f" (the labeler's own ceiling {ceiling:.3f})" if ceiling is not None else "") + f" ({reward_seconds:.0f} s)")
    return LearnedReward(
        reward_dir=reward_dir, x=x, cond=cond,
        feedback=Feedback(labeler=who, comparisons=len(comparisons), items=len(ids),
                          temperature=None if ask is not None else config.temperature, utility=config.utility),
        fit=RewardFit(folder=str(reward_dir), validation=FitScores.from_metrics(val),
                      train=FitScores.from_metrics(fit.train), ceiling=ceiling, n_train=fit.n_train, n_val=fit.n_val),
        seconds=LearnSeconds(items=items_seconds, feedback=feedback_seconds, reward=reward_seconds))


# --- stage 4: fine-tuning on the learned reward -----------------------------------------------------
def digits_train_config(config: DigitsLoopConfig, reward_dir: str | Path, out: str | Path, algorithm: str = "ctrl",
                        algo: dict | None = None) -> TrainConfig:
    """The fine-tuning run on the learned reward (the trainer's own final evaluation is cheap: the
    experiments evaluate after it)."""
    return TrainConfig.from_dict({
        "task": {"name": TASK, "reward": f"learned:{reward_dir}", "beta_kl": config.beta_kl,
                 "residual": config.residual},
        "algorithm": algorithm, "algo": dict(config.algo if algo is None else algo), "steps": config.steps,
        "grid": config.grid, "lr_schedule": config.lr_schedule, "batch_size": config.batch_size,
        "updates": config.updates, "seed": config.seed,
        "eval_every": 0, "eval_n": NUM_CLASSES * config.per_class, "eval_steps": config.steps, "out": str(out)})


# --- image metrics --------------------------------------------------------------------------------
def heldout_real() -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of held-out real digits (images only): the Frechet reference and its floor."""
    return digits_data("heldout_a")[0], digits_data("heldout_b")[0]


def image_metrics(task: DigitsTask, x: torch.Tensor, cond: torch.Tensor,
                  real: tuple[torch.Tensor, torch.Tensor]) -> ImageMetrics:
    """Class accuracy, Frechet distance to real[1] with its floor FD(real[0], real[1]), and diversity."""
    from scoreaction.image_metrics import image_report

    out = image_report(task.classifier, x, cond, real[0], real[1])
    return ImageMetrics(**{f.name: out[f.name] for f in fields(ImageMetrics)})
