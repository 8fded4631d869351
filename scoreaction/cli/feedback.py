"""`scoreaction feedback ...`: the preference store, its labelers and the labeling web app.

    init          create an empty store (no other command creates one unless given --create)
    add-labeler   register a labeler; prints the token (only its hash is stored) on stdout
    add-items     sample a checkpoint's policy (or a task's pretrained model) into the store
    enqueue       queue pairs for the labelers (random, or where a reward ensemble disagrees)
    simulate      let a simulated Bradley-Terry labeler answer pairs
    serve         the labeling web app (127.0.0.1 by default)
    export/import JSON lines, arrays inline; importing twice adds nothing
    stats         what the store holds
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path

import torch

from scoreaction.feedback.server import listen, url_of
from scoreaction.feedback.store import PreferenceStore

DEFAULT_PORT = 8765


def open_store(args: argparse.Namespace) -> PreferenceStore:
    return PreferenceStore(args.store, create=getattr(args, "create", False))


def positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, found {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, found {value}")
        return value
    return parse


# --- store and labelers ----------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    if Path(args.store).exists():
        raise ValueError(f"{args.store!r} already exists; `init` creates a new store only")
    store = PreferenceStore(args.store, create=True)
    print(f"created preference store {store.path}")
    return 0


def cmd_add_labeler(args: argparse.Namespace) -> int:
    store = open_store(args)
    token = store.add_labeler(args.name, replace=args.replace)
    print(token)
    sys.stderr.write(f"labeler {args.name!r}: give them this token once (it is not stored); with "
                     f"`scoreaction feedback serve --store {args.store}` running they open "
                     f"http://127.0.0.1:{DEFAULT_PORT}/?token={token}\n")
    return 0


# --- items -----------------------------------------------------------------------------------------
def sample_items(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None, str, str]:
    """(samples (n, *shape), class labels or None, task name, model label)."""
    from scoreaction.evaluation import sample_with

    if args.checkpoint:
        from scoreaction.train.checkpoint import resolve
        from scoreaction.train.loop import Trainer

        trainer = Trainer.from_checkpoint(args.checkpoint, progress=False)
        policy, task, dtype = trainer.policy, trainer.task, trainer.dtype
        model = args.model or f"checkpoint:{resolve(args.checkpoint)}"
        pretrained = False
    else:
        from scoreaction.tasks import make_task

        policy, task, dtype = None, make_task(args.task), torch.float32
        model = args.model or f"pretrained:{task.name}"
        pretrained = True
    x, _ = sample_with(policy, task, args.solver, args.steps, args.n, args.seed, pretrained=pretrained, dtype=dtype)
    cond = None
    if hasattr(task, "sample_conditions"):  # the labels sample_with drew: the first draw of the same generator
        cond = task.sample_conditions(args.n, generator=torch.Generator().manual_seed(args.seed))
    return x.float(), cond, task.name, model


def cmd_add_items(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.task):
        raise ValueError("give either --checkpoint DIR or --task NAME --pretrained")
    if args.task and not args.pretrained:
        raise ValueError("--task samples the task's pretrained model: add --pretrained (or use --checkpoint DIR)")
    store = open_store(args)
    x, cond, task_name, model = sample_items(args)
    conditions = None if cond is None else [int(c) for c in cond]
    ids = store.add_items(x, task=task_name, conditions=conditions, model=model)
    print(f"added {len(set(ids))} items of task {task_name!r} from {model} (ids {min(ids)}..{max(ids)}) to {store.path}")
    return 0


def task_items(store: PreferenceStore, task: str | None) -> tuple[str, list[int], torch.Tensor, list]:
    """(task, item ids, samples (n, *shape) float32, conditions) of one task of the store."""
    tasks = store.tasks()
    if not tasks:
        raise ValueError(f"preference store {str(store.path)!r} holds no items (add some with `feedback add-items`)")
    if task is None:
        if len(tasks) > 1:
            raise ValueError(f"the store holds several tasks {tasks}; choose one with --task")
        task = tasks[0]
    elif task not in tasks:
        raise ValueError(f"the store holds no items of task {task!r}; it holds {tasks}")
    items = store.items(task=task)
    shapes = sorted({m["shape"] for m in items})
    if len(shapes) > 1:
        raise ValueError(f"the items of task {task!r} have different shapes {shapes}")
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
        raise ValueError("a simulated labeler needs class-label conditions (int); this task has text prompts")
    return torch.tensor(conditions, dtype=torch.long)


def choose_pairs(args, ids: list[int], x: torch.Tensor, conditions: list, exclude=()) -> list[tuple[int, int]]:
    """args.pairs pairs of item ids by args.strategy (select_pairs on item indices)."""
    from scoreaction.feedback.selection import select_pairs

    model = None
    if args.strategy == "disagreement":
        if not args.reward_model:
            raise ValueError("--strategy disagreement needs --reward-model DIR (a fitted reward ensemble)")
        from scoreaction.rewards.preference import load_reward_model

        model = load_reward_model(args.reward_model)
    elif args.reward_model:
        raise ValueError("--reward-model is used only with --strategy disagreement")
    position = {item_id: k for k, item_id in enumerate(ids)}
    excluded = [(position[a], position[b]) for a, b in exclude if a in position and b in position]
    # pairs stay within a condition: select_pairs groups by cond (the class labels when a model scores them)
    cond = class_labels(conditions) if model is not None else condition_groups(conditions)
    pairs = select_pairs(len(ids), args.pairs, strategy=args.strategy, items=x, cond=cond, model=model,
                         generator=torch.Generator().manual_seed(args.seed), exclude=excluded)
    return [(ids[i], ids[j]) for i, j in pairs]


def cmd_enqueue(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.clear:
        print(f"removed {store.clear_queue()} queued pairs")
    task, ids, x, conditions = task_items(store, args.task)
    pairs = choose_pairs(args, ids, x, conditions, exclude=store.queue())
    added = store.enqueue_pairs(pairs)
    print(f"queued {added} pairs of task {task!r} ({args.strategy}); the queue holds {len(store.queue())}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from scoreaction.feedback.labelers import SimulatedLabeler
    from scoreaction.rewards.utilities import make_utility

    store = open_store(args)
    task, ids, x, conditions = task_items(store, args.task)
    labeler = SimulatedLabeler(make_utility(task, args.utility), temperature=args.temperature,
                               error_rate=args.error_rate, tie_margin=args.tie_margin, seed=args.seed, name=args.labeler)
    answered = [(c["left"], c["right"]) for c in store.comparisons(labeler=args.labeler)]
    pairs = choose_pairs(args, ids, x, conditions, exclude=answered)
    position = {item_id: k for k, item_id in enumerate(ids)}
    left = torch.stack([x[position[a]] for a, _ in pairs])
    right = torch.stack([x[position[b]] for _, b in pairs])
    labels = class_labels(conditions)
    cond = None if labels is None else torch.stack([labels[position[a]] for a, _ in pairs])
    choices = labeler.choose(left, right, cond)
    store.add_comparisons([{"left": a, "right": b, "choice": c, "labeler": args.labeler}
                           for (a, b), c in zip(pairs, choices)])
    counts = {c: choices.count(c) for c in ("left", "right", "tie")}
    print(f"{args.labeler}: {len(choices)} answers on task {task!r} ({args.strategy} pairs) "
          f"left {counts['left']}, right {counts['right']}, tie {counts['tie']}")
    return 0


# --- exchange, summary, the app ----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    counts = open_store(args).export_jsonl(args.out)
    print(f"wrote {counts['items']} items, {counts['comparisons']} comparisons, {counts['queue']} queued pairs "
          f"to {args.out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    counts = open_store(args).import_jsonl(args.input)
    print(f"imported {counts['items_added']} new items ({counts['items_existing']} already stored), "
          f"{counts['comparisons_added']} new comparisons ({counts['comparisons_existing']} already stored), "
          f"{counts['queue_added']} queued pairs")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    stats = open_store(args).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"store      {stats['store']}")
    if not stats["items"]:
        print("items      none")
    for k, row in enumerate(stats["items"]):
        print(f"{'items' if k == 0 else '':10s} {row['items']:6d}  task {row['task']}  model {row['model'] or '-'}")
    print(f"queue      {stats['queued']} pairs")
    print(f"labelers   {', '.join(stats['labelers']) or 'none'} (with tokens)")
    if not stats["comparisons"]:
        print("answers    none")
        return 0
    print(f"answers    {'labeler':24s} {'total':>6s} {'left':>6s} {'right':>6s} {'tie':>6s} {'skip':>6s} {'mean ms':>8s}")
    for name, row in stats["comparisons"].items():
        ms = row.get("mean_response_ms")
        print(f"{'':10s} {name:24s} {row['answers']:6d} {row['left']:6d} {row['right']:6d} {row['tie']:6d} "
              f"{row['skip']:6d} {'-' if ms is None else f'{ms:.0f}':>8s}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from scoreaction.feedback.app import create_app

    store = open_store(args)
    app = create_app(store, question=args.question)
    sock = listen(args.host, args.port)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        sys.stderr.write("scoreaction: warning: serving beyond this machine over plain HTTP; tokens travel in clear "
                         "(put a TLS proxy in front)\n")
    url = url_of(sock)
    print(f"labeling app for {store.path} at {url}  (labelers open {url}?token=THEIR_TOKEN; Ctrl-C stops)", flush=True)
    # no access log: it would show the page's ?token=... to anyone reading the log
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


def register(sub) -> None:
    p = sub.add_parser("feedback", help="preference store, labelers and the labeling web app")
    fsub = p.add_subparsers(dest="feedback_command", metavar="ACTION", parser_class=type(p), required=True)

    def add(name: str, help: str, run, create: bool = False) -> argparse.ArgumentParser:
        q = fsub.add_parser(name, help=help, description=help)
        q.add_argument("--store", required=True, metavar="FILE", help="the preference store (an SQLite file)")
        if create:
            q.add_argument("--create", action="store_true", help="create the store if it does not exist")
        q.set_defaults(run=run)
        return q

    add("init", "create an empty preference store", cmd_init)

    q = add("add-labeler", "register a labeler and print their token", cmd_add_labeler, create=True)
    q.add_argument("name", metavar="NAME", help="labeler name (letters, digits, _.@+-)")
    q.add_argument("--replace", action="store_true", help="issue a new token for an existing labeler (voids the old)")

    q = add("add-items", "sample a checkpoint's policy or a task's pretrained model into the store", cmd_add_items,
            create=True)
    q.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder or a run folder (its latest checkpoint)")
    q.add_argument("--task", help="a built-in task (with --pretrained)")
    q.add_argument("--pretrained", action="store_true", help="sample the task's pretrained model")
    q.add_argument("--n", type=positive("--n"), required=True, help="number of samples")
    q.add_argument("--solver", default="em", help="solver (default em)")
    q.add_argument("--steps", type=positive("--steps"), default=100, help="solver steps (default 100)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--model", help="label stored with the items (default checkpoint:PATH or pretrained:TASK)")

    def pair_options(q):
        q.add_argument("--pairs", type=positive("--pairs"), required=True, help="number of pairs")
        q.add_argument("--strategy", choices=("random", "disagreement"), default="random",
                       help="random pairs, or where a reward ensemble disagrees most (needs --reward-model)")
        q.add_argument("--reward-model", metavar="DIR", help="a fitted reward ensemble's folder (BTRewardModel.save)")
        q.add_argument("--task", help="which task's items (default: the store's only task)")
        q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    q = add("enqueue", "queue pairs for the labelers of the web app", cmd_enqueue)
    pair_options(q)
    q.add_argument("--clear", action="store_true", help="empty the queue first")

    q = add("simulate", "answer pairs with a simulated Bradley-Terry labeler", cmd_simulate)
    q.add_argument("--labeler", required=True, metavar="NAME", help="labeler id written with the answers")
    q.add_argument("--utility", help="hidden utility (default: the task's default)")
    q.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry temperature (default 1)")
    q.add_argument("--error-rate", type=float, default=0.0, help="probability of a coin-flip answer (default 0)")
    q.add_argument("--tie-margin", type=float, default=0.0, help="|du| below which the answer is a tie (default 0)")
    pair_options(q)

    q = add("export", "write the store as JSON lines (arrays inline)", cmd_export)
    q.add_argument("--out", required=True, metavar="FILE", help="output .jsonl file")

    q = add("import", "read JSON lines written by export (idempotent)", cmd_import, create=True)
    q.add_argument("--in", dest="input", required=True, metavar="FILE", help="input .jsonl file")

    q = add("serve", "run the labeling web app", cmd_serve)
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    q.add_argument("--question", default="Which sample do you prefer?", help="the question shown above each pair")

    q = add("stats", "what the store holds", cmd_stats)
    q.add_argument("--json", action="store_true", help="print JSON")
