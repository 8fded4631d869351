"""`scoreaction pretrain --task digits`: train a task's own pretrained model from its data.

Writes a checkpoint folder (config.json + safetensors) that the task loads with
`--set task.checkpoint=DIR`. The shipped model (scoreaction/assets/digits) is this command with its
defaults: `scoreaction pretrain --task digits --out scoreaction/assets/digits`.
"""

from __future__ import annotations

import argparse

from scoreaction.cli.common import set_threads
from scoreaction.models.classifier import ClassifierTrainConfig
from scoreaction.tasks import digits

PRETRAINERS = {"digits": digits.pretrain}


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.task not in PRETRAINERS:
        raise ValueError(f"pretrain: task must be one of {sorted(PRETRAINERS)}, found {args.task!r}")
    set_threads(args)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    if args.classifier_epochs < 1:
        raise ValueError(f"classifier-epochs must be a positive integer, found {args.classifier_epochs}")
    manifest = PRETRAINERS[args.task](args.out, steps=args.steps, seed=args.seed, evaluate=not args.no_eval, log=log,
                                      classifier_config=ClassifierTrainConfig(epochs=args.classifier_epochs))
    print(f"wrote {args.out} ({manifest['seconds']:.0f} s; use it with --set task.checkpoint={args.out})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="train a task's pretrained model (and its classifier) from its data")
    p.add_argument("--task", default="digits", help=f"one of {sorted(PRETRAINERS)} (default digits)")
    p.add_argument("--steps", type=int, default=digits.PRETRAIN_STEPS,
                   help=f"UNet training steps (default {digits.PRETRAIN_STEPS}, the shipped model)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0, the shipped model)")
    p.add_argument("--out", default="runs/pretrain-digits", help="checkpoint folder to write (default runs/pretrain-digits)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; the weights are reproducible for a fixed seed AND thread count)")
    p.add_argument("--classifier-epochs", type=int, default=ClassifierTrainConfig.epochs,
                   help=f"classifier training epochs (default {ClassifierTrainConfig.epochs}, the shipped classifier)")
    p.add_argument("--no-eval", action="store_true", help="skip the sample metrics at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    p.set_defaults(run=cmd_pretrain)
