"""`scoreaction feedback ...`: the preference store, its labelers and the labeling web app.

    init          create an empty store (no other command creates one unless given --create)
    add-labeler   register a labeler; prints the token (only its hash is stored) on stdout
    add-items     sample a checkpoint's policy (or a task's pretrained model) into the store
    enqueue       queue pairs for the labelers (random, or where a reward ensemble disagrees)
    simulate      let a simulated Bradley-Terry labeler answer pairs
    serve         the labeling web app (127.0.0.1 by default)
    export/import JSON lines, arrays inline; importing twice adds nothing
    backup        a consistent copy of the store (SQLite's online backup), also while `serve` runs
    stats         what the store holds
Every action closes the store when it ends, on an error too, so that a store at rest is one file.

Each action's options are one dataclass below; its flags are derived from the fields (cli/options.py),
and every action also takes `--config FILE` and `--set key=value` (the keys are the field names, e.g.
`--set error_rate=0.1`; `feedback import --in FILE` is the key `input`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from scoreaction.cli.options import add_config_args, add_options, assemble, checkpoint_overrides, flag_dest
from scoreaction.config import (
    Options,
    check_choice,
    check_flag,
    check_nonnegative,
    check_positive_int,
    check_range,
    check_samples,
    check_seed,
    check_steps,
    check_text,
    option,
    require,
)
from scoreaction.errors import ConfigError, OutputError, ScoreactionError
from scoreaction.feedback.store import PreferenceStore
from scoreaction.outputs import STORE, STORE_EXPORT, Output, check_output

DEFAULT_PORT = 8765
STRATEGIES = ("random", "disagreement")


# --- validation helpers shared with cli/reward.py ----------------------------------------------------
def check_labeler(opts) -> None:
    """The simulated labeler's options (utility, temperature, error_rate, tie_margin) of `opts`."""
    check_text("utility", opts.utility)
    check_nonnegative("temperature", opts.temperature)
    check_range("error_rate", opts.error_rate, 0, 1)
    check_nonnegative("tie_margin", opts.tie_margin)


def help_of(cls, name: str) -> str:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]


# --- the options of each action ------------------------------------------------------------------------
@dataclass
class StoreOptions(Options):
    """init, stats, and the base of every action: which store."""

    store: str | None = option(None, help="the preference store (an SQLite file); required")

    def __post_init__(self):
        require("--store", self.store)
        check_text("store", self.store)

    def open(self) -> PreferenceStore:
        return PreferenceStore(self.store)


@dataclass
class NewStoreOptions(StoreOptions):
    """Actions that may create the store they write to."""

    create: bool = option(False, help="create the store if it does not exist")

    def __post_init__(self):
        super().__post_init__()
        check_flag("create", self.create)

    def open(self) -> PreferenceStore:
        return PreferenceStore(self.store, create=self.create)


@dataclass
class AddLabelerOptions(NewStoreOptions):
    name: str | None = option(None, flag=False, help="labeler name (letters, digits, _.@+-)")
    replace: bool = option(False, help="issue a new token for an existing labeler (voids the old)")

    def __post_init__(self):
        super().__post_init__()
        require("NAME", self.name)
        check_text("name", self.name)
        check_flag("replace", self.replace)


@dataclass
class AddItemsOptions(NewStoreOptions):
    checkpoint: str | None = option(None, help="a checkpoint folder or a run folder (its latest checkpoint)")
    task: str | None = option(None, help="a built-in task (with --pretrained)")
    pretrained: bool = option(False, help="sample the task's pretrained model")
    n: int | None = option(None, help="number of samples; required")
    solver: str = option("em", help="solver")
    steps: int = option(100, help="solver steps")
    seed: int = option(0, help="random seed")
    model: str | None = option(None, help="label stored with the items (default checkpoint:PATH or pretrained:TASK)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("checkpoint", "task", "solver", "model"):
            check_text(name, getattr(self, name))
        check_flag("pretrained", self.pretrained)
        require("--n", self.n)
        check_positive_int("n", self.n)
        check_samples("n", self.n, ())
        check_positive_int("steps", self.steps)
        check_steps("steps", self.steps)
        check_seed("seed", self.seed)
        if bool(self.checkpoint) == bool(self.task):
            raise ConfigError("give either --checkpoint DIR or --task NAME --pretrained")
        if self.task and not self.pretrained:
            raise ConfigError("--task samples the task's pretrained model: add --pretrained (or use --checkpoint DIR)")


@dataclass
class PairOptions(StoreOptions):
    """Which pairs to ask: enqueue and simulate."""

    pairs: int | None = option(None, help="number of pairs; required")
    strategy: str = option("random", help="random pairs, or disagreement: where a reward ensemble disagrees most "
                                          "(needs --reward-model)")
    reward_model: str | None = option(None, help="a fitted reward ensemble's folder (BTRewardModel.save)")
    task: str | None = option(None, help="which task's items (default: the store's only task)")
    seed: int = option(0, help="random seed")

    def __post_init__(self):
        super().__post_init__()
        require("--pairs", self.pairs)
        check_positive_int("pairs", self.pairs)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_text("reward_model", self.reward_model)
        check_text("task", self.task)
        check_seed("seed", self.seed)
        if self.strategy == "disagreement" and not self.reward_model:
            raise ConfigError("--strategy disagreement needs --reward-model DIR (a fitted reward ensemble)")
        if self.strategy != "disagreement" and self.reward_model:
            raise ConfigError("--reward-model is used only with --strategy disagreement")


@dataclass
class EnqueueOptions(PairOptions):
    clear: bool = option(False, help="empty the queue first")

    def __post_init__(self):
        super().__post_init__()
        check_flag("clear", self.clear)


@dataclass
class SimulateOptions(PairOptions):
    labeler: str | None = option(None, help="labeler id written with the answers; required")
    utility: str | None = option(None, help="hidden utility (default: the task's default)")
    temperature: float = option(1.0, help="Bradley-Terry temperature")
    error_rate: float = option(0.0, help="probability of a coin-flip answer")
    tie_margin: float = option(0.0, help="|du| below which the answer is a tie")

    def __post_init__(self):
        super().__post_init__()
        require("--labeler", self.labeler)
        check_text("labeler", self.labeler)
        check_labeler(self)


@dataclass
class ExportOptions(StoreOptions):
    out: str | None = option(None, help="output .jsonl file; required")
    overwrite: bool = option(False, help="replace an existing export of a store (JSON lines) at --out")
    output: ClassVar[Output] = STORE_EXPORT

    def __post_init__(self):
        super().__post_init__()
        require("--out", self.out)
        check_text("out", self.out)
        check_flag("overwrite", self.overwrite)
        check_output(self.out, self.output, overwrite=self.overwrite, inputs=(self.store,))


@dataclass
class BackupOptions(ExportOptions):
    out: str | None = option(None, help="the copy, a new file; required")
    overwrite: bool = option(False, help="replace an existing preference store at --out (one not in use)")
    output: ClassVar[Output] = STORE


@dataclass
class ImportOptions(NewStoreOptions):
    input: str | None = option(None, help="input .jsonl file written by export; required")

    def __post_init__(self):
        super().__post_init__()
        require("--in", self.input)
        check_text("input", self.input)


def read_options(args: argparse.Namespace, cls):
    """The action's options: defaults < --config < flags < --set, validated by `cls`."""
    return cls.from_dict(assemble(args), f"for feedback {args.feedback_command}")


# --- store and labelers ----------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    opts = read_options(args, StoreOptions)
    if Path(opts.store).exists():
        raise OutputError(f"{opts.store!r} already exists; `init` creates a new store only")
    with PreferenceStore(opts.store, create=True) as store:
        print(f"created preference store {store.path}")
    return 0


def cmd_add_labeler(args: argparse.Namespace) -> int:
    opts = read_options(args, AddLabelerOptions)
    with opts.open() as store:
        token = store.add_labeler(opts.name, replace=opts.replace)
    print(token)
    sys.stderr.write(f"labeler {opts.name!r}: give them this token once (it is not stored); with "
                     f"`scoreaction feedback serve --store {opts.store}` running they open "
                     f"http://127.0.0.1:{DEFAULT_PORT}/?token={token}\n")
    return 0


# --- items -----------------------------------------------------------------------------------------
def sample_items(opts: AddItemsOptions,
                 overrides: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str, str]:
    """(samples (n, *shape), class labels or None, task name, model label); `overrides` of the checkpoint's run
    (cli.options.checkpoint_overrides)."""
    from scoreaction.evaluation import sample_with

    if opts.checkpoint:
        from scoreaction.train.checkpoint import resolve
        from scoreaction.train.loop import Trainer

        trainer = Trainer.from_checkpoint(opts.checkpoint, overrides, progress=False)
        policy, task, dtype = trainer.policy, trainer.task, trainer.dtype
        model = opts.model or f"checkpoint:{resolve(opts.checkpoint)}"
        pretrained = False
    else:
        from scoreaction.tasks import make_task

        policy, task, dtype = None, make_task(opts.task), torch.float32
        model = opts.model or f"pretrained:{task.name}"
        pretrained = True
    check_samples("n", opts.n, task.shape, torch.finfo(dtype).bits // 8, copies=3)
    x, _ = sample_with(policy, task, opts.solver, opts.steps, opts.n, opts.seed, pretrained=pretrained, dtype=dtype)
    # the conditions sample_with drew: the first draw of the same generator (None for unconditional tasks)
    cond = task.sample_conditions(opts.n, generator=torch.Generator().manual_seed(opts.seed))
    return task.observe(x).float(), cond, task.name, model


def cmd_add_items(args: argparse.Namespace) -> int:
    values = assemble(args)
    task = values.pop("task") if isinstance(values.get("task"), dict) else {}  # --set task.reward=SPEC
    overrides = checkpoint_overrides(task, "feedback add-items --checkpoint")
    opts = AddItemsOptions.from_dict(values, f"for feedback {args.feedback_command}")
    with opts.open() as store:
        x, cond, task_name, model = sample_items(opts, overrides)
        conditions = None if cond is None else [int(c) for c in cond]
        ids = store.add_items(x, task=task_name, conditions=conditions, model=model)
    print(f"added {len(set(ids))} items of task {task_name!r} from {model} (ids {min(ids)}..{max(ids)}) "
          f"to {store.path}")
    return 0


def task_items(store: PreferenceStore, task: str | None) -> tuple[str, list[int], torch.Tensor, list]:
    """(task, item ids, samples (n, *shape) float32, conditions) of one task of the store."""
    tasks = store.tasks()
    if not tasks:
        raise ScoreactionError(f"preference store {str(store.path)!r} holds no items "
                               f"(add some with `feedback add-items`)")
    if task is None:
        if len(tasks) > 1:
            raise ScoreactionError(f"the store holds several tasks {tasks}; choose one with --task")
        task = tasks[0]
    elif task not in tasks:
        raise ScoreactionError(f"the store holds no items of task {task!r}; it holds {tasks}")
    items = store.items(task=task)
    shapes = sorted({m["shape"] for m in items})
    if len(shapes) > 1:
        raise ScoreactionError(f"the items of task {task!r} have different shapes {shapes}")
    arrays = store.item_arrays([m["id"] for m in items])
    x = torch.stack([torch.as_tensor(a).float() for a in arrays])
    return task, [m["id"] for m in items], x, [m["condition"] for m in items]


def condition_groups(conditions: list) -> torch.Tensor | None:
    """Conditions as group labels for pairing (items are paired within a condition only)."""
    if all(c is None for c in conditions):
        return None
    index = {c: k for k, c in enumerate(sorted({json.dumps(c) for c in conditions}))}
    return torch.tensor([index[json.dumps(c)] for c in conditions])


def class_labels(conditions: list) -> torch.Tensor | None:
    if all(c is None for c in conditions):
        return None
    if not all(isinstance(c, int) for c in conditions):
        raise ScoreactionError("a simulated labeler needs class-label conditions (int); this task has text prompts")
    return torch.tensor(conditions, dtype=torch.long)


def choose_pairs(opts: PairOptions, ids: list[int], x: torch.Tensor, conditions: list,
                 exclude=()) -> list[tuple[int, int]]:
    """opts.pairs pairs of item ids by opts.strategy (select_pairs on item indices)."""
    from scoreaction.feedback.selection import select_pairs

    model = None
    if opts.strategy == "disagreement":
        from scoreaction.rewards.preference import load_reward_model

        model = load_reward_model(opts.reward_model)
    position = {item_id: k for k, item_id in enumerate(ids)}
    excluded = [(position[a], position[b]) for a, b in exclude if a in position and b in position]
    # pairs stay within a condition: select_pairs groups by cond (the class labels when a model scores them)
    cond = class_labels(conditions) if model is not None else condition_groups(conditions)
    pairs = select_pairs(len(ids), opts.pairs, strategy=opts.strategy, items=x, cond=cond, model=model,
                         generator=torch.Generator().manual_seed(opts.seed), exclude=excluded)
    return [(ids[i], ids[j]) for i, j in pairs]


def cmd_enqueue(args: argparse.Namespace) -> int:
    opts = read_options(args, EnqueueOptions)
    with opts.open() as store:
        if opts.clear:
            print(f"removed {store.clear_queue()} queued pairs")
        task, ids, x, conditions = task_items(store, opts.task)
        added = store.enqueue_pairs(choose_pairs(opts, ids, x, conditions, exclude=store.queue()))
        print(f"queued {added} pairs of task {task!r} ({opts.strategy}); the queue holds {len(store.queue())}")
    return 0


def simulated_answers(store: PreferenceStore, opts: SimulateOptions) -> tuple[str, list[dict]]:
    """(task, comparison rows): the simulated labeler's answers to new pairs of the task's items."""
    from scoreaction.feedback.labelers import SimulatedLabeler
    from scoreaction.rewards.utilities import make_utility

    task, ids, x, conditions = task_items(store, opts.task)
    labeler = SimulatedLabeler(make_utility(task, opts.utility), temperature=opts.temperature,
                               error_rate=opts.error_rate, tie_margin=opts.tie_margin, seed=opts.seed,
                               name=opts.labeler)
    answered = [(c["left"], c["right"]) for c in store.comparisons(labeler=opts.labeler)]
    pairs = choose_pairs(opts, ids, x, conditions, exclude=answered)
    position = {item_id: k for k, item_id in enumerate(ids)}
    left = torch.stack([x[position[a]] for a, _ in pairs])
    right = torch.stack([x[position[b]] for _, b in pairs])
    labels = class_labels(conditions)
    cond = None if labels is None else torch.stack([labels[position[a]] for a, _ in pairs])
    choices = labeler.choose(left, right, cond)
    return task, [{"left": a, "right": b, "choice": c, "labeler": opts.labeler} for (a, b), c in zip(pairs, choices)]


def cmd_simulate(args: argparse.Namespace) -> int:
    opts = read_options(args, SimulateOptions)
    with opts.open() as store:
        task, rows = simulated_answers(store, opts)
        # pairs this labeler answered meanwhile (another process) are left out, in the same write transaction
        ids = store.add_comparisons(rows, skip_answered=True)
    added = [row for row, i in zip(rows, ids) if i is not None]
    counts = {c: sum(row["choice"] == c for row in added) for c in ("left", "right", "tie")}
    skipped = len(rows) - len(added)
    print(f"{opts.labeler}: {len(added)} answers on task {task!r} ({opts.strategy} pairs) "
          f"left {counts['left']}, right {counts['right']}, tie {counts['tie']}"
          + (f"; {skipped} pairs skipped (answered meanwhile by another process)" if skipped else ""))
    return 0


# --- exchange, summary, the app ----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    opts = read_options(args, ExportOptions)
    with opts.open() as store:
        counts = store.export_jsonl(opts.out)
    print(f"wrote {counts['items']} items, {counts['comparisons']} comparisons, {counts['queue']} queued pairs "
          f"to {opts.out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    opts = read_options(args, ImportOptions)
    with opts.open() as store:
        counts = store.import_jsonl(opts.input)
    print(f"imported {counts['items_added']} new items ({counts['items_existing']} already stored), "
          f"{counts['comparisons_added']} new comparisons ({counts['comparisons_existing']} already stored), "
          f"{counts['queue_added']} queued pairs")
    return 0


def print_stats(stats: dict) -> None:
    print(f"store      {stats['store']}")
    if not stats["items"]:
        print("items      none")
    for k, row in enumerate(stats["items"]):
        print(f"{'items' if k == 0 else '':10s} {row['items']:6d}  task {row['task']}  model {row['model'] or '-'}")
    print(f"queue      {stats['queued']} pairs")
    print(f"labelers   {', '.join(stats['labelers']) or 'none'} (with tokens)")
    if not stats["comparisons"]:
        print("answers    none")
        return
    print(f"answers    {'labeler':24s} {'total':>6s} {'left':>6s} {'right':>6s} {'tie':>6s} {'skip':>6s} {'mean ms':>8s}")
    for name, row in stats["comparisons"].items():
        ms = row.get("mean_response_ms")
        print(f"{'':10s} {name:24s} {row['answers']:6d} {row['left']:6d} {row['right']:6d} {row['tie']:6d} "
              f"{row['skip']:6d} {'-' if ms is None else f'{ms:.0f}':>8s}")


def cmd_backup(args: argparse.Namespace) -> int:
    opts = read_options(args, BackupOptions)
    with opts.open() as store:
        counts = store.backup(opts.out, overwrite=opts.overwrite)
    print(f"copied {store.path} to {opts.out} (integrity ok): {counts['items']} items, {counts['comparisons']} "
          f"comparisons, {counts['queue']} queued pairs, {counts['labelers']} labelers")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with read_options(args, StoreOptions).open() as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_stats(stats)
    return 0


def register(sub) -> None:
    p = sub.add_parser("feedback", help="preference store, labelers and the labeling web app")
    fsub = p.add_subparsers(dest="feedback_command", metavar="ACTION", parser_class=type(p), required=True)

    def add(name: str, help: str, run, cls, skip=()) -> argparse.ArgumentParser:
        q = fsub.add_parser(name, help=help, description=help)
        add_options(q, cls, skip=skip)
        add_config_args(q)
        q.set_defaults(run=run)
        return q

    add("init", "create an empty preference store", cmd_init, StoreOptions)
    q = add("add-labeler", "register a labeler and print their token", cmd_add_labeler, AddLabelerOptions)
    q.add_argument(flag_dest("name"), nargs="?", metavar="NAME", help=help_of(AddLabelerOptions, "name"))
    add("add-items", "sample a checkpoint's policy or a task's pretrained model into the store", cmd_add_items,
        AddItemsOptions)
    add("enqueue", "queue pairs for the labelers of the web app", cmd_enqueue, EnqueueOptions)
    add("simulate", "answer pairs with a simulated Bradley-Terry labeler", cmd_simulate, SimulateOptions)
    add("export", "write the store as JSON lines (arrays inline)", cmd_export, ExportOptions)
    q = add("import", "read JSON lines written by export (idempotent)", cmd_import, ImportOptions, skip=("input",))
    q.add_argument("--in", dest=flag_dest("input"), metavar="FILE", help=help_of(ImportOptions, "input"))
    from scoreaction.cli.feedback_serve import ServeOptions, cmd_serve

    add("serve", "run the labeling web app", cmd_serve, ServeOptions)
    add("backup", "copy the store into a new file, consistently, also while the app serves it", cmd_backup,
        BackupOptions)
    q = add("stats", "what the store holds", cmd_stats, StoreOptions)
    q.add_argument("--json", action="store_true", help="print JSON")
