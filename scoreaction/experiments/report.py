"""The quickstart's HTML report: one page and its PNGs, from `quickstart.run`'s QuickstartResults.

The page is templates/report.html.j2, rendered by Jinja2 with autoescaping: every value from the
results (labeler names, paths, settings) is escaped. Its sections (each an <h2 id=...>):
  summary    what changed (hidden utility, learned reward) and at what cost (class accuracy, Frechet
             distance, KL), beside the exact tilt: the KL-optimal distribution with the same utility gain
  samples    before / after grids, one row per class, from the same noise
  training   learned reward, hidden utility, path KL and J per update
  hacking    learned reward against hidden utility: gains in standard deviations, ranking agreement
  quality    class accuracy, Frechet distance (with its real-vs-real floor), diversity, per sampler
  solvers    the gains under other solvers and step counts
  feedback   the comparisons and the reward model's held-out accuracy
  reproduce  the command, the settings and where the time went
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from scoreaction.io import atomic_write_bytes

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"
SECTIONS = ("summary", "samples", "training", "hacking", "quality", "solvers", "feedback", "reproduce")


def write_report(results, out: str | Path, samples) -> Path:
    """Write report.html and its PNGs into `out`. results: a QuickstartResults; samples: its
    EvaluationSamples (the images and values behind the figures)."""
    out = Path(out)
    plots = {"samples": sample_grids(samples, results, out), "training": training_curves(results, out),
             "hacking": hacking_scatter(samples, out), "solvers": solver_plot(results, out)}
    atomic_write_bytes(out / "report.html", render(results, plots).encode())
    return out / "report.html"


# --- the page -----------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3f") -> str:
    """A number in `spec`; None or NaN as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _pm(value, se, spec: str = ".3f") -> str:
    return f"{_fmt(value, spec)} ± {_fmt(se, spec)}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["f"] = _fmt
    env.filters["pm"] = _pm
    return env


def render(results, plots: dict) -> str:
    """The page, from the results and the names of the PNGs (`plots`: samples -> list, others -> one name)."""
    config = results.config
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "solvers")}
    return environment().get_template(TEMPLATE).render(
        r=results, config=config, s=results.summary, train=results.settings[0], tilt=results.exact_tilt,
        fb=results.feedback, rm=results.reward_model, plots=plots, settings=settings, n=len(results.cond),
        timings=dataclasses.asdict(results.timings))


# --- figures ----------------------------------------------------------------------------------------
def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def sample_grids(samples, results, out: Path) -> list[str]:
    """One PNG per evaluated sampler with grids: pretrained | fine-tuned, a row per class."""
    cond = torch.tensor(results.cond)
    names = []
    for key in sorted(k for k in samples.images if k.startswith("pretrained_")):
        setting = key[len("pretrained_"):]
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
        for ax, who in zip(axes, ("pretrained", "finetuned")):
            ax.imshow(_grid(samples.images[f"{who}_{setting}"], cond).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_title(f"{'pre-trained' if who == 'pretrained' else 'fine-tuned'} ({setting})")
            ax.set_yticks([4.5 + 10 * c for c in range(10)], [str(c) for c in range(10)])
            ax.set_xticks([])
        fig.suptitle("same prior draws and noise on both sides; one row per class")
        names.append(_save(fig, out / f"samples_{setting}.png"))
    return names


def _grid(x: torch.Tensor, cond: torch.Tensor, per_row: int = 10, pad: int = 2) -> torch.Tensor:
    """Images (N, 1, 8, 8) -> one (10 * 10, per_row * 10) canvas, row c = the first samples of class c."""
    size = x.shape[-1] + pad
    canvas = torch.full((10 * size, per_row * size), -1.0)
    for c in range(10):
        for j, i in enumerate((cond == c).nonzero().flatten()[:per_row].tolist()):
            canvas[c * size:c * size + x.shape[-1], j * size:j * size + x.shape[-1]] = x[i, 0].clamp(-1, 1)
    return canvas


def training_curves(results, out: Path) -> str:
    hist = [h for h in results.history if h.reward_mean is not None]
    steps = [h.step for h in hist]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    panels = (("reward_mean", "learned reward (batch mean)"), ("utility_mean", "hidden utility (never optimised)"),
              ("path_kl", "path KL to pre-trained"), ("J", "J = reward - beta_KL KL"))
    for ax, (key, title) in zip(axes, panels):
        values = [getattr(h, key) for h in hist]
        ax.plot(steps, [math.nan if v is None else v for v in values], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    return _save(fig, out / "training.png")


def hacking_scatter(samples, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    for who, colour in (("pretrained", "tab:blue"), ("finetuned", "tab:orange")):
        u, r = samples.scatter[who]
        ax.scatter(u.numpy(), r.numpy(), s=6, alpha=0.5, color=colour,
                   label="pre-trained" if who == "pretrained" else "fine-tuned")
    ax.set_xlabel("hidden utility (the labeler's taste)")
    ax.set_ylabel("learned reward")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "hacking.png")


def solver_plot(results, out: Path) -> str:
    rows, unit = results.settings, results.utility_std_pretrained
    labels = [f"{r.solver} {r.steps}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(labels, [r.utility_gain / unit for r in rows], color="tab:orange",
           yerr=[r.utility_gain_se / unit for r in rows])
    ax.axhline(results.summary.tilt_gain_sd, color="k", lw=0.8, ls=":", label="exact tilt (training sampler's gain)")
    ax.set_ylabel("hidden utility gain (sd)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "solvers.png")
