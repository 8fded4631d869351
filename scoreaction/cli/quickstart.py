"""`scoreaction quickstart`: the README's main job, the whole RLHF loop on digits (scoreaction/quickstart.py)."""

from __future__ import annotations

import argparse
import dataclasses

from scoreaction.cli.common import add_threads_arg, set_threads
from scoreaction.config import apply_overrides


def cmd_quickstart(args: argparse.Namespace) -> int:
    from scoreaction.experiments.quickstart import QuickstartConfig, run

    set_threads(args)
    flags = {"out": args.out, "seed": args.seed, "pairs": args.pairs, "updates": args.updates,
             "human": True if args.human else None, "port": args.port}
    values = apply_overrides({k: v for k, v in flags.items() if v is not None}, args.overrides)
    if args.human and args.pairs is None and "pairs" not in values:
        values["pairs"] = HUMAN_PAIRS
    config = QuickstartConfig.from_dict(values, "for quickstart")
    run(config, log=(lambda _: None) if args.quiet else (lambda line: print(line, flush=True)), progress=not args.quiet)
    print(f"open {config.out}/report.html")
    return 0


HUMAN_PAIRS = 200  # about ten minutes of a person's clicking


def register(sub) -> None:
    from scoreaction.experiments.quickstart import QuickstartConfig

    defaults = {f.name: f.default for f in dataclasses.fields(QuickstartConfig) if f.default is not dataclasses.MISSING}
    p = sub.add_parser("quickstart", help="the whole loop on digits: feedback, reward model, ctrl, report.html")
    p.add_argument("--out", help=f"run folder (default {defaults['out']})")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--pairs", type=int, help=f"comparisons to collect (default {defaults['pairs']}; "
                                             f"{HUMAN_PAIRS} with --human)")
    p.add_argument("--updates", type=int, help=f"ctrl updates (default {defaults['updates']})")
    p.add_argument("--human", action="store_true", help="you label the pairs in the web app instead of the simulated "
                                                        "labeler")
    p.add_argument("--port", type=int, help=f"port of the web app with --human (default {defaults['port']})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any QuickstartConfig option, e.g. --set beta_kl=1.0 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    add_threads_arg(p)
    p.set_defaults(run=cmd_quickstart)
