"""`scoreaction quickstart`: the whole RLHF loop on images, end to end, on a laptop-class CPU.

    shipped digits model -> sample items -> preference store -> comparisons (a simulated labeler
    with a hidden taste, or a person in the web app) -> Bradley-Terry reward ensemble -> ctrl
    fine-tuning with beta_KL > 0 on the LEARNED reward -> evaluation -> report.html

Clock: RL time t inside the trainer; the samplers take the pretrained and fine-tuned scores.

What the evaluation measures (the fine-tuned policy against the pretrained model, on the same prior
draws, Brownian increments and class labels, so every difference is paired):
  * the hidden utility (the labeler's taste, never seen by the learner) in units of its standard
    deviation over pretrained samples, and the learned reward in its own units: when the learned
    reward rises much more than the utility, the policy exploits the reward model;
  * how often the learned reward orders pairs of samples as the hidden utility does, on pretrained
    and on fine-tuned samples (reward models degrade off their training distribution);
  * class accuracy, Frechet distance in the classifier's features (with its real-vs-real floor) and
    diversity, before and after;
  * all of the above under the training sampler and under other solvers and step counts: the
    fine-tuned policy is a score field and should keep its gain under any of them.

Everything lands in the run folder: store.sqlite, reward/ (safetensors + JSON), train/
(checkpoints, metrics.jsonl), results.json, report.html and its PNGs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scoreaction.config import Options, check_choice, check_nonnegative, check_positive, check_positive_int
from scoreaction.feedback.labelers import SimulatedLabeler
from scoreaction.feedback.selection import select_pairs
from scoreaction.feedback.store import PreferenceStore
from scoreaction.io import atomic_write_bytes
from scoreaction.rewards.preference import fit_reward_model
from scoreaction.rewards.utilities import make_utility
from scoreaction.samplers import GRIDS
from scoreaction.samplers import SOLVERS as SOLVER_NAMES
from scoreaction.tasks.digits import NUM_CLASSES, DigitsConfig, DigitsTask, digits_data
from scoreaction.train import TrainConfig, Trainer

TASK = "digits"
LABELER = "simulated"
HUMAN = "you"
MIN_HUMAN_ANSWERS = 20
# (solver, steps) of the evaluation; the training sampler (em, `steps`) is added in front
SOLVERS = (("em", 10), ("em", 50), ("ddim", 10), ("ddim", 50), ("heun", 10), ("dpm2", 20))


@dataclass
class QuickstartConfig(Options):
    out: str = "runs/quickstart"
    seed: int = 0
    # feedback
    items: int = 1000  # pretrained samples shown for comparison (balanced over the ten classes)
    pairs: int = 2000  # comparisons asked, each between two samples of the same class
    utility: str = "taste"  # the simulated labeler's hidden utility (make_utility("digits", ...))
    temperature: float = 1.0  # the simulated labeler's Bradley-Terry temperature
    human: bool = False  # a person labels in the web app instead of the simulated labeler
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port
    # fine-tuning (ctrl on the learned reward)
    beta_kl: float = 0.4  # +1.1 sd of hidden utility at the default budget (0.5: +0.9, 1.0: +0.45)
    updates: int = 120
    batch_size: int = 64
    steps: int = 20  # Euler-Maruyama steps of the training rollouts
    grid: str = "uniform"
    algo: dict = field(default_factory=lambda: {"lr": 1e-3})
    # evaluation
    per_class: int = 30  # samples per class (30 x 10 matches the 300 held-out real digits of the floor)
    solvers: list = field(default_factory=lambda: [list(s) for s in SOLVERS])

    def __post_init__(self):
        for name in ("items", "pairs", "updates", "batch_size", "steps", "per_class"):
            check_positive_int(name, getattr(self, name))
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ValueError(f"port must be an integer in 0..65535, found {self.port!r}")
        check_positive("beta_kl", self.beta_kl)
        check_nonnegative("temperature", self.temperature)
        if self.items < 2 * NUM_CLASSES:
            raise ValueError(f"items must be at least {2 * NUM_CLASSES} (two per class), found {self.items}")
        counts = torch.bincount(balanced_classes(self.items), minlength=NUM_CLASSES)
        most = int((counts * (counts - 1) // 2).sum())
        if self.pairs > most:
            raise ValueError(f"pairs must be at most {most}, the same-class pairs among {self.items} items, "
                             f"found {self.pairs}")
        check_choice("grid", self.grid, GRIDS)
        self.solvers = [list(s) for s in self.solvers]
        if not all(len(s) == 2 and s[0] in SOLVER_NAMES and isinstance(s[1], int) and s[1] >= 1 for s in self.solvers):
            raise ValueError(f"solvers must be [solver, steps] pairs with a solver in {sorted(SOLVER_NAMES)} and "
                             f"steps >= 1, found {self.solvers!r}")
        make_utility(TASK, self.utility)  # a clear error for an unknown utility, before any work


def balanced_classes(n: int) -> torch.Tensor:
    """n class labels cycling through 0..9: as equal a share of each class as n allows."""
    return torch.arange(n) % NUM_CLASSES


def run(config: QuickstartConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run every stage; returns the results (also written to OUT/results.json) and writes OUT/report.html."""
    from scoreaction.experiments.report import write_report

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, start = {}, time.perf_counter()
    utility = make_utility(TASK, config.utility)
    learned = learn_reward(config, out, utility, log, timings)  # stages 1-3

    # 4. ctrl on the learned reward, with the hidden utility watched (never optimised)
    t = time.perf_counter()
    trainer = Trainer(train_config(config, learned["reward_dir"], out / "train"), progress=progress,
                      monitors={"utility": utility})
    trainer.run()
    history = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
               if line.strip()][-config.updates:]
    timings["train"] = time.perf_counter() - t
    log(f"[4/5] {config.updates} ctrl updates ({config.updates * config.batch_size} trajectories) in "
        f"{out / 'train'} ({timings['train']:.0f} s)")

    # 5. evaluation, paired: pretrained vs fine-tuned under every sampler
    t = time.perf_counter()
    evaluation = evaluate(trainer.task, trainer.policy, utility, config, progress=progress)
    samples = evaluation.pop("_samples")
    x, cond = learned.pop("x"), learned.pop("cond")
    with torch.no_grad():  # the units of the gains: spreads over the pretrained items of stage 1
        evaluation["utility_std_pretrained"] = float(utility(x, cond).std())
        evaluation["reward_std_pretrained"] = float(trainer.task.reward(x, cond).std())
        evaluation["exact_tilt"] = exact_tilt(trainer.task, x, cond, utility(x, cond),
                                              evaluation["settings"][0]["utility_gain"], config)
    timings["evaluate"] = time.perf_counter() - t
    log(f"[5/5] evaluation under {len(evaluation['settings'])} samplers ({timings['evaluate']:.0f} s)")

    timings["total"] = time.perf_counter() - start
    results = {"format": "scoreaction-quickstart-1", "config": config.to_dict(), "timings": timings,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "feedback": learned["feedback"],
               "reward_model": learned["reward_model"], "history": history, **evaluation}
    results["summary"] = summarise(results)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1, default=float).encode())
    report = write_report(results, out, samples)
    log(f"report {report} ({timings['total']:.0f} s in all)")
    return results


def learn_reward(config: QuickstartConfig, out: Path, utility, log: Callable[[str], None], timings: dict) -> dict:
    """Stages 1-3: pretrained samples into a preference store, comparisons, a Bradley-Terry reward model.
    Returns its folder, the items (x, cond) and what the report says about feedback and reward model."""
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
    timings["items"] = time.perf_counter() - t
    log(f"[1/5] {len(ids)} pretrained samples in {store_path} ({timings['items']:.0f} s)")

    # 2. comparisons: pairs within a class, answered by the simulated labeler or a person
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    pairs = select_pairs(len(ids), config.pairs, cond=cond, generator=gen)
    store.enqueue_pairs([(ids[i], ids[j]) for i, j in pairs])
    labeler = SimulatedLabeler(utility, temperature=config.temperature, seed=config.seed, name=LABELER)
    if config.human:
        who = collect_human(store, config, log)
    else:
        who = LABELER
        left, right = x[[i for i, _ in pairs]], x[[j for _, j in pairs]]
        choices = labeler.choose(left, right, cond[[i for i, _ in pairs]])
        store.add_comparisons([{"left": ids[i], "right": ids[j], "choice": c, "labeler": LABELER}
                               for (i, j), c in zip(pairs, choices)])
    comparisons = store.dataset(task=TASK, labeler=who)
    timings["feedback"] = time.perf_counter() - t
    log(f"[2/5] {len(comparisons)} comparisons by {who!r} ({timings['feedback']:.0f} s)")

    # 3. the Bradley-Terry reward ensemble, fitted on those comparisons only
    t = time.perf_counter()
    fit = fit_reward_model(comparisons, seed=config.seed, num_classes=NUM_CLASSES)
    reward_dir = fit.model.save(out / "reward")
    val = fit.validation or fit.train
    ceiling = None if config.human else labeler.ceiling_accuracy(comparisons.left, comparisons.right, comparisons.cond)
    timings["reward"] = time.perf_counter() - t
    log(f"[3/5] reward model {reward_dir}: held-out accuracy {val['accuracy']:.3f}"
        + (f" (the labeler's own ceiling {ceiling:.3f})" if ceiling is not None else "") + f" ({timings['reward']:.0f} s)")
    return {"reward_dir": reward_dir, "x": x, "cond": cond,
            "feedback": {"labeler": who, "comparisons": len(comparisons), "items": len(ids),
                         "temperature": None if config.human else config.temperature, "utility": config.utility},
            "reward_model": {"folder": str(reward_dir), "validation": val, "train": fit.train, "ceiling": ceiling,
                             "n_train": fit.n_train, "n_val": fit.n_val}}


def train_config(config: QuickstartConfig, reward_dir: Path, out: Path, algorithm: str = "ctrl",
                 algo: dict | None = None) -> TrainConfig:
    """The fine-tuning run on the learned reward (the final evaluation is cheap: our own comes after)."""
    return TrainConfig(task={"name": TASK, "reward": f"learned:{reward_dir}", "beta_kl": config.beta_kl},
                       algorithm=algorithm, algo=dict(config.algo if algo is None else algo), steps=config.steps,
                       grid=config.grid, batch_size=config.batch_size, updates=config.updates, seed=config.seed,
                       eval_every=0, eval_n=NUM_CLASSES * config.per_class, eval_steps=config.steps, out=str(out))


# --- the web app for a person ---------------------------------------------------------------------
def collect_human(store: PreferenceStore, config: QuickstartConfig, log: Callable[[str], None],
                  on_ready: Callable[[str, str], None] | None = None, poll: float = 0.5,
                  min_answers: int = MIN_HUMAN_ANSWERS) -> str:
    """Serve the labeling app until the person has answered the queue (or presses Ctrl-C after at least
    `min_answers` answers); returns the labeler's name. `on_ready(url, token)` is for tests."""
    import uvicorn

    from scoreaction.feedback.app import create_app
    from scoreaction.feedback.server import listen, url_of

    token = store.add_labeler(HUMAN, replace=True)
    sock = listen(config.host, config.port)
    url = f"{url_of(sock)}?token={token}"
    server = uvicorn.Server(uvicorn.Config(create_app(store), log_level="warning", access_log=False))
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
def evaluate(task: DigitsTask, policy, utility, config: QuickstartConfig, progress: bool = True) -> dict:
    """Per sampler: pretrained and fine-tuned samples from the same noise; utility, learned reward,
    ranking agreement, class accuracy, Frechet distance and diversity of each."""
    settings = [("em", config.steps)] + [tuple(s) for s in config.solvers if tuple(s) != ("em", config.steps)]
    cond = torch.arange(NUM_CLASSES).repeat_interleave(config.per_class)
    real = {"a": digits_data("heldout_a"), "b": digits_data("heldout_b")}
    rows, samples = [], {}
    for solver, steps in tqdm(settings, desc="evaluation", disable=not progress):
        row = {"solver": solver, "steps": steps}
        for name, score in (("pretrained", None), ("finetuned", policy.score)):
            x = task.sample(score, cond, solver=solver, steps=steps, seed=config.seed + 1).float()
            u, r = utility(x, cond), task.reward(x, cond)
            report = task_image_report(task, x, cond, real)
            row[name] = {"utility": float(u.mean()), "utility_se": float(u.std() / len(u) ** 0.5),
                         "reward": float(r.mean()), "reward_se": float(r.std() / len(r) ** 0.5),
                         "agreement": agreement(r, u, cond), **report}
            row[f"_{name}"] = (u, r)
            if (solver, steps) in (settings[0], ("ddim", 50)):  # grids: the training sampler and DDIM 50
                samples[f"{name}_{solver}{steps}"] = x
        (u0, r0), (u1, r1) = row.pop("_pretrained"), row.pop("_finetuned")
        du, dr = u1 - u0, r1 - r0  # paired: same prior draws, noise and labels
        row["utility_gain"], row["utility_gain_se"] = float(du.mean()), float(du.std() / len(du) ** 0.5)
        row["reward_gain"], row["reward_gain_se"] = float(dr.mean()), float(dr.std() / len(dr) ** 0.5)
        if (solver, steps) == settings[0]:
            samples["scatter"] = {"pretrained": (u0, r0), "finetuned": (u1, r1)}
        rows.append(row)
    return {"settings": rows, "cond": cond.tolist(), "_samples": samples}


def task_image_report(task: DigitsTask, x: torch.Tensor, cond: torch.Tensor, real: dict) -> dict:
    from scoreaction.image_metrics import image_report

    out = image_report(task.classifier, x, cond, real["a"][0], real["b"][0])
    out.pop("class_per_class", None)
    return out


def exact_tilt(task: DigitsTask, x: torch.Tensor, cond: torch.Tensor, u: torch.Tensor, gain: float,
               config: QuickstartConfig, repeats: int = 5) -> dict:
    """The reference for the image-quality targets: what the KL-optimal way to gain `gain` of utility does.

    The exact optimum of "maximise E[u] - beta KL(p || p_pre)" is the tilt p_pre exp(u / beta) / Z. On
    the pretrained items (x, cond) of stage 1 it is importance resampling within each class with weights
    exp(lam u), lam = 1 / beta set by bisection so that the expected gain equals `gain`. Its class
    accuracy and Frechet distance (same sample size as the evaluation) say how much of a quality loss
    comes with the utility gain itself, whatever the fine-tuner (the tilt is the KL-closest distribution
    to the pretrained one with that gain; another distribution may trade KL for these metrics)."""
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
    real_b = digits_data("heldout_b")[0]
    accs, fds = [], []
    for _ in range(repeats):
        idx = torch.cat([g[torch.multinomial(w, config.per_class, replacement=True, generator=gen)]
                         for w, g in zip(weights(lam), groups)])
        accs.append(class_accuracy(task.classifier, x[idx], cond[idx])["accuracy"])
        fds.append(frechet_distance(task.classifier, x[idx], real_b))
    ess = [float(1 / (w**2).sum()) for w in weights(lam)]
    return {"gain": expected_gain(lam), "inverse_beta": lam, "class_accuracy": sum(accs) / repeats,
            "frechet": sum(fds) / repeats, "min_effective_items_per_class": min(ess),
            "items_per_class": min(len(g) for g in groups)}


def agreement(reward: torch.Tensor, utility: torch.Tensor, cond: torch.Tensor) -> float:
    """Fraction of same-class pairs that the reward orders as the utility does (ties in either excluded)."""
    same = cond[:, None] == cond[None, :]
    du, dr = utility[:, None] - utility[None, :], reward[:, None] - reward[None, :]
    keep = same & (du != 0) & (dr != 0) & torch.ones_like(same).triu(1)
    return float(((du > 0) == (dr > 0))[keep].float().mean())


# --- the targets ----------------------------------------------------------------------------------
def summarise(results: dict) -> dict:
    """The three targets, all measured under the training sampler, with the exact tilt's values beside."""
    train = results["settings"][0]
    std, tilt = results["utility_std_pretrained"], results["exact_tilt"]
    gain_sd = train["utility_gain"] / std
    acc0, acc1 = train["pretrained"]["class_accuracy"], train["finetuned"]["class_accuracy"]
    fd0, fd1 = train["pretrained"]["frechet"], train["finetuned"]["frechet"]
    return {
        "sampler": [train["solver"], train["steps"]],
        "utility_gain_sd": gain_sd, "utility_gain_sd_se": train["utility_gain_se"] / std,
        "reward_gain_sd": train["reward_gain"] / results["reward_std_pretrained"],
        "class_accuracy": [acc0, acc1], "frechet": [fd0, fd1], "frechet_floor": train["pretrained"]["frechet_floor"],
        "targets": [
            {"target": "hidden utility rises by >= 1 pretrained standard deviation", "measured": f"{gain_sd:+.2f} sd",
             "exact_tilt": "", "met": gain_sd >= 1.0},
            {"target": "class accuracy drops by <= 2 points", "measured": f"{acc0:.3f} -> {acc1:.3f}",
             "exact_tilt": f"{tilt['class_accuracy']:.3f}", "met": acc1 >= acc0 - 0.02},
            {"target": "Frechet distance stays within 2x the pretrained model's", "measured": f"{fd0:.2f} -> {fd1:.2f}",
             "exact_tilt": f"{tilt['frechet']:.2f}", "met": fd1 <= 2 * fd0},
        ],
    }
