"""`scoreaction quickstart`: the README's main job, the whole RLHF loop on digits (experiments/quickstart.py)."""

from __future__ import annotations

import argparse

from scoreaction.cli.common import add_run_switches, set_threads
from scoreaction.cli.options import add_config_args, add_options, assemble

HUMAN_PAIRS = 200  # about ten minutes of a person's clicking


def cmd_quickstart(args: argparse.Namespace) -> int:
    from scoreaction.experiments.quickstart import OUTPUT, QuickstartConfig, run
    from scoreaction.outputs import check_output

    set_threads(args)
    values = assemble(args)
    if values.get("human") and "pairs" not in values:
        values["pairs"] = HUMAN_PAIRS
    config = QuickstartConfig.from_dict(values, "for quickstart")
    check_output(config.out, OUTPUT, overwrite=True)  # a rerun replaces its own folder, never another one
    run(config, log=(lambda _: None) if args.quiet else (lambda line: print(line, flush=True)), progress=not args.quiet)
    print(f"open {config.out}/report.html")
    return 0


def register(sub) -> None:
    from scoreaction.experiments.quickstart import QuickstartConfig

    p = sub.add_parser("quickstart", help="the whole loop on digits: feedback, reward model, ctrl, report.html",
                       description=f"With --human you label the pairs in the web app ({HUMAN_PAIRS} pairs unless "
                                   "--pairs says otherwise).")
    add_options(p, QuickstartConfig)
    add_config_args(p)
    add_run_switches(p)
    p.set_defaults(run=cmd_quickstart)
