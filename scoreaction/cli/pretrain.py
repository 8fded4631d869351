"""`scoreaction pretrain --task digits`: train a task's own pretrained model from its data.

Writes a checkpoint folder (config.json + safetensors) that the task loads with
`--set task.checkpoint=DIR`. The shipped model (scoreaction/assets/digits) is this command with its
defaults: `scoreaction pretrain --task digits --out scoreaction/assets/digits --overwrite`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from scoreaction.cli.common import add_run_switches
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import Options, check_choice, check_flag, check_positive_int, check_seed, option
from scoreaction.io import DIGITS_MODEL, check_output
from scoreaction.models.classifier import ClassifierTrainConfig
from scoreaction.tasks import digits

PRETRAINERS = {"digits": digits.pretrain}


@dataclass
class PretrainConfig(Options):
    task: str = option("digits", help="the task whose model to train: " + ", ".join(PRETRAINERS))
    steps: int = option(digits.PRETRAIN_STEPS, help="UNet training steps (the default is the shipped model's)")
    seed: int = option(0, help="random seed (0: the shipped model)")
    out: str = option("runs/pretrain-digits", help="checkpoint folder to write")
    threads: int = option(1, help="torch threads (the weights are reproducible for a fixed seed AND thread count)")
    classifier_epochs: int = option(ClassifierTrainConfig.epochs, help="classifier training epochs (the default is "
                                                                       "the shipped classifier's)")
    evaluate: bool = option(True, help="sample metrics at the end (--no-evaluate skips them)")
    overwrite: bool = option(False, help="replace an existing pretrained digits model folder at --out")

    def __post_init__(self):
        check_choice("task", self.task, PRETRAINERS)
        for name in ("steps", "threads", "classifier_epochs"):
            check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        check_flag("overwrite", self.overwrite)


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig.from_dict(assemble(args), "for pretrain")
    check_output(cfg.out, DIGITS_MODEL, overwrite=cfg.overwrite)
    torch.set_num_threads(cfg.threads)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    manifest = PRETRAINERS[cfg.task](cfg.out, steps=cfg.steps, seed=cfg.seed, evaluate=cfg.evaluate, log=log,
                                     overwrite=cfg.overwrite,
                                     classifier_config=ClassifierTrainConfig(epochs=cfg.classifier_epochs))
    print(f"wrote {cfg.out} ({manifest['seconds']:.0f} s; use it with --set task.checkpoint={cfg.out})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="train a task's pretrained model (and its classifier) from its data")
    add_options(p, PretrainConfig)
    add_config_args(p)
    add_run_switches(p, threads=False)
    p.set_defaults(run=cmd_pretrain)
