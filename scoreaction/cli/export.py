"""`scoreaction export`: a fine-tuned diffusers run as a LoRA that stock diffusers loads, or as merged weights.

    scoreaction export --checkpoint runs/sd15 --out lora/            # pipe.load_lora_weights("lora/")
    scoreaction export --checkpoint runs/sd15 --out sd15-tuned/ --merged   # DiffusionPipeline.from_pretrained(...)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from scoreaction.cli.common import add_run_switches, set_threads
from scoreaction.cli.options import add_config_args, add_options, assemble, checkpoint_overrides, section
from scoreaction.config import Options, check_flag, option
from scoreaction.io import atomic_folder
from scoreaction.outputs import EXPORTED_PIPELINE, check_output
from scoreaction.models.pipeline import save_lora, save_merged
from scoreaction.models.pipeline_load import model_folder


@dataclass
class ExportConfig(Options):
    checkpoint: str | None = option(None, help="a fine-tuned diffusers run (or one of its checkpoints); required")
    out: str | None = option(None, help="a new folder to write; required")
    overwrite: bool = option(False, help="replace an existing folder that export wrote (a LoRA or a pipeline)")
    merged: bool = option(False, help="write the whole pipeline with the fine-tuned weights merged into the denoiser "
                                      "(default: the LoRA alone, in diffusers' format)")

    def __post_init__(self):
        for name in ("checkpoint", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        check_flag("overwrite", self.overwrite)
        check_output(self.out, EXPORTED_PIPELINE, overwrite=self.overwrite, inputs=(self.checkpoint,))


def cmd_export(args: argparse.Namespace) -> int:
    from scoreaction.train import Trainer

    set_threads(args)
    values = assemble(args)
    overrides = checkpoint_overrides(section(values, "task"), "export")
    cfg = ExportConfig.from_dict({k: v for k, v in values.items() if k != "task"}, "for export")
    trainer = Trainer.from_checkpoint(cfg.checkpoint, {"device": "cpu", "tensorboard": False, **overrides},
                                      progress=False)
    task = trainer.task
    if task.name != "diffusers":
        raise ValueError(f"export writes diffusers weights: the run's task must be 'diffusers', found {task.name!r}")
    check_output(cfg.out, EXPORTED_PIPELINE, overwrite=cfg.overwrite, inputs=(cfg.checkpoint, str(model_folder(task.config.model))))
    if not cfg.merged and task.config.lora_rank == 0:
        raise ValueError("the run fine-tuned every weight (lora_rank 0): there is no LoRA to export; use --merged")
    with atomic_folder(cfg.out, replace=cfg.overwrite) as tmp:
        if cfg.merged:
            save_merged(task.pipe, task.denoiser, tmp)
        else:
            save_lora(task.pipe, task.family, task.denoiser, tmp)
    what = "pipeline with merged weights" if cfg.merged else "LoRA (diffusers format)"
    print(f"wrote {what} of {cfg.checkpoint} (step {trainer.step}) to {cfg.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a fine-tuned diffusers run as a LoRA (load_lora_weights) or merged weights",
                       description=__doc__.split("\n\n")[0])
    add_options(p, ExportConfig)
    add_config_args(p)
    add_run_switches(p, quiet=False)
    p.set_defaults(run=cmd_export)
