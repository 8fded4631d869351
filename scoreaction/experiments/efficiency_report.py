"""efficiency.md and the efficiency_*.png plots from `EfficiencyResults` (efficiency.py): figures over seeds with 95 %
intervals, and comparisons that call a difference a difference only where the intervals separate."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from scoreaction.experiments.efficiency import (
    LEVELS,
    PREFIX,
    REPORT,
    REWARD_GRADIENT,
    REWARD_ONLY,
    SETTINGS_METHODS,
    EfficiencyResults,
    Run,
    cell_stats,
    interval,
    separated,
)
from scoreaction.io import atomic_write_bytes

TARGET = "0.95"  # the level the headline comparison is made at


def write_report(results: EfficiencyResults | dict, out: str | Path) -> Path:
    """efficiency.md and its plots from the results (an `EfficiencyResults`, or efficiency.json as parsed)."""
    if isinstance(results, dict):
        results = EfficiencyResults.from_json(results)
    out = Path(out)
    lines = ["# Sample efficiency over seeds", "",
             "Every figure is a mean over seeds ± the half-width of its 95 % Student-t interval. *Fraction closed* is "
             "the paired fraction of the achievable improvement, 1 + mean(J_theta - J_a*) / (J* - E_pre[r]), with the "
             "policy and the exact optimal control a* rolled out from the same draws and noise on a 200-step uniform "
             "Euler-Maruyama grid, whatever grid training used (so every run is also trained at K and scored at "
             "K = 200). *Trajectories to x* are the sampled trajectories at which a seed's curve first reaches x "
             "(linear interpolation between evaluations); *not reached* says how many seeds reached it within the "
             "budget. A difference is called one only where the intervals separate. How the learning rates were "
             "chosen: [tuning-notes.md](tuning-notes.md) (a sweep on seed 0; the seeds below are others).", ""]
    if results.cells("methods"):
        lines += methods_section(results, out)
    if results.cells("solvers"):
        lines += solvers_section(results)
    if results.cells("settings"):
        lines += settings_section(results, out)
    atomic_write_bytes(out / REPORT, "\n".join(lines).encode())
    return out / REPORT


def _header(results: EfficiencyResults, section: str) -> list[str]:
    lines = []
    for key, h in results.headers.items():
        if key == section or key.startswith(section + " ("):
            lines += _one_header(h)
    return lines


def _one_header(h: dict) -> list[str]:
    m, cfg = h["machine"], h["config"]
    load = lambda values: "n/a" if not values else "(" + ", ".join(f"{v:.1f}" for v in values) + ")"  # noqa: E731
    quick = " **Quick mode: tiny budgets, the numbers mean nothing.**" if cfg.get("quick") else ""
    return ["```", h["command"], "```", "",
            f"- Date: {h['date']}; {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch']}, {m['workers']} "
            f"worker process(es) × {m['threads_per_process']} thread(s); load average (1, 5, 15 min) at start "
            f"{load(m.get('load_average_start'))}, at end {load(m.get('load_average_end'))}; wall "
            f"{h['wall_seconds'] / 60:.1f} min.{quick}",
            f"- Seeds {', '.join(map(str, cfg['seeds']))}; batch {cfg['batch_size']}; curves on {cfg['eval_n']} "
            f"samples after each of the first {cfg['dense']} updates, then every {cfg['eval_every']}; final "
            f"fraction on {cfg['final_n']} samples.", ""]


def fmt_fraction(cell: tuple[float, float]) -> str:
    return f"{cell[0]:.4f} ± {cell[1]:.4f}"


def fmt_count(cell: tuple[float, float] | None, reached: int = 0, seeds: int = 0) -> str:
    if cell is None:
        return f"not reached ({reached}/{seeds})"
    return f"{cell[0] / 1000:.1f}k ± {cell[1] / 1000:.1f}k"


def _row(name: str, s) -> str:
    levels = [fmt_count(s.to_level[str(lv)], s.reached[str(lv)], s.seeds) for lv in LEVELS]
    return (f"| {name} | {fmt_fraction(s.final)} | " + " | ".join(levels) +
            f" | {s.path_kl[0]:.3f} | {s.cpu_seconds[0]:.0f} |")


def compare(ctrl, other, name: str, ours: str = "ctrl") -> str:
    """ctrl's trajectories to the highest level that either reaches on every seed, against another cell's: the
    ratio, and which needs fewer where the intervals separate."""
    level = next((str(lv) for lv in sorted(LEVELS, reverse=True)
                  if ctrl.to_level[str(lv)] is not None or other.to_level[str(lv)] is not None), None)
    if level is None:
        return f"neither {ours} nor {name} reaches {min(LEVELS)} on every seed"
    a, b = ctrl.to_level[level], other.to_level[level]
    at = "" if level == TARGET else f"to {level}: "
    if b is None:
        return (f"{at}{ours} reaches {level} on every seed, {name} on {other.reached[level]}/{other.seeds}: "
                f"{ours} is better")
    if a is None:
        return (f"{at}{name} reaches {level} on every seed, {ours} on {ctrl.reached[level]}/{ctrl.seeds}: "
                f"{name} is better")
    verdict = (f"{ours} needs fewer" if a[0] < b[0] else f"{name} needs fewer") if separated(a, b) else \
        "no difference (the intervals overlap)"
    return f"{at}{ours} needs {a[0] / b[0]:.2f}x the trajectories of {name}: {verdict}"


def compare_final(ctrl, other, name: str, ours: str = "ctrl") -> str:
    """The final fractions closed: which is higher where the intervals separate."""
    if not separated(ctrl.final, other.final):
        return "no difference"
    return f"{ours} higher" if ctrl.final[0] > other.final[0] else f"{name} higher"


def methods_section(results: EfficiencyResults, out: Path) -> list[str]:
    cells = results.cells("methods")
    tasks = list(dict.fromkeys(c for c, _ in cells))
    lines = ["## 1. Methods on the exact tasks", ""] + _header(results, "methods")
    cfg = next(h for k, h in results.headers.items() if k.startswith("methods"))["config"]
    lines += [f"Every method at its benchmarked setting (`METHODS` in scoreaction/experiments/efficiency.py), "
              f"{cfg['updates']} updates of {cfg['batch_size']} trajectories with K = 20 Euler-Maruyama steps, the "
              "learning rate decaying linearly to 0 over the run, beta_KL = 1. Reward-only methods (the black-box "
              f"setting of human-preference rewards): {', '.join(REWARD_ONLY)}; reward-gradient methods: "
              f"{', '.join(REWARD_GRADIENT)}.", ""]
    summary = []
    for task in tasks:
        stats = {m: cell_stats(runs) for (c, m), runs in cells.items() if c == task}
        ref = results.references[task]
        lines += [f"### {task}", "", f"J* = {ref['J_star']:.4f}, E_pre[r] = {ref['E_pre_r']:.4f}.", "",
                  "| method | fraction closed | trajectories to 0.8 | to 0.9 | to 0.95 | path KL | train CPU s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [_row(m, s) for m, s in stats.items()] + [""]
        only = {m: s for m, s in stats.items() if m in REWARD_ONLY}
        best = min(only, key=lambda m: _rank(only[m]), default=None)
        for ours in (m for m in stats if m.startswith("ctrl")):
            mine = stats[ours]
            if best:
                summary.append(f"- {task}, {ours} against the best reward-only method ({best}): "
                               + compare(mine, only[best], best, ours)
                               + f"; final fraction: {compare_final(mine, only[best], best, ours)}.")
            for m in (m for m in stats if not m.startswith("ctrl") and m != best):
                summary.append(f"- {task}, {ours} against {m}: " + compare(mine, stats[m], m, ours)
                               + f"; final fraction: {compare_final(mine, stats[m], m, ours)}.")
    if summary:
        lines += ["### ctrl against the others", "", "Trajectories to 0.95 (or to the highest level either method "
                  "reaches on every seed), and the final fraction closed.", ""] + summary + [""]
    plot = PREFIX + "methods.png"
    _curves(out / plot, {t: {m: runs for (c, m), runs in cells.items() if c == t} for t in tasks})
    return lines + [f"![curves]({plot})", ""]


def _rank(s) -> tuple:
    """Best first: reaches the target on more seeds, then fewer trajectories, then a higher final fraction."""
    hit = s.to_level[TARGET]
    return (-s.reached[TARGET], hit[0] if hit else math.inf, -s.final[0])


def solvers_section(results: EfficiencyResults) -> list[str]:
    cells = results.cells("solvers")
    optimal = results.references["solvers"]
    solvers = list(optimal)
    cfg = next(h for k, h in results.headers.items() if k.startswith("solvers"))["config"]
    lines = ["## 2. Solver consistency: the fraction of the gain kept under other solvers", ""]
    lines += _header(results, "solvers")
    lines += [f"Policies trained on gaussian d=2 as in section 1 ({cfg['updates']} updates, K = 20 Euler-Maruyama "
              "steps, eta = 1). Each column: the paired reward gain over the pretrained model under that solver "
              f"({cfg['robust_n']} samples, the same draws for every policy) as a fraction of the gain under em 20. "
              "em: Euler-Maruyama (eta = 1); heun, dpm2: the probability-flow ODE (eta = 0). The a* row is the exact "
              "optimal control's fraction; the other rows are a policy's fraction minus a*'s, over seeds (mean ± "
              "95 % half-width, and the seed farthest from a*). ctrl-x0 is ctrl with the residual read as an x0 "
              "correction (`task: {residual: x0}`, models/residual.py). Goal: within 0.03 of a* everywhere.", "",
              "| policy | " + " | ".join(solvers) + " | cells within 0.03 (every seed) |",
              "|---|" + "---|" * (len(solvers) + 1),
              "| a* (exact) | " + " | ".join(f"{optimal[k]:.3f}" for k in solvers) + " | |"]
    for (cell, method), runs in cells.items():
        row, within = [], 0
        for k in solvers:
            dev = [r.solvers[k] - optimal[k] for r in runs]
            mean, half = interval(dev)
            worst = max(dev, key=abs)
            within += all(abs(d) <= 0.03 for d in dev)
            row.append(f"{mean:+.3f} ± {half:.3f} ({worst:+.3f})")
        lines.append(f"| {method} | " + " | ".join(row) + f" | {within}/{len(solvers)} |")
    finals = {m: cell_stats(runs).final for (c, m), runs in cells.items()}
    lines += ["", "Fraction of the achievable improvement closed by the same runs (paired, 200 EM steps): " +
              ", ".join(f"{m} {fmt_fraction(f)}" for m, f in finals.items()) + ".", ""]
    return lines


def settings_section(results: EfficiencyResults, out: Path) -> list[str]:
    cells = results.cells("settings")
    names = list(dict.fromkeys(c for c, _ in cells))
    cfg = next(h for k, h in results.headers.items() if k.startswith("settings"))["config"]
    a, b = SETTINGS_METHODS
    lines = ["## 3. Settings where the continuous-time view should matter", ""] + _header(results, "settings")
    lines += [f"{a} against {b} (the best reward-only method of section 1 on gaussian d=2 when this section was "
              f"designed), each at its setting of section 1 ({a}: the plain residual, not ctrl-x0), {cfg['settings_updates']} updates of "
              f"{cfg['batch_size']}, on gaussian d=2 and beta_KL = 1 unless the setting says otherwise. Grids: "
              "each method's own (ctrl random, ddpo uniform) unless the setting names one.", "",
              f"| setting | {a}: fraction closed | {b}: fraction closed | final | {a}: trajectories to {TARGET} | "
              f"{b}: trajectories to {TARGET} | trajectories (to {TARGET}, else the highest level reached) |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        sa, sb = cell_stats(cells[(name, a)]), cell_stats(cells[(name, b)])
        lines.append(f"| {name} | {fmt_fraction(sa.final)} | {fmt_fraction(sb.final)} | {compare_final(sa, sb, b)} | "
                     f"{fmt_count(sa.to_level[TARGET], sa.reached[TARGET], sa.seeds)} | "
                     f"{fmt_count(sb.to_level[TARGET], sb.reached[TARGET], sb.seeds)} | {compare(sa, sb, b)} |")
    plot = PREFIX + "settings.png"
    _curves(out / plot, {n: {m: runs for (c, m), runs in cells.items() if c == n} for n in names})
    return lines + ["", f"![settings]({plot})", ""]


def _curves(path: Path, panels: dict[str, dict[str, list[Run]]]) -> None:
    """One panel per cell group: the mean paired fraction against trajectories, with a 95 % band over seeds."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, methods) in zip(axes.flat, panels.items()):
        for method, runs in methods.items():
            n = min(len(r.fraction) for r in runs)
            xs = runs[0].trajectories[:n]
            stats = [interval([r.fraction[i] for r in runs]) for i in range(n)]
            mean = [m for m, _ in stats]
            ax.plot(xs, mean, label=method, lw=1.3)
            ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.2)
        ax.set_ylim(0.5, 1.01)
        ax.axhline(0.95, color="grey", lw=0.6, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampled trajectories")
        ax.set_ylabel("fraction closed (paired)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
