"""`scoreaction bench --task t2i`: fine-tuning the shipped shapes text-to-image model for GenEval accuracy.

Methods: scoreaction's ctrl (DDIM eta = 1 transitions, classifier-free guidance, LoRA rank 4, the value network
with Tweedie structure of Eq. E15), ddpo and grpo, each through `train.Trainer`, and TRL 0.23.1's DDPOTrainer
(`trl`) on the identical pipeline folder, reward and training prompts. The reward is the GenEval-style checker's
partial credit (`geneval`; `geneval:binary` its 0/1). Every (method, seed) cell runs in its own Python process
(experiments/t2i_cell.py; JSON in, JSON out, pinned threads, a timeout, a failure is the cell's error), trains U
updates of B trajectories at K steps and, at update 0 and every E updates, scores the policy and the pretrained
model on the same noise with `evaluation.prompt_gain` (DDIM eta = 0, the scheduler's grid) on the training and the
held-out prompts, recording trajectories, CPU seconds and wall seconds of training so far (evaluations excluded).
At the end: the accuracy gain under other solvers, the path KL to the pretrained model, a CLIP diversity figure
and a before/after image grid. TRL's LoRA weights (peft, rank 4 on to_k, to_q, to_v, to_out.0, as ours) are
copied into a scoreaction policy, so every method is evaluated by the same code.

Tuning budget: none for any method. Every method trains with `LEARNING_RATES[method]` (the same value for all)
and the shared `ALGO` options (TRL's DDPOConfig gets the same epochs, minibatches, clip and advantage clip).

Statistics over seeds: mean and 95 % Student-t interval (experiments/common.interval). Writes t2i.json, t2i.md and
t2i_*.png into the output folder; t2i_report.py renders the Markdown and the curves from the JSON alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scoreaction.config import Options, check_choice, check_nonnegative, check_positive, check_positive_int, option
from scoreaction.experiments.diffusers_bench import git_state, machine_of, package_version, trl_installed
from scoreaction.io import atomic_write_bytes

FORMAT = "scoreaction-bench-t2i-1"
REPORT, RESULTS, PREFIX = "t2i.md", "t2i.json", "t2i_"
METHODS = ("ctrl", "ddpo", "grpo", "trl")
LEARNING_RATES = {"ctrl": 1e-3, "ddpo": 1e-3, "grpo": 1e-3, "trl": 1e-3}  # untuned: one value for every method
ALGO = {"epochs": 1, "minibatches": 2, "ratio": "mean", "clip": 1e-4}  # DDPO's / TRL's PPO setting, on all sides
ADV_CLIP = 5.0  # ddpo's and TRL's advantage clip
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "trl")
TRL_MISSING = "TRL's DDPOTrainer skipped: trl is not installed (pip install scoreaction[trl])"
PRELOAD = ["scoreaction.experiments.t2i_cell", "scoreaction.train", "scoreaction.evaluation",
           "scoreaction.shapes.checker", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
           "transformers.models.clip.modeling_clip", "peft", "matplotlib.pyplot"]  # imported once, by the fork server
EVAL_SEED = 1_000_000  # evaluation noise: EVAL_SEED + seed, the same for every method of a seed


@dataclass
class T2IConfig(Options):
    out: str = option("docs/benchmarks", help="output folder of t2i.md, t2i.json and t2i_*.png")
    command: str = option("scoreaction bench --task t2i", flag=False, help="the command printed in the report")
    quick: bool = option(False, help="tiny budgets, every code path: a smoke test (the numbers mean nothing)")
    model: str = option("shapes", help="the pipeline: shapes (shipped) or a folder of the same format")
    methods: list = option(factory=lambda: list(METHODS), flag=False, help="of ctrl, ddpo, grpo, trl")
    seeds: list = option(factory=lambda: [1, 2, 3, 4, 5], flag=False, help="one cell per method and seed")
    reward: str = option("geneval", help="geneval (partial credit) or geneval:binary")
    updates: int = option(40, help="updates U per cell")
    batch_size: int = option(16, help="trajectories B per update")
    steps: int = option(20, help="DDIM steps K of the rollouts and of the evaluations")
    eval_every: int = option(5, help="updates E between evaluations (and one at update 0)")
    per_prompt: int = option(2, help="images per prompt in an evaluation")
    train_prompts: int | None = option(None, help="prompts of shapes-train evaluated (default all)")
    heldout_prompts: int | None = option(None, help="prompts of shapes-heldout evaluated (default all)")
    solvers: list = option(factory=lambda: [["ddim", 10], ["ddim", 50], ["dpm2", 10]], flag=False,
                           help="(solver, steps) of the final accuracy gains, eta = 0, on the training prompts")
    grid_prompts: int = option(4, help="prompts of the before/after grid and of the diversity figure")
    diversity_per_prompt: int = option(8, help="images per prompt of the diversity figure")
    kl_n: int = option(64, help="rollouts of the final path KL")
    guidance_scale: float = option(5.0, help="classifier-free guidance, in rollouts, updates and evaluations")
    eta: float = option(1.0, help="DDIM eta of the training rollouts")
    beta_kl: float = option(0.0, help="KL weight of scoreaction's methods (TRL has none)")
    lora_rank: int = option(4, help="LoRA rank (alpha = rank) on to_k, to_q, to_v, to_out.0; TRL fixes 4")
    device: str = option("cpu", help="cpu or cuda")
    threads: int = option(1, help="torch threads per cell")
    workers: int = option(1, help="cells run at once")
    trl: bool = option(True, help="run TRL's cell if trl is installed")
    timeout: float = option(6 * 3600.0, help="seconds before a cell is stopped")

    def __post_init__(self):
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}, found {self.methods!r}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be at least 2 distinct seeds (an interval over seeds), found {self.seeds!r}")
        check_choice("reward", self.reward, ("geneval", "geneval:binary"))
        check_choice("device", self.device, ("cpu", "cuda"))
        for name in ("updates", "batch_size", "steps", "eval_every", "per_prompt", "grid_prompts", "kl_n",
                     "threads", "workers", "lora_rank"):
            check_positive_int(name, getattr(self, name))
        for name in ("train_prompts", "heldout_prompts"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.diversity_per_prompt < 2:
            raise ValueError(f"diversity_per_prompt must be at least 2 (a variance), found {self.diversity_per_prompt}")
        if self.batch_size % ALGO["minibatches"]:
            raise ValueError(f"batch_size must be a multiple of {ALGO['minibatches']} minibatches, found "
                             f"{self.batch_size}")
        if "trl" in self.methods and self.lora_rank != 4:
            raise ValueError(f"TRL's pipeline fixes the LoRA rank at 4, found lora_rank={self.lora_rank}")
        for pair in self.solvers:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"solvers must be (name, steps) pairs, found {pair!r}")
            check_positive_int("solver steps", pair[1])
        check_positive("guidance_scale", self.guidance_scale)
        check_nonnegative("eta", self.eta)
        check_nonnegative("beta_kl", self.beta_kl)
        check_positive("timeout", self.timeout)

    @classmethod
    def quick_config(cls, out: str, seeds: list | None = None, methods: list | None = None,
                     command: str = "scoreaction bench --task t2i --quick") -> T2IConfig:
        """Every code path in well under a minute: 2 seeds, 2 updates of 4 at 3 steps, 3 + 3 prompts, 2 at once."""
        return cls(out=out, command=command, quick=True, methods=methods or list(METHODS), seeds=seeds or [1, 2],
                   updates=2, batch_size=4, steps=3, eval_every=1, per_prompt=1, train_prompts=3, heldout_prompts=3,
                   solvers=[["ddim", 2], ["ddim", 4], ["dpm2", 2]], grid_prompts=2, diversity_per_prompt=2, kl_n=4,
                   workers=2, timeout=600.0)


@dataclass
class CellResult:
    method: str
    seed: int
    load_start: list  # os.getloadavg() when the cell started
    error: str | None = None
    wall_seconds: float = 0.0  # the whole child process, evaluations included
    curve: list = field(default_factory=list)  # per evaluation: update, trajectories, cpu/wall seconds, train, heldout
    solvers: list = field(default_factory=list)  # prompt_gain under each of config.solvers, training prompts
    path_kl: float | None = None
    diversity: dict = field(default_factory=dict)  # policy, pretrained: CLIP embedding variance within a prompt
    grid: str | None = None  # the before/after PNG (first seed only)
    weights_digest: str | None = None
    eval_seconds: float = 0.0  # wall seconds of the evaluations along the curve
    final_seconds: float = 0.0  # ... of the final ones (solvers, path KL, diversity, grid)
    trl_copy_max_diff: float | None = None  # TRL: |UNet(TRL's weights) - UNet(the policy they were copied into)|


@dataclass
class T2IResults:
    command: str
    date: str
    machine: dict
    versions: dict
    git: str
    config: T2IConfig
    trl_skipped: str | None
    prompts: dict  # train, heldout, grid: the evaluated captions
    cells: list[CellResult]
    wall_seconds: float
    format: str = FORMAT

    @classmethod
    def from_json(cls, data: dict) -> T2IResults:
        if data.get("format") != FORMAT:
            raise ValueError(f"expected a {FORMAT} file, found format {data.get('format')!r}")
        return cls(**{**data, "config": T2IConfig(**data["config"]),
                      "cells": [CellResult(**c) for c in data["cells"]]})


def prompt_sets(config: T2IConfig) -> dict:
    """The evaluated captions: n of each list evenly spaced (the lists run category by category), and grid prompts
    alternating between the two."""
    from scoreaction.tasks.diffusers import read_prompts

    def spread(texts: list[str], n: int | None) -> list[str]:
        return texts if n is None or n >= len(texts) else [texts[i * len(texts) // n] for i in range(n)]

    train, heldout = (spread(list(dict.fromkeys(read_prompts(name))), n) for name, n in (
        ("shapes-train", config.train_prompts), ("shapes-heldout", config.heldout_prompts)))
    grid = [p for pair in zip(heldout, train) for p in pair][:config.grid_prompts]
    return {"train": train, "heldout": heldout, "grid": grid}


def run(config: T2IConfig, log: Callable[[str], None] | None = None) -> T2IResults:
    from scoreaction.models.pipeline_load import model_folder

    log = log or (lambda message: None)
    start, out = time.perf_counter(), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with_trl = config.trl and trl_installed()
    methods = [m for m in config.methods if m != "trl" or with_trl]
    prompts, load_start = prompt_sets(config), list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="scoreaction-t2i-") as work:
        model_dir = Path(work) / "pipeline"  # one copy: every cell reads the same weights
        shutil.copytree(model_folder(config.model), model_dir)
        jobs = [(method, seed) for seed in config.seeds for method in methods]

        def one(job: tuple[str, int]) -> CellResult:
            method, seed = job
            grid = str(out / f"{PREFIX}grid_{method}.png") if seed == config.seeds[0] else None
            result = run_cell(config, method, seed, str(model_dir), prompts, grid, Path(work))
            log(f"{method:<5s} seed {seed}: " + (f"failed: {result.error}" if result.error else
                f"{result.curve[-1]['cpu_seconds']:.1f} CPU s of training, {result.wall_seconds:.0f} s in all"))
            return result

        with ThreadPoolExecutor(config.workers) as pool:
            cells = list(pool.map(one, jobs))
    from scoreaction.experiments.finetune_results import jsonable
    from scoreaction.experiments.t2i_report import write_report

    machine = {**machine_of(config), "load_average_end": list(os.getloadavg()), "load_average_start": load_start}
    skipped = TRL_MISSING if config.trl and "trl" in config.methods and not with_trl else None
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    versions = {name: package_version(name) for name in PACKAGES}
    results = T2IResults(command=config.command, date=date, machine=machine, versions=versions, git=git_state(),
                         config=config, trl_skipped=skipped, prompts=prompts, cells=cells,
                         wall_seconds=time.perf_counter() - start)
    data = jsonable(dataclasses.asdict(results))  # JSON has no NaN: None
    atomic_write_bytes(out / RESULTS, json.dumps(data, indent=1).encode())
    write_report(data, out)  # from the JSON alone, as a regeneration would
    log(f"wrote {out / REPORT} in {results.wall_seconds:.0f} s")
    return results


def run_cell(config: T2IConfig, method: str, seed: int, model_dir: str, prompts: dict, grid: str | None,
             work: Path) -> CellResult:
    """One (method, seed) cell in a fresh process (t2i_cell.child_main); a failure is the cell's error."""
    from scoreaction.experiments.common import run_forked

    payload = {"method": method, "seed": seed, "model_dir": model_dir, "prompts": prompts, "grid": grid,
               "lr": LEARNING_RATES[method], "algo": ALGO, "adv_clip": ADV_CLIP, "eval_seed": EVAL_SEED + seed,
               **{k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "command", "methods",
                                                                                      "seeds", "workers", "timeout")}}
    done = CellResult(method=method, seed=seed, load_start=list(os.getloadavg()))
    start = time.perf_counter()
    measured, error = run_forked("scoreaction.experiments.t2i_cell", payload, work / f"{method}-{seed}.json",
                                 config.timeout, PRELOAD)
    if error is not None:
        return dataclasses.replace(done, error=error)
    return dataclasses.replace(done, wall_seconds=time.perf_counter() - start, **measured)
