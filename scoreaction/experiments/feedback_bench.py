"""The reward-learning benchmark: how many comparisons does a Bradley-Terry ensemble need, and does
choosing them by ensemble disagreement need fewer than choosing them at random?

Two settings, each a pool of unlabelled items, a disjoint set of test items, and a simulated
labeler (temperature 0.5, lapse rate 0.05) judging by a hidden utility (scoreaction.rewards.utilities):
  points  samples of the `mixture` task's pretrained model (exact sampler), utility `bumps`
  digits  sklearn's 8x8 digit images scaled to [-1, 1], utility `taste`, pairs within a class,
          the reward conditional on the class
Strategies (same first `seed_pairs` random pairs):
  random        nested random pair sets of each budget
  disagreement  rounds: fit the ensemble on the labelled pairs, acquire the pairs of the pool with
                the largest ensemble disagreement (scoreaction.feedback.selection), label, refit;
                `rounds_per_doubling` rounds per doubling of the budget
Metrics on test pairs, all exact expectations over the labeler's noise (no Monte-Carlo labels):
  accuracy   expected accuracy of the learned reward's choice against the labeler's answers
  ceiling    the same for the hidden utility itself (max over all predictors)
  agreement  fraction of test pairs where the learned reward and the utility pick the same item
  log_likelihood, ceiling_log_likelihood, ece (ECE against the labeler's true probabilities)
  rank       Spearman correlation of learned reward and utility on the test items (within class)
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from scoreaction.feedback.labelers import SimulatedLabeler
from scoreaction.feedback.selection import select_pairs
from scoreaction.rewards.preference import Comparisons, FitConfig, calibration, fit_reward_model
from scoreaction.rewards.utilities import make_utility

DOMAINS = ("points", "digits")
STRATEGIES = ("random", "disagreement")


@dataclass(frozen=True)
class Plan:
    """The budgets of a benchmark run."""

    budgets: tuple[int, ...]  # numbers of comparisons at which both strategies are scored
    seeds: int
    ensemble: int  # Bradley-Terry ensemble members
    rounds_per_doubling: int  # refits of the disagreement strategy per doubling of the budget
    pool: dict  # domain -> number of unlabelled items to ask about
    test_items: int
    test_pairs: int
    fit: dict = field(default_factory=dict)  # FitConfig options beyond the ensemble size


FULL = Plan(budgets=(50, 100, 200, 400, 800, 1600), seeds=3, ensemble=5, rounds_per_doubling=2,
            pool={"points": 2000, "digits": 1200}, test_items=1000, test_pairs=4000)
QUICK = Plan(budgets=(50, 100), seeds=1, ensemble=2, rounds_per_doubling=1, pool={"points": 300, "digits": 400},
             test_items=300, test_pairs=500, fit={"min_steps": 40, "epochs": 5})
LABELER = {"temperature": 0.5, "error_rate": 0.05, "tie_margin": 0.0}


def digit_images(value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 digits as float32 images (N, 1, 8, 8) in value_range (0 = no ink), and labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    lo, hi = value_range
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * (hi - lo) + lo
    return x, torch.tensor(data.target, dtype=torch.long)


@dataclass
class Setting:
    """Items to ask about (pool), items to test on, test pairs, and the labeler."""

    pool: torch.Tensor
    pool_cond: torch.Tensor | None
    test: torch.Tensor
    test_cond: torch.Tensor | None
    test_pairs: torch.Tensor  # (M, 2) indices into test
    labeler: SimulatedLabeler


def make_setting(domain: str, seed: int, pool_size: int, test_items: int, test_pairs: int) -> Setting:
    gen = torch.Generator().manual_seed(1000 + seed)
    if domain == "points":
        from scoreaction.tasks import make_task

        task = make_task("mixture")
        pool = task.sample_pre(pool_size, generator=gen).float()
        test = task.sample_pre(test_items, generator=gen).float()
        pool_cond = test_cond = None
        utility = make_utility("mixture")
    elif domain == "digits":
        x, y = digit_images()
        perm = torch.randperm(len(x), generator=gen)
        n_test = min(test_items, len(x) - pool_size)
        if n_test < 20:
            raise ValueError(f"digits has {len(x)} images: pool {pool_size} leaves too few test items")
        pool, pool_cond = x[perm[:pool_size]], y[perm[:pool_size]]
        test, test_cond = x[perm[pool_size:pool_size + n_test]], y[perm[pool_size:pool_size + n_test]]
        utility = make_utility("digits")
    else:
        raise ValueError(f"domain must be one of {DOMAINS}, found {domain!r}")
    pairs = torch.tensor(select_pairs(len(test), test_pairs, cond=test_cond, generator=gen))
    labeler = SimulatedLabeler(utility, seed=2000 + seed, **LABELER)
    return Setting(pool, pool_cond, test, test_cond, pairs, labeler)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) tensors (continuous values: ties have probability 0)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra**2).sum() * (rb**2).sum()))


def rank_correlation(r: torch.Tensor, u: torch.Tensor, cond: torch.Tensor | None) -> float:
    """Spearman correlation, within each condition when there are conditions (weighted by size)."""
    if cond is None:
        return spearman(r, u)
    total, acc = 0, 0.0
    for c in cond.unique():
        sel = cond == c
        if int(sel.sum()) > 2:
            acc += int(sel.sum()) * spearman(r[sel], u[sel])
            total += int(sel.sum())
    return acc / total


@dataclass
class Metrics:
    """The test metrics of one fitted model (see the module docstring)."""

    accuracy: float
    ceiling: float
    agreement: float
    log_likelihood: float
    ceiling_log_likelihood: float
    ece: float
    rank: float


@dataclass
class BudgetResult(Metrics):
    """The metrics of the model fitted on the first n comparisons, and the seconds to fit and test it."""

    n: int = 0
    fit_seconds: float = 0.0


@dataclass
class SeedRun:
    """Both strategies on one (domain, seed): one BudgetResult per budget each."""

    domain: str
    seed: int
    random: list[BudgetResult]
    disagreement: list[BudgetResult]
    seconds: float
    cpu_seconds: float


@torch.no_grad()
def test_metrics(model, setting: Setting) -> Metrics:
    """The metrics of the module docstring for one fitted model."""
    lab, i, j = setting.labeler, setting.test_pairs[:, 0], setting.test_pairs[:, 1]
    left, right = setting.test[i], setting.test[j]
    cond = None if setting.test_cond is None else setting.test_cond[i]
    q = model.win_probability(left, right, cond).double()
    p, tie = lab.probabilities(left, right, cond)
    du = lab.utility_difference(left, right, cond)
    eps = 1e-12
    ll = p * torch.log(q.clamp_min(eps)) + (1 - p) * torch.log((1 - q).clamp_min(eps))
    ll_best = p * torch.log(p.clamp_min(eps)) + (1 - p) * torch.log((1 - p).clamp_min(eps))
    r = model(setting.test, setting.test_cond)
    u = lab.utility(setting.test.double(), setting.test_cond)
    return Metrics(accuracy=lab.expected_accuracy(left, right, q, cond), ceiling=lab.ceiling_accuracy(left, right, cond),
                   agreement=float(((q > 0.5) == (du > 0))[~tie].double().mean()),
                   log_likelihood=float(ll.mean()), ceiling_log_likelihood=float(ll_best.mean()),
                   ece=calibration(q, p)[0], rank=rank_correlation(r.double(), u, setting.test_cond))


def budget_result(model, setting: Setting, n: int, t0: float) -> BudgetResult:
    """The test metrics of `model`, fitted on n comparisons from time t0 (perf_counter) on."""
    return BudgetResult(**asdict(test_metrics(model, setting)), n=n, fit_seconds=time.perf_counter() - t0)


def label_pairs(setting: Setting, pairs: list[tuple[int, int]]) -> Comparisons:
    idx = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    cond = None if setting.pool_cond is None else setting.pool_cond[idx[:, 0]]
    return setting.labeler.label(setting.pool[idx[:, 0]], setting.pool[idx[:, 1]], cond)


def schedule(budgets: tuple[int, ...], rounds_per_doubling: int) -> list[int]:
    """Labelled-set sizes at which the active learner refits: the budgets plus geometric steps between."""
    sizes = {int(b) for b in budgets}
    for lo, hi in zip(budgets[:-1], budgets[1:]):
        k = max(1, round(rounds_per_doubling * math.log2(hi / lo)))
        sizes.update(int(round(lo * (hi / lo) ** (m / k))) for m in range(1, k))
    return sorted(sizes)


def run_one(domain: str, seed: int, plan: Plan, log=None) -> SeedRun:
    """Both strategies on one (domain, seed)."""
    torch.set_num_threads(1)
    setting = make_setting(domain, seed, plan.pool[domain], plan.test_items, plan.test_pairs)
    budgets = tuple(plan.budgets)
    fit = FitConfig(ensemble=plan.ensemble, val_fraction=0.0, seed=seed, **plan.fit)
    gen = torch.Generator().manual_seed(3000 + seed)
    order = select_pairs(len(setting.pool), budgets[-1], cond=setting.pool_cond, generator=gen)
    labels = label_pairs(setting, order)  # the random strategy's nested pair sets, labelled once
    t_start, cpu_start = time.perf_counter(), time.process_time()

    random_rows = []
    for n in budgets:
        t0 = time.perf_counter()
        model = fit_reward_model(labels.subset(torch.arange(n)), fit).model
        random_rows.append(budget_result(model, setting, n, t0))
        if log:
            log(f"{domain} seed {seed} random n={n}: accuracy {random_rows[-1].accuracy:.3f} "
                f"(ceiling {random_rows[-1].ceiling:.3f})")

    rows, pairs, data = [], list(order[:budgets[0]]), labels.subset(torch.arange(budgets[0]))
    sizes = schedule(budgets, plan.rounds_per_doubling)
    for k, n in enumerate(sizes):
        t0 = time.perf_counter()
        model = fit_reward_model(data, fit).model
        if n in budgets:
            rows.append(budget_result(model, setting, n, t0))
            if log:
                log(f"{domain} seed {seed} disagreement n={n}: accuracy {rows[-1].accuracy:.3f}")
        if k + 1 < len(sizes):
            new = select_pairs(len(setting.pool), sizes[k + 1] - n, strategy="disagreement", items=setting.pool,
                               cond=setting.pool_cond, model=model, generator=gen, exclude=pairs)
            pairs += new
            data = Comparisons.cat([data, label_pairs(setting, new)])
    return SeedRun(domain, seed, random_rows, rows, seconds=time.perf_counter() - t_start,
                   cpu_seconds=time.process_time() - cpu_start)


def summarise(runs: list[SeedRun], budgets) -> dict:
    """mean and std over seeds of every metric, per domain, strategy and budget (JSON-able)."""
    keys = [f.name for f in fields(BudgetResult) if f.name != "n"]
    summary = {}
    for domain in DOMAINS:
        mine = [r for r in runs if r.domain == domain]
        if not mine:
            continue
        summary[domain] = {}
        for strategy in STRATEGIES:
            table = []
            for b, n in enumerate(budgets):
                vals = [getattr(r, strategy)[b] for r in mine]
                row = {"n": n, "seeds": len(vals)}
                for key in keys:
                    v = torch.tensor([getattr(x, key) for x in vals], dtype=torch.float64)
                    row[key] = float(v.mean())
                    row[key + "_std"] = float(v.std()) if len(v) > 1 else 0.0
                table.append(row)
            summary[domain][strategy] = table
        gains = []  # paired over seeds: same pool, test pairs and first pairs for both strategies
        for b, n in enumerate(budgets):
            row = {"n": n}
            for key in ("accuracy", "rank"):
                d = torch.tensor([getattr(r.disagreement[b], key) - getattr(r.random[b], key) for r in mine],
                                 dtype=torch.float64)
                row[key] = float(d.mean())
                row[key + "_std"] = float(d.std()) if len(d) > 1 else 0.0
            gains.append(row)
        summary[domain]["gain"] = gains
        ceiling = sum(r["ceiling"] for r in summary[domain]["random"]) / len(budgets)
        summary[domain]["labels_to_reach"] = {
            f"ceiling-{gap:g}": {s: labels_to_reach(summary[domain][s], ceiling - gap) for s in STRATEGIES}
            for gap in (0.04, 0.03, 0.02, 0.01)}
    return summary


def labels_to_reach(table: list[dict], target: float) -> float | None:
    """Comparisons at which the mean accuracy curve first reaches `target`, interpolated linearly in
    log(comparisons) between budgets; None if it never does."""
    for a, b in zip([None, *table[:-1]], table):
        if b["accuracy"] >= target:
            if a is None or b["accuracy"] == a["accuracy"]:
                return float(b["n"])
            w = (target - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
            return float(math.exp(math.log(a["n"]) + w * (math.log(b["n"]) - math.log(a["n"]))))
    return None


def run_benchmark(quick: bool = False, seeds: int | None = None, workers: int = 2, log=print) -> dict:
    """Run every (domain, seed) job, `workers` processes at a time; returns the JSON-able results."""
    plan = QUICK if quick else FULL
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive integer, found {seeds!r}")
        plan = replace(plan, seeds=seeds)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, found {workers!r}")
    jobs = [(d, s) for s in range(plan.seeds) for d in DOMAINS]
    t0 = time.perf_counter()
    if workers == 1:
        runs = [run_one(d, s, plan, log) for d, s in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, d, s, plan) for d, s in jobs]
            runs = []
            for (d, s), f in zip(jobs, futures):
                runs.append(f.result())
                if log:
                    last = runs[-1]
                    log(f"{d} seed {s} done in {last.seconds:.0f}s: accuracy at n={plan.budgets[-1]} "
                        f"random {last.random[-1].accuracy:.3f}, disagreement "
                        f"{last.disagreement[-1].accuracy:.3f}, ceiling {last.random[-1].ceiling:.3f}")
    wall = time.perf_counter() - t0
    return {"quick": quick, "plan": {**asdict(plan), "budgets": list(plan.budgets)}, "labeler": LABELER,
            "wall_seconds": wall, "cpu_seconds": sum(r.cpu_seconds for r in runs), "workers": workers,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "summary": summarise(runs, plan.budgets),
            "runs": [asdict(r) for r in runs]}


def plot(results: dict, path: str | os.PathLike) -> None:
    """Accuracy (top) and rank correlation (bottom) vs number of comparisons, per domain; bands: +- 1 std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["summary"])
    fig, axes = plt.subplots(2, len(domains), figsize=(5.2 * len(domains), 7.5), squeeze=False)
    colours = {"random": "tab:blue", "disagreement": "tab:orange"}
    for col, domain in enumerate(domains):
        for row, key in enumerate(("accuracy", "rank")):
            ax = axes[row, col]
            for strategy in STRATEGIES:
                table = results["summary"][domain][strategy]
                n = [r["n"] for r in table]
                m = torch.tensor([r[key] for r in table])
                s = torch.tensor([r[key + "_std"] for r in table])
                ax.plot(n, m, "o-", color=colours[strategy], label=strategy)
                ax.fill_between(n, m - s, m + s, color=colours[strategy], alpha=0.2)
            if key == "accuracy":
                table = results["summary"][domain]["random"]
                ceil = sum(r["ceiling"] for r in table) / len(table)
                ax.axhline(ceil, color="k", ls="--", lw=1, label=f"ceiling {ceil:.3f}")
                ax.set_title(f"{domain}: held-out accuracy vs labeler")
                ax.set_ylabel("expected accuracy")
            else:
                ax.set_title(f"{domain}: rank correlation with the hidden utility")
                ax.set_ylabel("Spearman")
            ax.set_xscale("log")
            ax.set_xlabel("comparisons")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    seeds = results["plan"]["seeds"]
    fig.suptitle(f"Bradley-Terry ensemble (K={results['plan']['ensemble']}), mean +- std over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    lines = ["| setting | comparisons | random accuracy | disagreement accuracy | ceiling | random rank "
             "| disagreement rank |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines[0] += " gain (paired) |"
    lines[1] += "---:|"
    for domain, by in results["summary"].items():
        for a, b, g in zip(by["random"], by["disagreement"], by["gain"]):
            lines.append(f"| {domain} | {a['n']} | {a['accuracy']:.3f} +- {a['accuracy_std']:.3f} | "
                         f"{b['accuracy']:.3f} +- {b['accuracy_std']:.3f} | {a['ceiling']:.3f} | "
                         f"{a['rank']:.3f} +- {a['rank_std']:.3f} | {b['rank']:.3f} +- {b['rank_std']:.3f} | "
                         f"{g['accuracy']:+.3f} +- {g['accuracy_std']:.3f} |")
    lines += ["", "| setting | target accuracy | comparisons needed: random | disagreement |", "|---|---|---:|---:|"]
    for domain, by in results["summary"].items():
        for target, need in by["labels_to_reach"].items():
            cells = ["> max budget" if need[s] is None else f"{need[s]:.0f}" for s in STRATEGIES]
            lines.append(f"| {domain} | {target} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def write(results: dict, out: str | os.PathLike) -> dict:
    """feedback[-quick].json and .png in `out`; returns their paths."""
    from scoreaction.io import atomic_write_bytes

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "feedback-quick" if results["quick"] else "feedback")
    atomic_write_bytes(stem + ".json", json.dumps(results, indent=1).encode())
    plot(results, stem + ".png")
    return {"json": stem + ".json", "png": stem + ".png"}


__all__ = [
    "BudgetResult",
    "Metrics",
    "Plan",
    "SeedRun",
    "digit_images",
    "make_setting",
    "markdown_table",
    "plot",
    "rank_correlation",
    "run_benchmark",
    "run_one",
    "schedule",
    "spearman",
    "write",
]
