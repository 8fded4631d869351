"""`scoreaction reward ...`: fit, evaluate and benchmark Bradley-Terry reward models.

    reward fit       comparisons (a preference store or a comparisons file) -> a reward-model folder
    reward evaluate  a reward-model folder on comparisons: accuracy, log-likelihood, calibration
    reward simulate  a comparisons file answered by a simulated labeler (for experiments and tests)
    reward bench     accuracy vs number of comparisons, random vs active selection (docs/benchmarks)

Each subcommand's options are one dataclass below; its flags are derived from the fields (cli/options.py),
and every subcommand also takes `--config FILE` and `--set key=value` (the keys are the field names).
`reward fit`'s model options are those of `FitConfig`, its defaults included; the ones without a flag
(batch_size, weight_decay, hidden, layers, channels, bootstrap, num_classes) are set with --set or --config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import torch

from scoreaction import __version__
from scoreaction.cli.feedback import check_labeler
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import (
    Options,
    check_choice,
    check_flag,
    check_positive_int,
    check_samples,
    check_seed,
    check_size,
    check_text,
    option,
    require,
)
from scoreaction.errors import ConfigError
from scoreaction.outputs import COMPARISONS, REWARD_MODEL, check_output, check_output_folder
from scoreaction.rewards.comparisons import MAX_BINS
from scoreaction.rewards.preference import ARCH_DEFAULTS, ARCHITECTURES, FitConfig

SIMULATED_TASKS = ("gaussian", "mixture", "digits")


def arch_default(key: str) -> str:
    return ", ".join(f"{v[key]:g} {arch}" for arch, v in ARCH_DEFAULTS.items())


@dataclass
class SourceOptions(Options):
    """Where the comparisons come from: fit and evaluate."""

    store: str | None = option(None, help="a preference store (scoreaction feedback init); or --comparisons")
    comparisons: str | None = option(None, help="a comparisons file (.safetensors: left, right, choice[, cond]); "
                                                "or --store")
    task: str | None = option(None, help="with --store: only this task's comparisons")
    labeler: str | None = option(None, help="with --store: only this labeler's answers")

    def __post_init__(self):
        for name in ("store", "comparisons", "task", "labeler"):
            check_text(name, getattr(self, name))
        if self.store is None and self.comparisons is None:
            raise ConfigError("--store DB or --comparisons FILE is required")
        if self.store is not None and self.comparisons is not None:
            raise ConfigError("give --store DB or --comparisons FILE, not both")

    def read(self):
        """Comparisons from the store (with task, labeler) or the comparisons file."""
        from scoreaction.rewards.preference import load_comparisons

        if self.comparisons:
            return load_comparisons(self.comparisons)
        from scoreaction.feedback.store import PreferenceStore

        with PreferenceStore(self.store) as store:
            return store.dataset(task=self.task, labeler=self.labeler)


@dataclass
class FitOptions(SourceOptions):
    out: str | None = option(None, help="reward-model folder to write; required")
    overwrite: bool = option(False, help="replace an existing reward-model folder at --out (only one of those)")
    arch: str = option(FitConfig.architecture, help="network: auto (cnn for images, else mlp), mlp or cnn")
    ensemble: int = option(FitConfig.ensemble, help="ensemble members K")
    epochs: int = option(FitConfig.epochs, help="passes over the training pairs")
    min_steps: int | None = option(FitConfig.min_steps, help=f"at least this many updates (default: "
                                                             f"{arch_default('min_steps')})")
    lr: float | None = option(FitConfig.lr, help=f"learning rate (default: {arch_default('lr')})")
    val_fraction: float = option(FitConfig.val_fraction, help="held-out fraction of the pairs")
    seed: int = option(FitConfig.seed, help="random seed")
    batch_size: int = option(FitConfig.batch_size, flag=False, help="pairs per update")
    weight_decay: float = option(FitConfig.weight_decay, flag=False, help="AdamW weight decay")
    hidden: int = option(FitConfig.hidden, flag=False, help="width of the networks")
    layers: int = option(FitConfig.layers, flag=False, help="layers of the MLP")
    channels: int = option(FitConfig.channels, flag=False, help="convolution width of the image network")
    bootstrap: bool = option(FitConfig.bootstrap, flag=False, help="each member on its own bootstrap resample")
    num_classes: int | None = option(FitConfig.num_classes, flag=False,
                                     help="class labels (default: 1 + the largest in the data, 0 if unconditional)")

    def __post_init__(self):
        super().__post_init__()
        require("--out", self.out)
        check_text("out", self.out)
        check_flag("overwrite", self.overwrite)
        check_output(self.out, REWARD_MODEL, overwrite=self.overwrite, inputs=(self.store, self.comparisons))
        check_choice("arch", self.arch, ("auto", *ARCHITECTURES))
        check_seed("seed", self.seed)
        check_flag("bootstrap", self.bootstrap)
        self.fit_config()  # FitConfig validates the model options

    def fit_config(self) -> FitConfig:
        names = [f.name for f in dataclasses.fields(FitConfig) if f.name != "architecture"]
        return FitConfig(architecture=self.arch, **{name: getattr(self, name) for name in names})


@dataclass
class EvaluateOptions(SourceOptions):
    model: str | None = option(None, help="a reward-model folder (reward fit --out); required")
    bins: int = option(10, help="calibration bins")

    def __post_init__(self):
        super().__post_init__()
        require("--model", self.model)
        check_text("model", self.model)
        check_positive_int("bins", self.bins)
        check_size("bins", self.bins, MAX_BINS, "each bin is a row of the table")


@dataclass
class SimulateOptions(Options):
    task: str | None = option(None, help="what the items are: " + ", ".join(SIMULATED_TASKS) + "; required")
    out: str | None = option(None, help="comparisons file to write (.safetensors); required")
    overwrite: bool = option(False, help="replace an existing comparisons file at --out (only one of those)")
    n: int = option(500, help="number of comparisons")
    items: int = option(1000, help="candidate items (digits: at most 1797)")
    utility: str | None = option(None, help="hidden utility (default: the task's; see scoreaction.rewards.utilities)")
    temperature: float = option(0.5, help="labeler temperature")
    error_rate: float = option(0.05, help="labeler lapse rate")
    tie_margin: float = option(0.0, help="tie when |u_l - u_r| < this")
    seed: int = option(0, help="random seed")

    def __post_init__(self):
        require("--task", self.task)
        check_choice("task", self.task, SIMULATED_TASKS)
        require("--out", self.out)
        check_text("out", self.out)
        check_flag("overwrite", self.overwrite)
        check_output(self.out, COMPARISONS, overwrite=self.overwrite)
        check_positive_int("n", self.n)
        if not (isinstance(self.items, int) and not isinstance(self.items, bool) and self.items >= 2):
            raise ConfigError(f"items must be an integer >= 2, found {self.items!r}")
        check_samples("items", self.items, ())
        check_labeler(self)
        check_seed("seed", self.seed)


@dataclass
class BenchOptions(Options):
    out: str = option("docs/benchmarks", help="where to write feedback[-quick].json/.png")
    quick: bool = option(False, help="a < 1 minute smoke run (writes feedback-quick.*)")
    seeds: int | None = option(None, help="number of seeds (default 3; 1 with --quick)")
    workers: int = option(2, help="parallel processes")

    def __post_init__(self):
        check_text("out", self.out)
        check_output_folder(self.out, "--out")
        check_flag("quick", self.quick)
        if self.seeds is not None:
            check_positive_int("seeds", self.seeds)
        check_positive_int("workers", self.workers)

    def command(self) -> str:
        """The command line that reproduces the run (recorded in the results)."""
        return ("scoreaction reward bench" + (" --quick" if self.quick else "")
                + (f" --seeds {self.seeds}" if self.seeds else "") + f" --workers {self.workers} --out {self.out}")


def read_options(args: argparse.Namespace, cls):
    """The subcommand's options: defaults < --config < flags < --set, validated by `cls`."""
    return cls.from_dict(assemble(args), f"for reward {args.reward_command}")


def print_metrics(title: str, metrics: dict | None) -> None:
    if metrics is None:
        return
    print(f"{title:10s} pairs {metrics['n']:6d}  non-tied {metrics['n_non_tied']:6d}  "
          f"accuracy {metrics['accuracy']:.4f}  "
          f"log-likelihood {metrics['log_likelihood']:.4f}  ECE {metrics['ece']:.4f}")


def cmd_fit(args: argparse.Namespace) -> int:
    from scoreaction.rewards.preference import fit_reward_model

    opts = read_options(args, FitOptions)
    torch.set_num_threads(1)  # the networks are tiny: more threads only add contention (see bench)
    comparisons = opts.read()
    t0 = time.perf_counter()
    result = fit_reward_model(comparisons, opts.fit_config())
    source = {"store": opts.store} if opts.store else {"comparisons": opts.comparisons}
    meta = {"scoreaction": __version__, "source": source, "task": opts.task, "labeler": opts.labeler,
            "fit_seconds": time.perf_counter() - t0, **result.summary()}
    folder = result.model.save(opts.out, metadata=meta, overwrite=opts.overwrite)
    if args.json:
        print(json.dumps({"model": str(folder), **meta}, indent=2, default=float))
        return 0
    print(f"reward model {folder} (model.safetensors, reward.json): {result.config.architecture}, "
          f"ensemble {result.config.ensemble}, classes {result.model.num_classes}, "
          f"{meta['fit_seconds']:.1f} s")
    print_metrics("train", result.train)
    print_metrics("validation", result.validation)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scoreaction.rewards.preference import evaluate_comparisons, load_reward_model

    opts = read_options(args, EvaluateOptions)
    model = load_reward_model(opts.model)
    metrics = evaluate_comparisons(model, opts.read(), bins=opts.bins)
    if args.json:
        print(json.dumps({"model": opts.model, **metrics}, indent=2))
        return 0
    print_metrics("evaluate", metrics)
    print("reliability (P(left preferred) bins): predicted vs observed")
    for row in metrics["reliability"]:
        print(f"  [{row['lo']:.2f}, {row['hi']:.2f})  n {row['count']:6d}  predicted {row['predicted']:.3f}  "
              f"observed {row['observed']:.3f}")
    return 0


def simulation_items(opts: SimulateOptions, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(items, class labels or None): digit images, or samples of the task's pretrained distribution."""
    if opts.task == "digits":
        from scoreaction.experiments.feedback_bench import digit_images

        x, y = digit_images()
        pick = torch.randperm(len(x), generator=gen)[:opts.items]
        return x[pick], y[pick]
    from scoreaction.tasks import make_task

    return make_task(opts.task).sample_pre(opts.items, generator=gen).float(), None


def cmd_simulate(args: argparse.Namespace) -> int:
    from scoreaction.feedback.labelers import SimulatedLabeler, make_utility
    from scoreaction.feedback.selection import select_pairs
    from scoreaction.rewards.preference import save_comparisons

    opts = read_options(args, SimulateOptions)
    gen = torch.Generator().manual_seed(opts.seed)
    items, cond = simulation_items(opts, gen)
    labeler = SimulatedLabeler(make_utility(opts.task, opts.utility), temperature=opts.temperature,
                               error_rate=opts.error_rate, tie_margin=opts.tie_margin, seed=opts.seed)
    pairs = torch.tensor(select_pairs(len(items), opts.n, cond=cond, generator=gen))
    comparisons = labeler.label(items[pairs[:, 0]], items[pairs[:, 1]], None if cond is None else cond[pairs[:, 0]])
    save_comparisons(opts.out, comparisons, {"task": opts.task, "labeler": repr(labeler)})
    ties = int(comparisons.tied.sum())
    ceiling = "undefined (all ties)" if ties == len(comparisons) else \
        f"{labeler.ceiling_accuracy(comparisons.left, comparisons.right, comparisons.cond):.4f}"
    print(f"{len(comparisons)} comparisons of {opts.task} samples {tuple(comparisons.shape)} by {labeler.name} "
          f"-> {opts.out} (ties {ties}, ceiling accuracy {ceiling})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from scoreaction.experiments.feedback_bench import markdown_table, run_benchmark, write

    opts = read_options(args, BenchOptions)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    results = run_benchmark(quick=opts.quick, seeds=opts.seeds, workers=opts.workers, log=log)
    results["command"] = opts.command()
    paths = write(results, opts.out)
    print(markdown_table(results))
    print(f"wall time {results['wall_seconds']:.0f} s, CPU time {results['cpu_seconds']:.0f} s "
          f"({opts.workers} worker(s)); wrote {paths['json']} and {paths['png']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("reward", help="learn Bradley-Terry reward models from pairwise comparisons")
    rsub = p.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", parser_class=type(p), required=True)

    def add(name: str, help: str, run, cls) -> argparse.ArgumentParser:
        q = rsub.add_parser(name, help=help, description=help)
        add_options(q, cls)
        add_config_args(q)
        q.set_defaults(run=run)
        return q

    q = add("fit", "fit a reward-model ensemble on comparisons; save it as a folder", cmd_fit, FitOptions)
    q.add_argument("--json", action="store_true", help="print JSON")
    q = add("evaluate", "accuracy, log-likelihood and calibration of a reward model on comparisons", cmd_evaluate,
            EvaluateOptions)
    q.add_argument("--json", action="store_true", help="print JSON")
    add("simulate", "write a comparisons file answered by a simulated labeler", cmd_simulate, SimulateOptions)
    q = add("bench", "reward-learning benchmark: accuracy vs comparisons, random vs active", cmd_bench, BenchOptions)
    q.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
