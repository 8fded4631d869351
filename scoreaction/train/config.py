"""The trainer's configuration: one typed dataclass, validated on construction.

YAML layout (every key optional; defaults < file < flags < --set):

    task: {name: gaussian, dim: 2, beta_kl: 1.0}     # the task and its options (its TaskConfig)
    algorithm: ctrl                                  # ctrl, ctpg, ddpo, dpok, grpo, draft, adjoint
    algo: {lr: 1e-3, epochs: 4}                      # that algorithm's options (its AlgorithmConfig)
    steps: 20                                        # K, steps of the rollout grid
    grid: uniform                                    # or random (a fresh grid per batch), quadratic, edm
    batch_size: 256
    updates: 100

`task` and `algo` may be given as mappings; construction turns them into the task's and the
algorithm's own config dataclasses, so every option is checked before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from scoreaction.algorithms import AlgorithmConfig, algorithm_class
from scoreaction.config import (
    Options,
    check_choice,
    check_memory,
    check_nonnegative,
    check_size,
    memory_bytes,
    check_nonnegative_int,
    check_positive,
    check_positive_int,
    check_seed,
    option,
)
from scoreaction.errors import ConfigError
from scoreaction.samplers import GRIDS
from scoreaction.sde import KERNELS
from scoreaction.tasks import TaskConfig, task_config

DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device(device: str) -> None:
    base, _, index = str(device).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be one of {DEVICES} or cuda:N, found {device!r}")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; asking for a device that is not there is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch finds no CUDA GPU here (torch "
                         f"{torch.__version__}; use device=cpu or auto)")
    if device.startswith("cuda") and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but torch finds no MPS backend here (use device=cpu or auto)")
    return torch.device(device)
LR_SCHEDULES = ("constant", "linear")
MAX_TIMEOUT = 30 * 86400.0  # seconds; datetime.timedelta and torch's collectives overflow far beyond


@dataclass
class TrainConfig(Options):
    task: TaskConfig | dict = option(factory=lambda: {"name": "gaussian"}, flag=False,
                                     help="the task and its options, e.g. {name: gaussian, dim: 16}")
    algorithm: str = option("ctrl", help="fine-tuning algorithm: ctrl, ctpg, ddpo, dpok, grpo, draft or adjoint")
    algo: AlgorithmConfig | dict = option(factory=dict, flag=False, help="the algorithm's options, e.g. {lr: 1e-3}")
    steps: int = option(20, help="K, steps of the rollout grid")
    grid: str = option("uniform", help="RL-time grid of the rollouts: " + ", ".join(GRIDS) + ", or scheduler (a "
                                       "diffusers pipeline's own timesteps)")
    batch_size: int = option(256, help="rollouts per update")
    updates: int = option(100, help="policy updates in the whole run")
    seed: int = option(0, help="random seed of the run")
    dtype: str = option("float32", help="float32 or float64 (trainable weights and rollouts; see task.precision "
                                         "for the frozen weights of a diffusers pipeline)")
    device: str = option("auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps: the policy, the "
                                      "pretrained model and the reward all move there")
    kernel: str = option("em", help="transition kernel of the rollouts: em (Euler-Maruyama, Eq. E4) or ddim "
                                    "(diffusers' DDIM(eta) step, as DDPO and TRL sample)")
    rollout_batch: int | None = option(None, help="rollouts generated per forward pass (default: the whole batch)")
    micro_batch: int | None = option(None, help="transitions per backward pass: gradients are accumulated over "
                                                "micro-batches, so each optimiser step is unchanged (default: "
                                                "the whole minibatch)")
    tensorboard: bool = option(True, help="also log to RUN/tensorboard (scalars every update, images of image tasks)")
    image_every: int = option(10, help="log sample images to TensorBoard every N updates (0: never)")
    hidden: int = option(128, help="width of the default residual action and value MLPs")
    action_noise: float = option(0.0, help="sigma_a, explicit action noise of eta = 0 rollouts")
    lr_schedule: str = option("constant", help="the policy's learning rate: constant, or linear from algo.lr to 0 "
                                                "over the run (docs/benchmarks/finetune.md)")
    eval_every: int = option(20, help="evaluate J(theta) every N updates (0: only at the end)")
    eval_n: int | None = option(None, help="evaluation samples (default: the task's)")
    eval_steps: int | None = option(None, help="evaluation grid steps (default: the task's)")
    eval_prompts: list = option(factory=list, help="text-to-image: prompt lists or files (e.g. shapes-heldout) "
                                                   "whose images each evaluation also scores, paired with the "
                                                   "pretrained model (evaluation.prompt_gain; GenEval accuracy for "
                                                   "shapes captions)")
    eval_per_prompt: int = option(4, help="images per prompt of each eval_prompts list")
    checkpoint_every: int = option(0, help="write a checkpoint every N updates (0: only at the end)")
    max_skipped: int = option(3, help="consecutive updates that change no weight (a non-finite reward, or every "
                                      "optimiser step skipped or rolled back as non-finite) before the run stops")
    timeout: float = option(1800.0, help="seconds a process of a several-process run (torchrun) waits for the "
                                         "others at a collective before it stops with an error")
    out: str = option("runs/train", help="run folder")

    def __post_init__(self):
        if isinstance(self.task, dict):
            self.task = task_config(self.task)
        elif not isinstance(self.task, TaskConfig):
            raise ValueError(f"task must be a mapping of options with a 'name', found {self.task!r}")
        cls = algorithm_class(self.algorithm)
        if isinstance(self.algo, dict):
            self.algo = cls.Config.from_dict(self.algo, f"for algorithm {self.algorithm!r}")
        elif type(self.algo) is not cls.Config:
            raise ValueError(f"algo must be {self.algorithm}'s options ({cls.Config.__name__}), "
                             f"found {type(self.algo).__name__}")
        self.check_eval_prompts()
        for name in ("steps", "batch_size", "updates", "hidden", "max_skipped", "eval_per_prompt"):
            check_positive_int(name, getattr(self, name))
        for name in ("eval_n", "eval_steps", "rollout_batch", "micro_batch"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "image_every"):
            check_nonnegative_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        check_choice("grid", self.grid, (*GRIDS, "scheduler"))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("kernel", self.kernel, KERNELS)
        check_device(self.device)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_nonnegative("action_noise", self.action_noise)
        check_positive("timeout", self.timeout)
        if self.timeout > MAX_TIMEOUT:
            raise ConfigError(f"timeout must be at most {MAX_TIMEOUT:g} seconds (30 days), found {self.timeout:g}")
        self.check_sizes()
        group = self.algo.samples_per_condition
        if self.batch_size % group:
            raise ValueError(f"batch_size must be a multiple of {self.algorithm}'s group_size={group}, "
                             f"found {self.batch_size}")

    def check_eval_prompts(self) -> None:
        """eval_prompts: a list of prompt lists or files of a text-to-image task, each readable, none twice."""
        prompts = self.eval_prompts
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise ConfigError(f"eval_prompts must be a list of prompt lists or files, found {prompts!r}")
        if prompts and self.task.name != "diffusers":
            raise ConfigError(f"eval_prompts are for text-to-image tasks (diffusers), found task {self.task.name!r}")
        from scoreaction.tasks.diffusers import read_prompts

        labels = [prompt_label(p) for p in prompts]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"eval_prompts must have distinct names (the log's keys), found {prompts!r}")
        for p in prompts:
            read_prompts(p)

    def check_sizes(self) -> None:
        """Sizes refused before anything is allocated: a lower bound of their memory (the rollout batch's states
        over the grid, in the run's dtype; one hidden x hidden weight matrix) beyond this machine's."""
        itemsize = 8 if self.dtype == "float64" else 4
        dim = self.task.dim if isinstance(getattr(self.task, "dim", None), int) else 1
        check_memory("steps", self.steps, dim * itemsize, f"states of {dim} x {itemsize} bytes")
        if self.eval_steps is not None:
            check_memory("eval_steps", self.eval_steps, dim * itemsize, f"states of {dim} x {itemsize} bytes")
        for name in ("batch_size", "rollout_batch", "micro_batch", "eval_n"):
            if getattr(self, name) is not None:
                check_memory(name, getattr(self, name), dim * (self.steps + 1) * itemsize,
                             f"{self.steps + 1} states of {dim} x {itemsize} bytes each")
        check_size("hidden", self.hidden, math.isqrt(memory_bytes() // 4),
                   "a hidden x hidden float32 matrix must fit in this machine's memory")

    def to_dict(self) -> dict:
        """The nested-mapping form (what config.json and checkpoints hold; `from_dict` reads it back)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {**out, "task": self.task.to_dict(), "algo": self.algo.to_dict()}


def prompt_label(prompts: str) -> str:
    """The name of an eval_prompts entry in the log: a built-in list's name, a file's stem."""
    from pathlib import Path

    return Path(prompts).stem if ("/" in prompts or "." in prompts) else prompts
