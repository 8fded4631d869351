"""The quickstart's HTML report: one self-explaining page and its PNGs, from `quickstart.run`'s results.

Sections (each an <h2 id=...>, so tests and readers can find them):
  summary    the three targets, met or not, and where the run spent its time
  samples    before / after grids, one row per class, from the same noise
  training   learned reward, hidden utility, path KL and J per update
  hacking    learned reward against hidden utility: gains in standard deviations, ranking agreement
  quality    class accuracy, Frechet distance (with its real-vs-real floor), diversity, before / after
  solvers    the gains under other solvers and step counts, as a fraction of the training sampler's
  feedback   the comparisons and the reward model's held-out accuracy
  reproduce  the command and the settings
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scoreaction.io import atomic_write_bytes  # noqa: E402

SECTIONS = ("summary", "samples", "training", "hacking", "quality", "solvers", "feedback", "reproduce")
STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.yes{color:#176f2c;font-weight:600}
.no{color:#b00020;font-weight:600}img{max-width:100%}code,pre{background:#f6f6f6;padding:.1em .3em}
.note{color:#555}"""


def write_report(results: dict, out: str | Path, samples: dict) -> Path:
    """Write report.html and its PNGs into `out`; `samples` holds the image tensors of the evaluation."""
    out = Path(out)
    plots = {"samples": sample_grids(samples, results, out), "training": training_curves(results, out),
             "hacking": hacking_scatter(samples, results, out), "solvers": solver_plot(results, out)}
    page = render(results, plots)
    atomic_write_bytes(out / "report.html", page.encode())
    return out / "report.html"


# --- figures ----------------------------------------------------------------------------------------
def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def sample_grids(samples: dict, results: dict, out: Path) -> list[str]:
    """One PNG per evaluated sampler with grids: pretrained | fine-tuned, a row per class."""
    cond = torch.tensor(results["cond"])
    names = []
    for key in sorted(k for k in samples if k.startswith("pretrained_")):
        setting = key[len("pretrained_"):]
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
        for ax, who in zip(axes, ("pretrained", "finetuned")):
            ax.imshow(_grid(samples[f"{who}_{setting}"], cond).numpy(), cmap="gray_r", vmin=-1, vmax=1)
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


def training_curves(results: dict, out: Path) -> str:
    hist = [h for h in results["history"] if "reward_mean" in h]
    steps = [h["step"] for h in hist]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    panels = (("reward_mean", "learned reward (batch mean)"), ("utility_mean", "hidden utility (never optimised)"),
              ("path_kl", "path KL to pre-trained"), ("J", "J = reward - beta_KL KL"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [h.get(key, math.nan) for h in hist], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    return _save(fig, out / "training.png")


def hacking_scatter(samples: dict, results: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    for who, colour in (("pretrained", "tab:blue"), ("finetuned", "tab:orange")):
        u, r = samples["scatter"][who]
        ax.scatter(u.numpy(), r.numpy(), s=6, alpha=0.5, color=colour,
                   label="pre-trained" if who == "pretrained" else "fine-tuned")
    ax.set_xlabel("hidden utility (the labeler's taste)")
    ax.set_ylabel("learned reward")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "hacking.png")


def solver_plot(results: dict, out: Path) -> str:
    rows = results["settings"]
    labels = [f"{r['solver']} {r['steps']}" for r in rows]
    base = rows[0]["utility_gain"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(labels, [r["utility_gain"] / base if base else math.nan for r in rows], color="tab:orange",
           yerr=[r["utility_gain_se"] / abs(base) if base else 0 for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="k", lw=0.8, ls=":")
    ax.set_ylabel(f"utility gain / gain at {labels[0]}")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "solvers.png")


# --- the page -----------------------------------------------------------------------------------------
def render(results: dict, plots: dict) -> str:
    s, cfg = results["summary"], results["config"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>scoreaction quickstart</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>scoreaction quickstart: RLHF on digits</h1>",
             f"<p class='note'>{html.escape(_story(results))}</p>"]

    sampler = f"{s['sampler'][0]} {s['sampler'][1]}"
    parts += [_h("summary", "Summary"),
              f"<p>Measured under the training sampler ({sampler}), {10 * cfg['per_class']} samples, paired.</p>",
              _table(["target", "measured", "exact tilt at the same utility gain", "met"],
                     [[t["target"], t["measured"], t["exact_tilt"], _yes(t["met"])] for t in s["targets"]]),
              f"<p>{html.escape(tilt_text(results))}</p>",
              _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in results["timings"].items()])]

    parts += [_h("samples", "Samples before and after"),
              "<p>Left: the pre-trained model. Right: the fine-tuned policy from the same prior draws and "
              "noise, so each cell shows what fine-tuning changed in that very sample.</p>",
              *[_img(name) for name in plots["samples"]]]

    parts += [_h("training", "Training"), _img(plots["training"]),
              f"<p>{cfg['updates']} ctrl updates of {cfg['batch_size']} rollouts ({cfg['steps']} Euler-Maruyama "
              f"steps), beta_KL = {cfg['beta_kl']}. The hidden utility is computed on each batch for this plot "
              "only; the learner sees the learned reward.</p>"]

    train = results["settings"][0]
    parts += [_h("hacking", "Learned reward against hidden utility"), _img(plots["hacking"]),
              _table(["", "pre-trained", "fine-tuned", "gain (sd of pre-trained)"], [
                  ["hidden utility", _pm(train["pretrained"]["utility"], train["pretrained"]["utility_se"]),
                   _pm(train["finetuned"]["utility"], train["finetuned"]["utility_se"]),
                   f"{s['utility_gain_sd']:+.2f} ± {s['utility_gain_sd_se']:.2f}"],
                  ["learned reward", _pm(train["pretrained"]["reward"], train["pretrained"]["reward_se"]),
                   _pm(train["finetuned"]["reward"], train["finetuned"]["reward_se"]), f"{s['reward_gain_sd']:+.2f}"],
                  ["ranking agreement (same-class pairs)", f"{train['pretrained']['agreement']:.3f}",
                   f"{train['finetuned']['agreement']:.3f}", ""]]),
              f"<p>{html.escape(hacking_verdict(results))}</p>"]

    rows = []
    for r in results["settings"]:
        for who in ("pretrained", "finetuned"):
            m = r[who]
            rows.append([f"{r['solver']} {r['steps']}", who, f"{m['class_accuracy']:.3f}", f"{m['frechet']:.2f}",
                         f"{m['frechet_floor']:.2f}", f"{m['diversity_pixel_pairwise']:.3f}"])
    parts += [_h("quality", "Image quality"),
              _table(["sampler", "model", "class accuracy", "Frechet distance", "real-vs-real floor",
                      "pixel diversity"], rows),
              f"<p class='note'>{cfg['per_class']} samples per class; Frechet distance in the digit classifier's "
              "features against 300 held-out real digits; the floor compares two disjoint sets of 300 real digits."
              "</p>"]

    base = train["utility_gain"]
    parts += [_h("solvers", "Other solvers and step counts"), _img(plots["solvers"]),
              _table(["sampler", "utility gain", "fraction of training sampler's", "learned-reward gain"],
                     [[f"{r['solver']} {r['steps']}", _pm(r["utility_gain"], r["utility_gain_se"]),
                       f"{r['utility_gain'] / base:.3f}" if base else "n/a", _pm(r["reward_gain"], r["reward_gain_se"])]
                      for r in results["settings"]]),
              "<p class='note'>em = Euler-Maruyama (stochastic); ddim, heun and dpm2 integrate the deterministic "
              "probability-flow ODE with the fine-tuned score.</p>"]

    fb, rm = results["feedback"], results["reward_model"]
    parts += [_h("feedback", "Feedback and reward model"),
              _table(["", "value"], [
                  ["labeler", fb["labeler"] + (f" (hidden utility {fb['utility']!r}, temperature {fb['temperature']})"
                                               if fb["temperature"] is not None else " (a person, in the web app)")],
                  ["items / comparisons", f"{fb['items']} / {fb['comparisons']}"],
                  ["reward model held-out accuracy", f"{rm['validation']['accuracy']:.3f} on {rm['n_val']} pairs"],
                  ["the labeler's own ceiling", "n/a" if rm["ceiling"] is None else f"{rm['ceiling']:.3f}"]])]

    parts += [_h("reproduce", "Reproduce"),
              f"<pre>scoreaction quickstart --out {html.escape(cfg['out'])} --seed {cfg['seed']}"
              f"{' --human' if cfg['human'] else ''}</pre>",
              f"<p class='note'>torch {html.escape(results['torch'])}, {results['threads']} thread(s). Settings: "
              f"{html.escape(str({k: v for k, v in cfg.items() if k not in ('out', 'solvers')}))}</p>",
              "</body></html>"]
    return "\n".join(parts)


def _story(results: dict) -> str:
    fb = results["feedback"]
    return (f"The shipped digits model drew {fb['items']} samples; {fb['labeler']} compared {fb['comparisons']} "
            "pairs of the same class; a Bradley-Terry reward ensemble learned from those answers; ctrl fine-tuned the "
            "model's score on that learned reward with a KL penalty to the pre-trained model; then both models were "
            "sampled from the same noise and compared."
            + ("" if fb["temperature"] is not None else
               f" A person labeled here: the 'hidden utility' below is the built-in {fb['utility']!r} utility (bold, "
               "centred strokes), a proxy that says nothing about your own taste; the learned reward is your taste."))


def tilt_text(results: dict) -> str:
    t, s = results["exact_tilt"], results["summary"]
    acc0, fd0 = s["class_accuracy"][0], s["frechet"][0]
    return (f"The exact tilt is what a perfect reward model and a perfect optimiser would give at the same gain (the "
            f"distribution closest in KL to the pre-trained model with that expected utility): the pre-trained samples "
            f"of stage 1 reweighted by exp(u / beta), with beta = {1 / t['inverse_beta']:.3g} chosen to gain the same "
            f"hidden utility as the fine-tuned policy. It has class accuracy {t['class_accuracy']:.3f} (pre-trained {acc0:.3f}) and Frechet "
            f"distance {t['frechet']:.2f} (pre-trained {fd0:.2f}): that much of the quality change comes with the "
            "taste itself, not with the fine-tuning method"
            + (f" (only {t['min_effective_items_per_class']:.0f} effective items per class of "
               f"{t['items_per_class']}: duplicates inflate its Frechet distance)." if
               t["min_effective_items_per_class"] < 2 * results["config"]["per_class"] else "."))


def hacking_verdict(results: dict) -> str:
    """Plain words on whether the policy exploits the reward model, from the numbers in the table."""
    s, train = results["summary"], results["settings"][0]
    lr, lu = s["reward_gain_sd"], s["utility_gain_sd"]
    a0, a1 = train["pretrained"]["agreement"], train["finetuned"]["agreement"]
    text = (f"In standard deviations of the pre-trained samples, the learned reward rose by {lr:+.2f} and the hidden "
            f"utility by {lu:+.2f}. ")
    if lu <= 0 < lr:
        text += "The policy raised the learned reward without raising the utility: it exploits the reward model. "
    elif lr > 1.5 * lu > 0:
        text += ("The learned reward overstates the improvement (part of its gain is exploitation of the reward "
                 "model, which the KL penalty limits but does not remove). ")
    else:
        text += "The two rose together: no sign that the policy exploits the reward model. "
    text += (f"The reward orders same-class pairs as the utility does {a0:.1%} of the time on pre-trained samples "
             f"and {a1:.1%} on fine-tuned ones")
    return text + (" (the reward model is less reliable where the policy moved)." if a1 < a0 - 0.03 else ".")


def _h(anchor: str, title: str) -> str:
    return f"<h2 id='{anchor}'>{html.escape(title)}</h2>"


def _img(name: str) -> str:
    return f"<p><img src='{html.escape(name)}' alt='{html.escape(name)}'></p>"


def _yes(met: bool) -> str:
    return "<span class='yes'>yes</span>" if met else "<span class='no'>no</span>"


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}"


def _table(header: list, rows: list) -> str:
    def cell(v, tag):
        return f"<{tag}>{v if isinstance(v, str) and v.startswith('<span') else html.escape(str(v))}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
