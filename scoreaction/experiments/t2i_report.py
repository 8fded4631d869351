"""t2i.md and t2i_accuracy.png from the results of `scoreaction bench --task t2i` (experiments/t2i.py) alone.

Figures over seeds are means with their 95 % Student-t half-widths (experiments/common.interval), "mean ± half".
Accuracy is GenEval's overall accuracy (the mean over categories of the fraction of images the checker passes),
of images sampled with DDIM eta = 0 on the scheduler's grid; gains are paired with the pretrained model on the same
noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from scoreaction.experiments.common import first_reach, interval
from scoreaction.experiments.diffusers_report import header
from scoreaction.experiments.t2i import ALGO, LEARNING_RATES, PREFIX, REPORT, T2IResults
from scoreaction.io import atomic_write_bytes

SETS = {"train": "training prompts (shapes-train)", "heldout": "held-out prompts (shapes-heldout)"}
CURVES = PREFIX + "accuracy.png"


def write_report(results: T2IResults | dict, out: str | Path) -> Path:
    """Write t2i.md and the curves into `out`; `results` a T2IResults or its JSON (the image grids are the cells')."""
    results = T2IResults.from_json(results) if isinstance(results, dict) else results
    out = Path(out)
    curves(results, out / CURVES)
    atomic_write_bytes(out / REPORT, render_markdown(results).encode())
    return out / REPORT


# --- numbers --------------------------------------------------------------------------------------------------
def methods_of(results) -> list[str]:
    return list(dict.fromkeys(c.method for c in results.cells))


def runs(results, method: str) -> list:
    return [c for c in results.cells if c.method == method and c.error is None]


def overall(point: dict, key: str = "accuracy") -> float:
    """Overall accuracy (key accuracy or accuracy_pretrained) or its paired gain (accuracy_gain) at an evaluation."""
    value = point[key]["overall"]
    return value["gain"] if key == "accuracy_gain" else value


def pm(values: list, digits: int = 3) -> str:
    """mean ± 95 % half-width over seeds; n/a without values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean, half = interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:.{digits}f} (one seed)"


def reach(cells: list, target: float, prompts: str, x: str) -> str:
    """Trajectories or CPU seconds (`x`) at which each seed's curve first reaches `target`, over seeds."""
    hits = [first_reach([p[x] for p in c.curve], [overall(p[prompts]) for p in c.curve], target) for c in cells]
    if not cells or any(h is None for h in hits):
        return f"{sum(h is not None for h in hits)}/{len(cells)} seeds reach it"
    return pm(hits, 0 if x == "trajectories" else 1)


# --- sections -------------------------------------------------------------------------------------------------
def settings(results) -> list[str]:
    cfg, p = results.config, results.prompts
    digests = sorted({c.weights_digest for c in results.cells if c.weights_digest})
    rows = [("pipeline", f"{cfg.model} (weights {', '.join(digests) or 'n/a'}), copied once; every cell loads the "
                         "copy"),
            ("methods, seeds", f"{', '.join(methods_of(results))}; seeds {cfg.seeds}, one process per cell"),
            ("reward", f"{cfg.reward} (checker: shapes/checker.py), on prompts drawn from shapes-train"),
            ("updates U, batch B, steps K", f"{cfg.updates}, {cfg.batch_size}, {cfg.steps} (DDIM eta {cfg.eta:g}, "
                                            "the scheduler's timesteps)"),
            ("guidance scale, LoRA", f"{cfg.guidance_scale:g}; rank {cfg.lora_rank}, alpha {cfg.lora_rank}, on to_k, "
                                     "to_q, to_v, to_out.0"),
            ("learning rates (untuned)", ", ".join(f"{m} {LEARNING_RATES[m]:g}" for m in methods_of(results))),
            ("shared PPO options", ", ".join(f"{k} {v}" for k, v in ALGO.items()) + "; TRL: train_num_inner_epochs, "
                                   "train_batch_size B / minibatches, train_clip_range, the same advantage clip 5 "
                                   "and per-prompt reward statistics as ddpo's"),
            ("beta_KL", f"{cfg.beta_kl:g} (scoreaction's methods; TRL has none)"),
            ("evaluations", f"at update 0 and every {cfg.eval_every}: {len(p['train'])} training and "
                            f"{len(p['heldout'])} held-out prompts x {cfg.per_prompt} images, DDIM eta 0, K = "
                            f"{cfg.steps}; policy and pretrained model on the same noise (seed 1000000 + seed)"),
            ("clocks", "CPU seconds (time.process_time) and wall seconds of training only, evaluations excluded"),
            ("diversity", f"{cfg.diversity_per_prompt} images per prompt of {len(p['grid'])} prompts: the variance "
                          "(trace of the covariance) of the shipped CLIP's normalised image embeddings within a "
                          "prompt, averaged over prompts"),
            ("path KL", f"Trainer.evaluate: {cfg.kl_n} rollouts of the policy's kernel, K = {cfg.steps}, uniform grid")]
    return ["## Settings", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def cells_table(results) -> list[str]:
    lines = ["## Cells", "", "Wall seconds of the evaluations along the curve and of the final ones, and of the whole "
             "process (setup included).", "",
             "| method | seed | training CPU s | training wall s | curve evaluations s | final evaluations s | "
             "process s | load |", "|---|---|---|---|---|---|---|---|"]
    for c in results.cells:
        if c.error is not None:
            lines.append(f"| {c.method} | {c.seed} | failed: {c.error} | | | | | {c.load_start[0]:.2f} |")
        else:
            last = c.curve[-1]
            lines.append(f"| {c.method} | {c.seed} | {last['cpu_seconds']:.1f} | {last['wall_seconds']:.1f} | "
                         f"{c.eval_seconds:.1f} | {c.final_seconds:.1f} | {c.wall_seconds:.1f} | "
                         f"{c.load_start[0]:.2f} |")
    return lines + [""]


def final_accuracy(results) -> list[str]:
    lines = ["## Final accuracy", "", "After the last update; pretrained: the same seeds' noise.", "",
             "| method | " + " | ".join(f"{s}: pretrained | {s}: fine-tuned | {s}: gain" for s in SETS) + " |",
             "|---" * (1 + 3 * len(SETS)) + "|"]
    for m in methods_of(results):
        cells = runs(results, m)
        lines.append(f"| {m} | " + " | ".join(" | ".join(pm([overall(c.curve[-1][s], key) for c in cells])
                                                        for key in ("accuracy_pretrained", "accuracy", "accuracy_gain"))
                                             for s in SETS) + " |")
    return lines + [""]


def categories(results) -> list[str]:
    lines = []
    for s, name in SETS.items():
        cells = [c for c in results.cells if c.error is None]
        if not cells:
            continue
        cats = list(cells[0].curve[-1][s]["accuracy"]["per_category"])
        lines += [f"### Per category, {name}", "", "| method | " + " | ".join(cats) + " |",
                  "|---" * (1 + len(cats)) + "|"]
        first = runs(results, methods_of(results)[0])
        lines.append("| pretrained | " + " | ".join(pm([c.curve[-1][s]["accuracy_pretrained"]["per_category"][k]
                                                        for c in first]) for k in cats) + " |")
        for m in methods_of(results):
            lines.append(f"| {m} | " + " | ".join(pm([c.curve[-1][s]["accuracy"]["per_category"][k]
                                                      for c in runs(results, m)]) for k in cats) + " |")
        lines.append("")
    return ["## Final accuracy per category", ""] + lines if lines else []


def to_ddpo(results) -> list[str]:
    ddpo = runs(results, "ddpo")
    if not ddpo:
        return []
    targets = {s: interval([overall(c.curve[-1][s]) for c in ddpo])[0] for s in SETS}
    lines = ["## To reach ddpo's final accuracy", "",
             "Per seed, the first evaluation at which the overall accuracy reaches ddpo's final mean (linear "
             "interpolation between evaluations); targets: " + ", ".join(f"{s} {t:.3f}" for s, t in targets.items())
             + ".", "",
             "| method | " + " | ".join(f"{s}: trajectories | {s}: CPU s" for s in SETS) + " |",
             "|---" * (1 + 2 * len(SETS)) + "|"]
    for m in methods_of(results):
        lines.append(f"| {m} | " + " | ".join(f"{reach(runs(results, m), targets[s], s, 'trajectories')} | "
                                              f"{reach(runs(results, m), targets[s], s, 'cpu_seconds')}"
                                              for s in SETS) + " |")
    return lines + [""]


def solvers(results) -> list[str]:
    pairs = results.config.solvers
    lines = ["## Accuracy gain under other solvers", "",
             "Training prompts, eta = 0, the scheduler's grid; the gain over the pretrained model under the same "
             "solver and noise.", "",
             "| method | " + " | ".join(f"{name} {k}" for name, k in pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
    for m in methods_of(results):
        lines.append(f"| {m} | " + " | ".join(pm([overall(c.solvers[i], "accuracy_gain") for c in runs(results, m)])
                                              for i in range(len(pairs))) + " |")
    return lines + [""]


def cost_of_change(results) -> list[str]:
    lines = ["## Path KL and diversity", "",
             "| method | path KL to pretrained | CLIP diversity, fine-tuned | pretrained | training CPU s |",
             "|---|---|---|---|---|"]
    for m in methods_of(results):
        cells = runs(results, m)
        lines.append(f"| {m} | {pm([c.path_kl for c in cells])} | "
                     f"{pm([c.diversity.get('policy') for c in cells], 4)} | "
                     f"{pm([c.diversity.get('pretrained') for c in cells], 4)} | "
                     f"{pm([c.curve[-1]['cpu_seconds'] for c in cells], 1)} |")
    return lines + [""]


def figures(results) -> list[str]:
    lines = ["## Figures", "", f"![accuracy against trajectories and CPU seconds]({CURVES})", ""]
    for c in results.cells:
        if c.grid and c.error is None:
            lines += [f"![{c.method}, seed {c.seed}: pretrained | fine-tuned, same noise]({c.grid})", ""]
    return lines


def render_markdown(results) -> str:
    title = "Text-to-image benchmark: GenEval accuracy of the shapes model, scoreaction beside TRL's DDPOTrainer"
    return "\n".join(header(results, title) + cells_table(results) + settings(results) + final_accuracy(results)
                     + categories(results) + to_ddpo(results) + solvers(results) + cost_of_change(results)
                     + figures(results))


# --- the figure -----------------------------------------------------------------------------------------------
def curves(results, path: Path) -> None:
    """Overall accuracy on both prompt sets against trajectories and against training CPU seconds: the mean over
    seeds, and its 95 % band against trajectories."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False, constrained_layout=True)
    for row, (s, name) in enumerate(SETS.items()):
        for col, x in enumerate(("trajectories", "cpu_seconds")):
            ax = axes[row, col]
            for m in methods_of(results):
                cells = runs(results, m)
                if not cells:
                    continue
                stats = [interval([overall(c.curve[i][s]) for c in cells]) for i in range(len(cells[0].curve))]
                xs = [sum(c.curve[i][x] for c in cells) / len(cells) for i in range(len(cells[0].curve))]
                mean = [a for a, _ in stats]
                ax.plot(xs, mean, marker="o", ms=3, lw=1.2, label=m)
                if x == "trajectories" and all(math.isfinite(h) for _, h in stats):
                    ax.fill_between(xs, [a - h for a, h in stats], [a + h for a, h in stats], alpha=0.15)
            ax.set_xlabel("trajectories" if x == "trajectories" else "training CPU seconds (mean over seeds)")
            ax.set_ylabel("overall accuracy")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
    if methods_of(results):
        axes[0, 0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
