"""`scoreaction quickstart`: the whole RLHF loop on images, end to end, on a laptop-class CPU.

    shipped digits model -> sample items -> preference store -> comparisons (a simulated labeler
    with a hidden taste, or a person in the web app) -> Bradley-Terry reward ensemble -> ctrl
    fine-tuning with beta_KL > 0 on the LEARNED reward -> evaluation -> report.html

Stages 1-3 and the training config are shared with the digits benchmark (digits_loop.py).
Clock: RL time t inside the trainer; the samplers take the pretrained and fine-tuned scores.

What the evaluation measures (the fine-tuned policy against the pretrained model, on the same prior
draws, Brownian increments and class labels, so every difference is paired):
  * the hidden utility (the labeler's taste, never seen by the learner) in units of its standard
    deviation over pretrained samples, and the learned reward in its own units: when the learned
    reward rises much more than the utility, the policy exploits the reward model;
  * how often the learned reward orders pairs of samples as the hidden utility does, on pretrained
    and on fine-tuned samples (reward models degrade off their training distribution);
  * class accuracy, Frechet distance in the classifier's features (with its real-vs-real floor) and
    diversity, before and after, and the path KL to the pretrained model;
  * the exact tilt: the KL-optimal distribution with the same utility gain, as a reference;
  * all of the above under the training sampler and under other solvers and step counts: the
    fine-tuned policy is a score field and should keep its gain under any of them. Per sampler, the
    gain as a fraction of the training sampler's, and the Frechet distance beside that of the exact
    tilt of THAT sampler's pretrained samples at THAT sampler's gain (each solver has its own
    pretrained distribution: DDIM's is sharper than a 20-step Euler-Maruyama chain's).

Everything lands in the run folder: store.sqlite, reward/ (safetensors + JSON), train/
(checkpoints, metrics.jsonl), results.json (a QuickstartResults), report.html and its PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scoreaction.config import option
from scoreaction.experiments.digits_loop import (
    NUM_CLASSES,
    TASK,
    DigitsLoopConfig,
    Feedback,
    ImageMetrics,
    RewardFit,
    balanced_classes,
    digits_train_config,
    heldout_real,
    image_metrics,
    learn_reward,
)
from scoreaction.feedback.store import PreferenceStore
from scoreaction.io import LOCK, STALE, atomic_write_bytes
from scoreaction.outputs import Output, claim_folder
from scoreaction.rewards.utilities import make_utility
from scoreaction.samplers import SOLVERS as SOLVER_NAMES
from scoreaction.tasks.digits import DigitsTask
from scoreaction.train import Trainer

FORMAT = "scoreaction-quickstart-3"
HUMAN = "you"
MIN_HUMAN_ANSWERS = 20
# what a quickstart folder holds (and nothing else): a rerun replaces such a folder, never another one
WRITES = ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "reward", "train", "results.json", "report.html")


def is_quickstart_folder(folder: Path) -> bool:
    """A folder a quickstart wrote, whole or cut short: its store, and only names that it writes."""
    names = [e.name for e in folder.iterdir() if e.name != LOCK and not STALE.match(e.name)]
    return "store.sqlite" in names and all(n in WRITES or (n.endswith(".png") and (folder / n).is_file())
                                           for n in names)


OUTPUT = Output("quickstart folder (store.sqlite, reward/, train/, report.html)", True, is_quickstart_folder)
# (solver, steps) of the evaluation; the training sampler (em, `steps`) is added in front
SOLVERS = (("em", 10), ("em", 50), ("ddim", 10), ("ddim", 50), ("heun", 10), ("dpm2", 20))


@dataclass
class QuickstartConfig(DigitsLoopConfig):
    """The loop's settings (DigitsLoopConfig) plus where the run goes, who labels and the evaluation's solvers."""

    out: str = option("runs/quickstart", help="run folder: store, reward model, checkpoints, results.json, report.html")
    human: bool = option(False, help="you label the pairs in the web app instead of the simulated labeler")
    host: str = option("127.0.0.1", help="address of the web app with --human")
    port: int = option(8765, help="port of the web app with --human (0: any free port)")
    solvers: list = option(factory=lambda: [list(s) for s in SOLVERS], flag=False,
                           help="[solver, steps] pairs the evaluation samples with, besides the training sampler")

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.port, int) and not isinstance(self.port, bool) and 0 <= self.port <= 65535):
            raise ValueError(f"port must be an integer in 0..65535, found {self.port!r}")
        self.solvers = [list(s) for s in self.solvers]
        if not all(len(s) == 2 and s[0] in SOLVER_NAMES and isinstance(s[1], int) and s[1] >= 1 for s in self.solvers):
            raise ValueError(f"solvers must be [solver, steps] pairs with a solver in {sorted(SOLVER_NAMES)} and "
                             f"steps >= 1, found {self.solvers!r}")


# --- typed results --------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per stage."""

    items: float
    feedback: float
    reward: float
    train: float
    evaluate: float
    total: float


TRAINING_FIELDS = ("step", "trajectories", "reward_mean", "utility_mean", "path_kl", "J", "message")


@dataclass
class TrainingPoint:
    """One fine-tuning update (a row of train/metrics.jsonl): the batch means the report plots, and the
    algorithm's and trainer's other figures in `diagnostics` (eval_* at the last update)."""

    step: int
    trajectories: int
    reward_mean: float | None = None  # None: the update was skipped (see `message`)
    utility_mean: float | None = None  # the hidden utility, watched, never optimised
    path_kl: float | None = None
    J: float | None = None
    message: str | None = None
    diagnostics: dict = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, row: dict) -> TrainingPoint:
        return cls(**{k: row[k] for k in TRAINING_FIELDS if k in row},
                   diagnostics={k: v for k, v in row.items() if k not in TRAINING_FIELDS})


@dataclass
class ModelScores(ImageMetrics):
    """One model's samples under one sampler: means and standard errors, ranking agreement, image metrics."""

    utility: float
    utility_se: float
    reward: float
    reward_se: float
    agreement: float  # fraction of same-class pairs the learned reward orders as the hidden utility


@dataclass
class ExactTilt:
    """The KL-optimal distribution with the fine-tuned policy's utility gain: pretrained items (`items` of them,
    under one sampler) reweighted within each class by exp(inverse_beta * u)."""

    gain: float
    inverse_beta: float
    class_accuracy: float
    frechet: float
    kl: float  # KL(tilt || pretrained items), nats, mean over classes
    min_effective_items_per_class: float
    items_per_class: int


@dataclass
class SolverRow:
    """Pretrained and fine-tuned under one sampler, from the same noise; gains are paired means. `tilt` is the
    exact tilt of this sampler's own pretrained items at this sampler's utility gain; `gain_vs_training` the
    utility gain over the training sampler's (settings[0]) and `frechet_vs_tilt` the fine-tuned model's Frechet
    distance over the tilt's: 1 and 1 for a fine-tuned score field that is the KL-optimal one under every
    sampler."""

    solver: str
    steps: int
    pretrained: ModelScores
    finetuned: ModelScores
    utility_gain: float
    utility_gain_se: float
    reward_gain: float
    reward_gain_se: float
    tilt: ExactTilt | None = None
    gain_vs_training: float | None = None
    frechet_vs_tilt: float | None = None


@dataclass
class Summary:
    """The headline figures, under the training sampler (settings[0])."""

    solver: str
    steps: int
    utility_gain_sd: float  # in standard deviations of the hidden utility over pretrained items
    utility_gain_sd_se: float
    reward_gain_sd: float  # in standard deviations of the learned reward over pretrained items
    path_kl: float | None  # path KL to the pretrained model, the trainer's final evaluation
    tilt_gain_sd: float


@dataclass
class QuickstartResults:
    config: QuickstartConfig
    timings: Timings
    threads: int
    torch: str
    feedback: Feedback
    reward_model: RewardFit
    history: list[TrainingPoint]
    settings: list[SolverRow]  # the training sampler first
    cond: list[int]  # class labels of the evaluation samples
    utility_std_pretrained: float
    reward_std_pretrained: float
    exact_tilt: ExactTilt  # the training sampler's (settings[0].tilt)
    summary: Summary
    format: str = FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvaluationSamples:
    """The images and values behind the report's figures (not saved in results.json)."""

    images: dict[str, torch.Tensor]  # "pretrained_em20", "finetuned_em20", ...: (N, 1, 8, 8)
    scatter: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "pretrained" / "finetuned": (utility, reward)


def run(config: QuickstartConfig, log: Callable[[str], None] = print, progress: bool = True) -> QuickstartResults:
    """Run every stage; returns the results (also written to OUT/results.json) and writes OUT/report.html.
    OUT is new, or a quickstart folder of an earlier run, which is replaced (moved aside, then deleted; never
    a folder of anything else); it is locked while the run writes it."""
    with claim_folder(config.out, OUTPUT, fresh=True, overwrite=True, what="quickstart folder"):
        return _run(config, Path(config.out), log, progress)


def _run(config: QuickstartConfig, out: Path, log: Callable[[str], None], progress: bool) -> QuickstartResults:
    from scoreaction.experiments.report import write_report

    start = time.perf_counter()
    utility = make_utility(TASK, config.utility)
    ask = (lambda store: collect_human(store, config, log)) if config.human else None
    learned = learn_reward(config, out, utility, log, ask=ask)  # stages 1-3

    # 4. ctrl on the learned reward, with the hidden utility watched (never optimised)
    t = time.perf_counter()
    trainer = Trainer(digits_train_config(config, learned.reward_dir, out / "train"), progress=progress,
                      monitors={"utility": utility})
    trainer.run()
    history = [TrainingPoint.from_metrics(json.loads(line))
               for line in (out / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()][-config.updates:]
    train_seconds = time.perf_counter() - t
    log(f"[4/5] {config.updates} ctrl updates ({config.updates * config.batch_size} trajectories) in "
        f"{out / 'train'} ({train_seconds:.0f} s)")

    # 5. evaluation, paired: pretrained vs fine-tuned under every sampler
    t = time.perf_counter()
    settings, cond, samples = evaluate(trainer.task, trainer.policy, utility, config, progress=progress)
    x, c = learned.x, learned.cond
    with torch.no_grad():  # the units of the gains: spreads over the pretrained items of stage 1
        u = utility(x, c)
        utility_std = float(u.std())
        reward_std = float(trainer.task.reward(x, c).std())
    tilt_per_solver(trainer.task, utility, settings, learned.x, config)
    tilt = settings[0].tilt
    evaluate_seconds = time.perf_counter() - t
    log(f"[5/5] evaluation under {len(settings)} samplers ({evaluate_seconds:.0f} s)")

    timings = Timings(**dataclasses.asdict(learned.seconds), train=train_seconds, evaluate=evaluate_seconds,
                      total=time.perf_counter() - start)
    results = QuickstartResults(
        config=config, timings=timings, threads=torch.get_num_threads(), torch=torch.__version__,
        feedback=learned.feedback, reward_model=learned.fit, history=history, settings=settings, cond=cond,
        utility_std_pretrained=utility_std, reward_std_pretrained=reward_std, exact_tilt=tilt,
        summary=summarise(settings, history, utility_std, reward_std, tilt))
    atomic_write_bytes(out / "results.json", json.dumps(results.to_dict(), indent=1, default=float).encode())
    report = write_report(results, out, samples)
    log(f"report {report} ({timings.total:.0f} s in all)")
    return results


# --- the web app for a person ---------------------------------------------------------------------
def collect_human(store: PreferenceStore, config: QuickstartConfig, log: Callable[[str], None],
                  on_ready: Callable[[str, str], None] | None = None, poll: float = 0.5,
                  min_answers: int = MIN_HUMAN_ANSWERS) -> str:
    """Serve the labeling app until the person has answered the queue (or presses Ctrl-C after at least
    `min_answers` answers); returns the labeler's name. `on_ready(url, token)` is for tests."""
    from scoreaction.feedback.app import create_app
    from scoreaction.feedback.server import listen, make_server, url_of

    token = store.add_labeler(HUMAN, replace=True)
    sock = listen(config.host, config.port)
    url = f"{url_of(sock)}?token={token}"
    server = make_server(create_app(store))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    log(f"open {url} and say which digit of each pair you prefer ({len(store.queue())} pairs; keys: "
        "left / right arrow, T tie, S skip, U undo). Ctrl-C continues with the answers so far.")
    if on_ready is not None:
        on_ready(url, token)
    bar = tqdm(total=len(store.queue()), desc="your answers")
    try:
        while True:
            answered = store.progress(HUMAN)
            bar.update(answered["answered"] - bar.n)
            if not answered["remaining"]:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
        server.should_exit = True
        thread.join(timeout=10)
    n = store.progress(HUMAN)["answered"]
    if n < min_answers:
        raise ValueError(f"a reward model needs at least {min_answers} answers, found {n}")
    return HUMAN


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(task: DigitsTask, policy, utility, config: QuickstartConfig,
             progress: bool = True) -> tuple[list[SolverRow], list[int], EvaluationSamples]:
    """Per sampler: pretrained and fine-tuned samples from the same noise; utility, learned reward,
    ranking agreement, class accuracy, Frechet distance and diversity of each. Returns the rows (the
    training sampler first), the class labels and the samples behind the report's figures."""
    settings = [("em", config.steps)] + [tuple(s) for s in config.solvers if tuple(s) != ("em", config.steps)]
    cond = torch.arange(NUM_CLASSES).repeat_interleave(config.per_class)
    real = heldout_real()
    rows, samples = [], EvaluationSamples(images={}, scatter={})
    for solver, steps in tqdm(settings, desc="evaluation", disable=not progress):
        scores, values = {}, {}
        for name, score in (("pretrained", None), ("finetuned", policy.score)):
            x = task.sample(score, cond, solver=solver, steps=steps, seed=config.seed + 1).float()
            u, r = utility(x, cond), task.reward(x, cond)
            metrics = image_metrics(task, x, cond, real)
            scores[name] = ModelScores(**dataclasses.asdict(metrics), utility=float(u.mean()),
                                       utility_se=float(u.std() / len(u) ** 0.5), reward=float(r.mean()),
                                       reward_se=float(r.std() / len(r) ** 0.5), agreement=agreement(r, u, cond))
            values[name] = (u, r)
            if (solver, steps) in (settings[0], ("ddim", 50)):  # grids: the training sampler and DDIM 50
                samples.images[f"{name}_{solver}{steps}"] = x
        (u0, r0), (u1, r1) = values["pretrained"], values["finetuned"]
        du, dr = u1 - u0, r1 - r0  # paired: same prior draws, noise and labels
        rows.append(SolverRow(solver=solver, steps=steps, pretrained=scores["pretrained"],
                              finetuned=scores["finetuned"], utility_gain=float(du.mean()),
                              utility_gain_se=float(du.std() / len(du) ** 0.5), reward_gain=float(dr.mean()),
                              reward_gain_se=float(dr.std() / len(dr) ** 0.5)))
        if (solver, steps) == settings[0]:
            samples.scatter = dict(values)
    return rows, cond.tolist(), samples


@torch.no_grad()
def tilt_per_solver(task: DigitsTask, utility, rows: list[SolverRow], items: torch.Tensor,
                    config: QuickstartConfig) -> None:
    """Fill each row's `tilt`, `gain_vs_training` and `frechet_vs_tilt`. The tilt of a sampler reweights THAT
    sampler's pretrained samples (`config.items` of them, the stage-1 classes and seed; `items` are the training
    sampler's, drawn in stage 1) so that its gain equals the fine-tuned model's gain under that sampler."""
    cond = balanced_classes(config.items)
    for row in rows:
        x = items if row is rows[0] else task.sample(None, cond, solver=row.solver, steps=row.steps,
                                                     seed=config.seed).float()
        row.tilt = exact_tilt(task, x, cond, utility(x, cond), row.utility_gain, config)
        row.gain_vs_training = row.utility_gain / rows[0].utility_gain if rows[0].utility_gain else None
        row.frechet_vs_tilt = row.finetuned.frechet / row.tilt.frechet


def exact_tilt(task: DigitsTask, x: torch.Tensor, cond: torch.Tensor, u: torch.Tensor, gain: float,
               config: DigitsLoopConfig, repeats: int = 5) -> ExactTilt:
    """The KL-optimal reference: what the KL-closest way to gain `gain` of utility does to the images.

    The exact optimum of "maximise E[u] - beta KL(p || p_pre)" is the tilt p_pre exp(u / beta) / Z. On
    the pretrained items (x, cond) of stage 1 it is importance resampling within each class with weights
    exp(lam u), lam = 1 / beta set by bisection so that the expected gain equals `gain`. Its class
    accuracy and Frechet distance (same sample size as the evaluation) say how much of a quality loss
    comes with the utility gain itself, whatever the fine-tuner (the tilt is the KL-closest distribution
    to the pretrained one with that gain; another distribution may trade KL for these metrics). `kl` is
    KL(tilt || items) on the items, mean over classes: the least KL any method pays for that gain (up to
    the finite sample of items)."""
    from scoreaction.image_metrics import class_accuracy, frechet_distance

    groups = [torch.nonzero(cond == c).flatten() for c in range(NUM_CLASSES)]
    u = u.double()

    def weights(lam: float) -> list[torch.Tensor]:
        return [torch.softmax(lam * u[g], 0) for g in groups]

    def expected_gain(lam: float) -> float:
        return sum(float((w * u[g]).sum() - u[g].mean()) for w, g in zip(weights(lam), groups)) / len(groups)

    lo, hi = 0.0, 1.0
    while expected_gain(hi) < gain and hi < 1e3:
        hi *= 2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_gain(mid) < gain else (lo, mid)
    lam = 0.5 * (lo + hi)
    gen = torch.Generator().manual_seed(config.seed)
    real_b = heldout_real()[1]
    accs, fds = [], []
    for _ in range(repeats):
        idx = torch.cat([g[torch.multinomial(w, config.per_class, replacement=True, generator=gen)]
                         for w, g in zip(weights(lam), groups)])
        accs.append(class_accuracy(task.classifier, x[idx], cond[idx])["accuracy"])
        fds.append(frechet_distance(task.classifier, x[idx], real_b))
    ws = weights(lam)
    kl = sum(float(torch.xlogy(w, w * len(w)).sum()) for w in ws) / len(ws)
    ess = min(float(1 / (w**2).sum()) for w in ws)
    return ExactTilt(gain=expected_gain(lam), inverse_beta=lam, class_accuracy=sum(accs) / repeats,
                     frechet=sum(fds) / repeats, kl=kl, min_effective_items_per_class=ess,
                     items_per_class=min(len(g) for g in groups))


def agreement(reward: torch.Tensor, utility: torch.Tensor, cond: torch.Tensor) -> float:
    """Fraction of same-class pairs that the reward orders as the utility does (ties in either excluded)."""
    same = cond[:, None] == cond[None, :]
    du, dr = utility[:, None] - utility[None, :], reward[:, None] - reward[None, :]
    keep = same & (du != 0) & (dr != 0) & torch.ones_like(same).triu(1)
    return float(((du > 0) == (dr > 0))[keep].float().mean())


def summarise(settings: list[SolverRow], history: list[TrainingPoint], utility_std: float, reward_std: float,
              tilt: ExactTilt) -> Summary:
    """The headline figures under the training sampler, gains in standard deviations of the pretrained items."""
    train = settings[0]
    last = history[-1].diagnostics if history else {}
    return Summary(solver=train.solver, steps=train.steps, utility_gain_sd=train.utility_gain / utility_std,
                   utility_gain_sd_se=train.utility_gain_se / utility_std,
                   reward_gain_sd=train.reward_gain / reward_std,
                   path_kl=last.get("eval_path_kl"), tilt_gain_sd=tilt.gain / utility_std)
