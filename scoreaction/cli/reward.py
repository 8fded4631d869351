"""`scoreaction reward ...`: fit, evaluate and benchmark Bradley-Terry reward models.

    reward fit       comparisons (a preference store or a comparisons file) -> a reward-model folder
    reward evaluate  a reward-model folder on comparisons: accuracy, log-likelihood, calibration
    reward simulate  a comparisons file answered by a simulated labeler (for experiments and tests)
    reward bench     accuracy vs number of comparisons, random vs active selection (docs/benchmarks)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scoreaction import __version__


def read_comparisons(args: argparse.Namespace):
    """Comparisons from --store (with --task, --labeler) or --comparisons FILE."""
    from scoreaction.rewards.preference import load_comparisons

    if args.comparisons:
        return load_comparisons(args.comparisons)
    from scoreaction.feedback.store import PreferenceStore

    return PreferenceStore(args.store).dataset(task=args.task, labeler=args.labeler)


def print_metrics(title: str, metrics: dict | None) -> None:
    if metrics is None:
        return
    print(f"{title:10s} pairs {metrics['n']:6d}  non-tied {metrics['n_non_tied']:6d}  "
          f"accuracy {metrics['accuracy']:.4f}  "
          f"log-likelihood {metrics['log_likelihood']:.4f}  ECE {metrics['ece']:.4f}")


def cmd_fit(args: argparse.Namespace) -> int:
    from scoreaction.rewards.preference import FitConfig, fit_reward_model

    torch.set_num_threads(1)  # the networks are tiny: more threads only add contention (see bench)
    comparisons = read_comparisons(args)
    options = {"ensemble": args.ensemble, "epochs": args.epochs, "val_fraction": args.val_fraction,
               "seed": args.seed, "architecture": args.arch, "min_steps": args.min_steps, "lr": args.lr}
    config = FitConfig(**{k: v for k, v in options.items() if v is not None})
    t0 = time.perf_counter()
    result = fit_reward_model(comparisons, config)
    source = {"store": args.store} if args.store else {"comparisons": args.comparisons}
    meta = {"scoreaction": __version__, "source": source, "task": args.task, "labeler": args.labeler,
            "fit_seconds": time.perf_counter() - t0, **result.summary()}
    folder = result.model.save(args.out, metadata=meta)
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

    model = load_reward_model(args.model)
    metrics = evaluate_comparisons(model, read_comparisons(args), bins=args.bins)
    if args.json:
        print(json.dumps({"model": args.model, **metrics}, indent=2))
        return 0
    print_metrics("evaluate", metrics)
    print("reliability (P(left preferred) bins): predicted vs observed")
    for row in metrics["reliability"]:
        print(f"  [{row['lo']:.2f}, {row['hi']:.2f})  n {row['count']:6d}  predicted {row['predicted']:.3f}  "
              f"observed {row['observed']:.3f}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from scoreaction.feedback.labelers import SimulatedLabeler, make_utility
    from scoreaction.feedback.selection import select_pairs
    from scoreaction.rewards.preference import save_comparisons

    if args.n < 1 or args.items < 2:
        raise ValueError(f"--n must be >= 1 and --items >= 2, found {args.n} and {args.items}")
    gen = torch.Generator().manual_seed(args.seed)
    if args.task == "digits":
        from scoreaction.experiments.feedback_bench import digit_images

        x, y = digit_images()
        pick = torch.randperm(len(x), generator=gen)[:args.items]
        items, cond = x[pick], y[pick]
    else:
        from scoreaction.tasks import make_task

        items, cond = make_task(args.task).sample_pre(args.items, generator=gen).float(), None
    labeler = SimulatedLabeler(make_utility(args.task, args.utility), temperature=args.temperature,
                               error_rate=args.error_rate, tie_margin=args.tie_margin, seed=args.seed)
    pairs = torch.tensor(select_pairs(len(items), args.n, cond=cond, generator=gen))
    comparisons = labeler.label(items[pairs[:, 0]], items[pairs[:, 1]], None if cond is None else cond[pairs[:, 0]])
    save_comparisons(args.out, comparisons, {"task": args.task, "labeler": repr(labeler)})
    ceiling = labeler.ceiling_accuracy(comparisons.left, comparisons.right, comparisons.cond)
    print(f"{len(comparisons)} comparisons of {args.task} samples {tuple(comparisons.shape)} by {labeler.name} "
          f"-> {args.out} (ties {int(comparisons.tied.sum())}, ceiling accuracy {ceiling:.4f})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from scoreaction.experiments.feedback_bench import markdown_table, run_benchmark, write

    log = None if args.quiet else (lambda line: print(line, flush=True))
    results = run_benchmark(quick=args.quick, seeds=args.seeds, workers=args.workers, log=log)
    results["command"] = "scoreaction reward bench" + (" --quick" if args.quick else "") + \
        (f" --seeds {args.seeds}" if args.seeds else "") + f" --workers {args.workers} --out {args.out}"
    paths = write(results, args.out)
    print(markdown_table(results))
    print(f"wall time {results['wall_seconds']:.0f} s, CPU time {results['cpu_seconds']:.0f} s "
          f"({args.workers} worker(s)); wrote {paths['json']} and {paths['png']}")
    return 0


def add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", metavar="DB", help="a preference store (scoreaction feedback init)")
    src.add_argument("--comparisons", metavar="FILE",
                     help="a comparisons file (.safetensors: left, right, choice[, cond])")
    p.add_argument("--task", help="with --store: only this task's comparisons")
    p.add_argument("--labeler", help="with --store: only this labeler's answers")


def register(sub) -> None:
    p = sub.add_parser("reward", help="learn Bradley-Terry reward models from pairwise comparisons")
    rsub = p.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", parser_class=type(p), required=True)

    f = rsub.add_parser("fit", help="fit a reward-model ensemble on comparisons; save it as a folder")
    add_source(f)
    f.add_argument("--out", required=True, metavar="DIR", help="reward-model folder to write")
    f.add_argument("--ensemble", type=int, help="ensemble members K (default 5)")
    f.add_argument("--epochs", type=int, help="passes over the training pairs (default 25)")
    f.add_argument("--min-steps", type=int, help="at least this many updates (default: 500 mlp, 150 cnn)")
    f.add_argument("--lr", type=float, help="learning rate (default: 1e-2 mlp, 3e-3 cnn)")
    f.add_argument("--val-fraction", type=float, help="held-out fraction of the pairs (default 0.2)")
    f.add_argument("--arch", choices=("auto", "mlp", "cnn"), help="network (default auto: cnn for images)")
    f.add_argument("--seed", type=int, help="random seed (default 0)")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(run=cmd_fit)

    e = rsub.add_parser("evaluate", help="accuracy, log-likelihood and calibration of a reward model on comparisons")
    e.add_argument("--model", required=True, metavar="DIR", help="a reward-model folder (reward fit --out)")
    add_source(e)
    e.add_argument("--bins", type=int, default=10, help="calibration bins (default 10)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(run=cmd_evaluate)

    s = rsub.add_parser("simulate", help="write a comparisons file answered by a simulated labeler")
    s.add_argument("--task", required=True, choices=("gaussian", "mixture", "digits"), help="what the items are")
    s.add_argument("--out", required=True, metavar="FILE", help="comparisons file to write (.safetensors)")
    s.add_argument("--n", type=int, default=500, help="number of comparisons (default 500)")
    s.add_argument("--items", type=int, default=1000, help="candidate items (default 1000; digits: at most 1797)")
    s.add_argument("--utility", help="hidden utility (default: the task's; see scoreaction.rewards.utilities)")
    s.add_argument("--temperature", type=float, default=0.5, help="labeler temperature (default 0.5)")
    s.add_argument("--error-rate", type=float, default=0.05, help="labeler lapse rate (default 0.05)")
    s.add_argument("--tie-margin", type=float, default=0.0, help="tie when |u_l - u_r| < this (default 0)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(run=cmd_simulate)

    b = rsub.add_parser("bench", help="reward-learning benchmark: accuracy vs comparisons, random vs active")
    b.add_argument("--out", default="docs/benchmarks", metavar="DIR", help="where to write feedback[-quick].json/.png")
    b.add_argument("--quick", action="store_true", help="a < 1 minute smoke run (writes feedback-quick.*)")
    b.add_argument("--seeds", type=int, help="number of seeds (default 3; 1 with --quick)")
    b.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    b.set_defaults(run=cmd_bench)
