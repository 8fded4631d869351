"""finetune.md and the finetune_*.png plots from `BenchResults`: the measured figures, no verdicts. How the
variants' settings were chosen is in the committed docs/benchmarks/tuning-notes.md, which the report links to."""

from __future__ import annotations

import math
from pathlib import Path

from scoreaction.experiments.finetune_config import PREFIX, REPORT, TUNING_NOTES
from scoreaction.experiments.finetune_results import BenchResults, CostCell, SolverGain
from scoreaction.io import atomic_write_bytes

DISTANCES = {"gaussian_kl": "KL(Gaussian fit ‖ p*)", "sliced_w2": "sliced W2 to exact p* samples"}


def write_report(results: BenchResults | dict, out: str | Path) -> Path:
    """finetune.md and the PNG plots from the results (a `BenchResults`, or finetune.json as parsed)."""
    if isinstance(results, dict):
        results = BenchResults.from_json(results)
    out = Path(out)
    plots = make_plots(results, out)
    atomic_write_bytes(out / REPORT, render_markdown(results, plots).encode())
    return out / REPORT


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** (1 - digits) else f"{value:.1e}"


def _pm(value, se, digits: int = 4) -> str:
    return f"{_fmt(value, digits)} ± {_fmt(se, digits)}" if se is not None else _fmt(value, digits)


def _load(values) -> str:
    return "n/a" if not values else "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def render_markdown(results: BenchResults, plots: dict) -> str:
    cfg, machine = results.config, results.machine
    quick = " (quick mode: tiny budgets, the numbers mean nothing)" if cfg.quick else ""
    lines = [f"# Fine-tuning benchmark{quick}", "", "```", results.command, "```", "",
             f"- Date: {results.date}",
             f"- Machine: {machine['cpu_count']} CPUs ({machine['processor']}, {machine['platform']}), torch "
             f"{machine['torch']}, Python {machine['python']}",
             f"- Parallelism: {machine['workers']} worker process(es) × {machine['threads_per_process']} torch "
             "thread(s) for the training runs; cost cells one at a time",
             f"- Load average (1, 5, 15 min): at start {_load(machine.get('load_average_start'))}, at end "
             f"{_load(machine.get('load_average_end'))} (wall times grow with load, CPU times much less)",
             f"- Wall time of this run: {results.wall_seconds / 60:.1f} min", "",
             "## Settings", "",
             f"Every variant: seed {cfg.seed}, batch {cfg.batch_size}, {cfg.updates} updates "
             f"({cfg.batch_size * cfg.updates} sampled trajectories), K = {cfg.steps} Euler-Maruyama training steps "
             f"(eta = 1), beta_KL = 1. Evaluation: {cfg.eval_steps}-step Euler-Maruyama on a uniform grid "
             f"(`evaluation.objective`), curves every {cfg.eval_every} updates on {cfg.eval_n} samples (one seed for "
             f"all), final evaluation on {cfg.final_n} samples. How the options were chosen: "
             f"[docs/benchmarks/{TUNING_NOTES}]({TUNING_NOTES}).", "",
             "| variant | algorithm | rollout grid | options (others: the Config defaults) |", "|---|---|---|---|"]
    for name, v in results.variants.items():
        opts = [f"{k}={val}" for k, val in v.algo.items()] + (["lr decays linearly to 0"] if v.lr_decay else [])
        lines.append(f"| {name} | {v.algorithm} | {v.grid} | {', '.join(opts) or 'defaults'} |")
    lines.append("")
    if results.optimality:
        lines += _optimality_section(results, plots)
    if results.robustness:
        lines += _robustness_section(results, plots)
    if results.cost:
        lines += _cost_section(results, plots)
    return "\n".join(lines)


def _optimality_section(results: BenchResults, plots: dict) -> list[str]:
    lines = ["## 1. Optimality", "",
             "Fraction of the achievable improvement closed, (J(theta) - E_pre[r]) / (J* - E_pre[r]), ± one standard "
             "error: *MC* is `evaluation.objective`; *paired* rolls the exact optimal control a* out on the same "
             "draws and noise (the regret against a* under the evaluation sampler). Gap = 1 - paired fraction. "
             "Run wall: training and every evaluation of the run.", ""]
    for key in results.tasks:
        ref = results.references[key]
        rr = ref.reference
        se = f" ± {rr['J_star_se']:.4f} (MC)" if "J_star_se" in rr else ""
        lines += [f"### {key}", "",
                  f"J* = {rr['J_star']:.4f}{se}, E_pre[r] = {rr['E_pre_r']:.4f}, achievable improvement "
                  f"{ref.improvement:.4f}, KL(P* ‖ P_pre) = {rr['KL_star']:.4f}; a* itself scores "
                  f"{_pm(ref.optimal_fraction_plain, ref.optimal_fraction_se)} (MC). Distance: "
                  f"{DISTANCES[ref.distance]}; noise floor (exact p* samples) {_floor_text(results, key)}.", "",
                  "| variant | fraction (MC) | fraction (paired) | gap | regret (nats) | distance to p* | path KL | "
                  "E[r] | s/update (CPU s) | run wall s (CPU s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results.runs_of(key):
            f = r.final
            lines.append(f"| {r.variant} | {_pm(f.fraction, f.fraction_se)} | "
                         f"{_pm(f.fraction_paired, f.fraction_paired_se)} | {_fmt(f.gap)} | "
                         f"{_pm(f.regret, f.regret_se)} | {_fmt(f.distance)} | {_fmt(f.path_kl)} | {_fmt(f.reward)} | "
                         f"{r.seconds_per_update:.3f} ({r.cpu_seconds_per_update:.3f}) | "
                         f"{r.wall_seconds:.0f} ({r.cpu_seconds:.0f}) |")
        lines.append("")
    for name in ("fraction", "distance"):
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    return lines


def _final_floor(results: BenchResults, key: str) -> float | None:
    """The distance of exact p* samples to p* at the final evaluation's size."""
    ref = results.references[key]
    if ref.distance_floor_final is not None:
        return ref.distance_floor_final
    return next((r.final.distance_floor for r in results.runs_of(key) if r.final.distance_floor is not None), None)


def _curve_floor(results: BenchResults, key: str) -> float | None:
    """The same at the curves' size."""
    ref = results.references[key]
    if ref.distance_floor_eval is not None:
        return ref.distance_floor_eval
    return next((p.distance_floor for r in results.runs_of(key) for p in r.curve if p.distance_floor), None)


def _floor_text(results: BenchResults, key: str) -> str:
    floor = _final_floor(results, key)
    return f"{_fmt(floor)} at n = {results.config.final_n}" if floor is not None else "n/a"


def _gain_rows(results: BenchResults) -> list[tuple[str, list[SolverGain]]]:
    rob = results.robustness
    return [("a* (exact)", rob.optimal)] + list(rob.variants.items())


def _robustness_section(results: BenchResults, plots: dict) -> list[str]:
    rob = results.robustness
    base = f"{rob.base[0]} {rob.base[1]}"
    cols = [f"{s} {k}" for s, k in rob.solvers]
    lines = ["## 2. Discretisation and solver robustness", "",
             f"Policies trained on {rob.task} with K = {results.config.steps} Euler-Maruyama steps. Reward gain over "
             f"the pretrained model under the same sampler (paired, {rob.n} samples), as a fraction of the gain under "
             f"{base}, ± one standard error (delta method). em: Euler-Maruyama (eta = 1); heun, dpm2: the "
             "probability-flow ODE (eta = 0). a*: the exact optimal control.", "",
             f"| policy | gain at {base} | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, gains in _gain_rows(results):
        b = next(g for g in gains if (g.solver, g.steps) == tuple(rob.base))
        lines.append(f"| {name} | {_pm(b.gain, b.gain_se, 3)} | " +
                     " | ".join(_pm(g.fraction, g.fraction_se, 3) for g in gains) + " |")
    lines.append("")
    if "robustness" in plots:
        lines += [f"![robustness]({plots['robustness']})", ""]
    return lines


COST_TABLES = (("Seconds per update (wall):", "seconds_per_update", 3),
               ("CPU seconds per update (`time.process_time`):", "cpu_seconds_per_update", 3),
               ("Peak RSS increase per update (MB):", "peak_increase_mb", 1))


def _cost_section(results: BenchResults, plots: dict) -> list[str]:
    rows, cfg = results.cost, results.config
    cells = sorted({(r.dim, r.steps) for r in rows}, key=lambda c: (c[1] != cfg.steps, c[0], c[1]))
    head = " | ".join(f"d={d}, K={k}" for d, k in cells)
    where = "a fresh subprocess per cell" if cfg.cost_isolated else "the benchmark's own process (memory indicative)"
    lines = ["## 3. Cost", "",
             f"Task `gaussian` in d dimensions, batch {cfg.batch_size}, {cfg.threads} torch thread(s), {where}. Time: "
             f"median of {cfg.cost_timed} timed updates after {cfg.cost_warmup} warm-up update(s). Memory: peak RSS "
             "after the updates minus the RSS after building the trainer (peak counter reset through "
             "/proc/self/clear_refs; exact to about a megabyte).", ""]
    by = {(r.variant, r.dim, r.steps): r for r in rows}
    names = list(dict.fromkeys(r.variant for r in rows))
    for title, attr, digits in COST_TABLES:
        lines += [title, "", f"| algorithm | {head} |", "|---|" + "---|" * len(cells)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_cell(by.get((name, d, k)), attr, digits) for d, k in cells)
                         + " |")
        lines.append("")
    if "cost" in plots:
        lines += [f"![cost]({plots['cost']})", ""]
    return lines


def _cell(row: CostCell | None, attr: str, digits: int) -> str:
    if row is None:
        return "-"
    return "failed" if row.error else _fmt(getattr(row, attr), digits)


# --- plots ----------------------------------------------------------------------------------------------
def make_plots(results: BenchResults, out: Path) -> dict:
    """PNG plots (matplotlib, Agg); returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    if results.tasks:
        for name in ("fraction", "distance"):
            plots[name] = _plot_curves(plt, results, name, out / f"{PREFIX}optimality_{name}.png")
    if results.robustness:
        plots["robustness"] = _plot_robustness(plt, results, out / f"{PREFIX}robustness.png")
    if any(not r.error for r in results.cost or []):
        plots["cost"] = _plot_cost(plt, results, out / f"{PREFIX}cost.png")
    return plots


def _plot_curves(plt, results: BenchResults, name: str, path: Path) -> str:
    tasks = results.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, key in zip(axes[0], tasks):
        for r in results.runs_of(key):
            ys = [getattr(p, name) for p in r.curve]
            ax.plot([p.trajectories for p in r.curve], [float("nan") if y is None else y for y in ys], marker=".",
                    label=r.variant, linestyle="--" if r.variant == "ctrl-uniform" else "-")
        if name == "fraction":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
            ax.set_ylabel("fraction of achievable improvement closed")
        else:
            ax.set_yscale("log")
            floor = _curve_floor(results, key)
            if floor:
                ax.axhline(floor, color="gray", lw=0.8, ls=":", label="noise floor")
            ax.set_ylabel(DISTANCES[results.references[key].distance])
        ax.set_title(key)
        ax.set_xlabel("sampled trajectories")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, path)


def _plot_robustness(plt, results: BenchResults, path: Path) -> str:
    rob = results.robustness
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{s} {k}" for s, k in rob.solvers]
    for name, gains in _gain_rows(results):
        ax.errorbar(range(len(labels)), [g.fraction for g in gains], yerr=[g.fraction_se for g in gains],
                    marker="o", capsize=3, label=name, color="k" if name.startswith("a*") else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(f"gain / gain at {rob.base[0]} {rob.base[1]}")
    ax.set_title(f"solver robustness on {rob.task} (trained with {results.config.steps} EM steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, path)


def _plot_cost(plt, results: BenchResults, path: Path) -> str:
    rows, steps = [r for r in results.cost if not r.error], results.config.steps
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    d_min = min(r.dim for r in rows)
    for name in dict.fromkeys(r.variant for r in rows):
        by_d = sorted(((r.dim, r) for r in rows if r.variant == name and r.steps == steps), key=lambda p: p[0])
        by_k = sorted(((r.steps, r) for r in rows if r.variant == name and r.dim == d_min), key=lambda p: p[0])
        for col, pts, xlabel in ((0, by_d, f"dimension d (K = {steps})"), (1, by_k, f"rollout steps K (d = {d_min})")):
            for row, attr, ylabel in ((0, "cpu_seconds_per_update", "CPU seconds per update"),
                                      (1, "peak_increase_mb", "peak RSS increase (MB)")):
                ax = axes[row][col]
                ax.plot([x for x, _ in pts], [max(getattr(r, attr), 1e-3) for _, r in pts], marker="o", label=name)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
