"""`scoreaction pretrain --task digits|shapes`: train a task's own pretrained model from its data.

Writes a checkpoint folder (config.json + safetensors) that the task loads with
`--set task.checkpoint=DIR`. The shipped model (scoreaction/assets/digits) is this command with its
defaults: `scoreaction pretrain --task digits --out scoreaction/assets/digits --overwrite`.

`--task shapes` writes a StableDiffusionPipeline folder of the shapes world (scoreaction/shapes/pretrain.py)
for `--set task.model=DIR` of the diffusers task; its options are `--set shapes.KEY=VALUE` (or a `shapes:`
section of --config) over the defaults, or over a smoke-test setting with `--quick`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from scoreaction.cli.common import add_run_switches
from scoreaction.cli.options import add_config_args, add_options, assemble
from scoreaction.config import Options, check_choice, check_flag, check_positive_int, check_seed, check_text, option
from scoreaction.errors import ConfigError
from scoreaction.outputs import DIGITS_MODEL, check_output
from scoreaction.models.classifier import ClassifierTrainConfig
from scoreaction.shapes import pretrain as shapes_pretrain
from scoreaction.tasks import digits

PRETRAINERS = {"digits": digits.pretrain, "shapes": shapes_pretrain.pretrain}


@dataclass
class PretrainConfig(Options):
    task: str = option("digits", help="the task whose model to train: " + ", ".join(PRETRAINERS))
    steps: int = option(digits.PRETRAIN_STEPS, help="UNet training steps (the default is the shipped model's)")
    seed: int = option(0, help="random seed (0: the shipped model)")
    out: str | None = option(None, help="checkpoint folder to write (default runs/pretrain-TASK)")
    threads: int = option(1, help="torch threads (the weights are reproducible for a fixed seed AND thread count)")
    classifier_epochs: int = option(ClassifierTrainConfig.epochs, help="classifier training epochs (the default is "
                                                                       "the shipped classifier's)")
    evaluate: bool = option(True, help="sample metrics at the end (--no-evaluate skips them)")
    overwrite: bool = option(False, help="replace an existing pretrained model folder of the task at --out")
    quick: bool = option(False, help="shapes: every stage tiny and a few steps (a smoke test of seconds)")
    shapes: dict = option(help="shapes model options (ShapesPretrainConfig in scoreaction/shapes/pretrain.py), "
                               "e.g. --set shapes.unet_steps=5000", factory=dict, flag=False)

    def __post_init__(self):
        check_choice("task", self.task, PRETRAINERS)
        for name in ("steps", "threads", "classifier_epochs"):
            check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        check_flag("overwrite", self.overwrite)
        check_flag("quick", self.quick)
        check_text("out", self.out)
        self.out = self.out or f"runs/pretrain-{self.task}"
        if self.task == "shapes":
            if self.steps != digits.PRETRAIN_STEPS or self.classifier_epochs != ClassifierTrainConfig.epochs:
                raise ConfigError("--steps and --classifier-epochs are options of --task digits; for shapes set "
                                  "the stages' steps, e.g. --set shapes.unet_steps=N")
            shapes_pretrain.make_config(self.shapes, quick=self.quick)
        elif self.quick or self.shapes:
            raise ConfigError(f"--quick and shapes.* options are for --task shapes, found --task {self.task}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig.from_dict(assemble(args), "for pretrain")
    check_output(cfg.out, shapes_pretrain.SHAPES_MODEL if cfg.task == "shapes" else DIGITS_MODEL,
                 overwrite=cfg.overwrite)
    torch.set_num_threads(cfg.threads)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    if cfg.task == "shapes":
        return pretrain_shapes(cfg, log)
    manifest = PRETRAINERS[cfg.task](cfg.out, steps=cfg.steps, seed=cfg.seed, evaluate=cfg.evaluate, log=log,
                                     overwrite=cfg.overwrite,
                                     classifier_config=ClassifierTrainConfig(epochs=cfg.classifier_epochs))
    print(f"wrote {cfg.out} ({manifest['seconds']:.0f} s; use it with --set task.checkpoint={cfg.out})")
    return 0


def pretrain_shapes(cfg: PretrainConfig, log) -> int:
    options = shapes_pretrain.make_config(cfg.shapes, quick=cfg.quick)
    record = shapes_pretrain.pretrain(cfg.out, options, seed=cfg.seed, quick=cfg.quick, evaluate_model=cfg.evaluate,
                                      log=log, overwrite=cfg.overwrite)
    print(f"wrote {cfg.out} ({record['seconds']:.0f} s; use it with --set task.model={cfg.out}, its CLIP as "
          f"clip:{cfg.out}/{shapes_pretrain.CLIP_FOLDER})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="train a task's pretrained model (and its classifier) from its data")
    add_options(p, PretrainConfig)
    add_config_args(p)
    add_run_switches(p, threads=False)
    p.set_defaults(run=cmd_pretrain)
