"""`scoreaction bench --task diffusers`: the cost of an update on a diffusers pipeline, beside TRL's DDPOTrainer.

Every configuration (a scoreaction algorithm at beta_KL = 0 or > 0, or TRL 0.23.1's DDPOTrainer) runs in its own
Python subprocess with pinned torch threads, one at a time, so that its peak resident set (ru_maxrss) is its own.
Both sides load the IDENTICAL pipeline from one folder written with `save_pretrained` (local files only), train
LoRA adapters of the same rank and targets with the same batch, DDIM steps, guidance scale, eta, epochs and
minibatches, and score images with the same reward (rewards/images.py's JPEG compressibility). What a child
measures: experiments/diffusers_jobs.py. The report: experiments/diffusers_report.py. Writes diffusers.md and
diffusers.json into the output folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from scoreaction.config import (
    Options,
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_seed,
    option,
)
from scoreaction.experiments.diffusers_jobs import MATCHED, TRL, Cell
from scoreaction.io import atomic_write_bytes

FORMAT = "scoreaction-bench-diffusers-1"
REPORT, RESULTS = "diffusers.md", "diffusers.json"
ALGORITHMS = ("ctrl", "ddpo", "grpo")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "trl")
TRL_MISSING = "TRL's side skipped: trl is not installed (pip install scoreaction[trl])"
PRESETS = {  # frozen weights' precision, and defaults of the options below (the pipelines: save_pipeline)
    "tiny": {"precision": "fp32", "steps": [10, 20], "batch_sizes": [4, 8, 16], "micro_batch": "whole", "updates": 5},
    "sd15": {"precision": "bf16", "steps": [50], "batch_sizes": [8], "micro_batch": "trl", "updates": 3},
}


@dataclass
class DiffusersBenchConfig(Options):
    out: str = option("docs/benchmarks", help="output folder of diffusers.md and diffusers.json")
    command: str = option("scoreaction bench --task diffusers", flag=False, help="the command printed in the report")
    quick: bool = option(False, help="tiny budgets, every code path: a smoke test (the numbers mean nothing)")
    preset: str = option("tiny", help="tiny: tiny-sd on CPU; sd15: the SD-1.5 architecture, random weights, 512 px, "
                                      "bf16 (a GPU)")
    device: str = option("cpu", help="cpu or cuda (resolved by the command line)")
    algorithms: list = option(factory=lambda: list(ALGORITHMS), flag=False, help="scoreaction's side at beta_KL = 0")
    kl_algorithms: list = option(factory=lambda: list(ALGORITHMS), flag=False, help="and at beta_KL = beta_kl")
    beta_kl: float = option(0.01, help="the KL weight of the settings with a KL term")
    micro_batch: str | None = option(None, help="scoreaction's transitions per backward pass: whole (each minibatch "
                                                "at once, TrainConfig's default) or trl (B / minibatches, the rows of "
                                                "each of TRL's backward passes); default: the preset's")
    matched: list = option(factory=lambda: ["ddpo"], flag=False,
                           help="with micro_batch whole: algorithms also measured with micro_batch trl")
    steps: list | None = option(None, flag=False, help="DDIM steps K (default: the preset's)")
    batch_sizes: list | None = option(None, flag=False, help="samples per update B (default: the preset's)")
    warmup: int = option(1, help="updates run first and not counted")
    updates: int | None = option(None, help="measured updates per configuration, their median reported (default: "
                                            "the preset's)")
    epochs: int = option(1, help="passes over each batch (TRL: train_num_inner_epochs)")
    minibatches: int = option(2, help="optimiser steps per pass (TRL: train_batch_size = B / minibatches)")
    guidance_scale: float = option(5.0, help="classifier-free guidance, in rollouts and updates")
    eta: float = option(1.0, help="DDIM eta")
    lr: float = option(3e-4, help="learning rate of the LoRA weights")
    lora_rank: int = option(4, help="LoRA rank (alpha = rank), targets to_k, to_q, to_v, to_out.0 on both sides")
    seed: int = option(0, help="weights of the random pipeline, and the runs")
    threads: int = option(1, help="torch threads per process")
    workers: int = option(1, help="configurations measured at once (1 for timings; quick mode uses 2)")
    trl: bool = option(True, help="also run TRL's DDPOTrainer (if trl is installed)")
    timeout: float = option(1800.0, help="seconds before a configuration is stopped")

    def __post_init__(self):
        check_choice("preset", self.preset, PRESETS)
        check_choice("device", self.device, ("cpu", "cuda"))
        for name in ("steps", "batch_sizes", "micro_batch", "updates"):
            if getattr(self, name) is None:
                setattr(self, name, PRESETS[self.preset][name])
        if not self.steps or not self.batch_sizes:
            raise ValueError(f"steps and batch_sizes must be non-empty lists, found {self.steps!r} and "
                             f"{self.batch_sizes!r}")
        check_choice("micro_batch", self.micro_batch, ("whole", "trl"))
        for name in ("algorithms", "kl_algorithms", "matched"):
            if any(a not in ALGORITHMS for a in getattr(self, name)):
                raise ValueError(f"{name} must be a subset of {list(ALGORITHMS)}, found {getattr(self, name)!r}")
        for name in ("updates", "epochs", "minibatches", "lora_rank", "threads", "workers"):
            check_positive_int(name, getattr(self, name))
        for k in self.steps:
            check_positive_int("steps", k)
        for b in self.batch_sizes:
            check_positive_int("batch_sizes", b)
            if b % self.minibatches:
                raise ValueError(f"every batch size must be a multiple of minibatches={self.minibatches} (TRL's "
                                 f"train_batch_size is B / minibatches), found {b}")
        check_positive("beta_kl", self.beta_kl)
        check_positive("guidance_scale", self.guidance_scale)
        check_seed("seed", self.seed)
        check_nonnegative("eta", self.eta)
        check_positive("lr", self.lr)
        check_positive("timeout", self.timeout)

    @classmethod
    def quick_config(cls, out: str, seed: int = 0, device: str = "cpu",
                     command: str = "scoreaction bench --task diffusers --quick"):
        """Every code path in well under a minute: 2 steps, batch 2, one measured update, two at once."""
        return cls(out=out, command=command, quick=True, device=device, kl_algorithms=["ctrl"], steps=[2],
                   batch_sizes=[2], warmup=1, updates=1, seed=seed, workers=2, timeout=300.0)


@dataclass
class CellResult:
    label: str
    side: str
    algorithm: str
    beta_kl: float
    steps: int
    batch_size: int
    load_start: list  # os.getloadavg() when the configuration started
    median: dict = field(default_factory=dict)  # of the measured updates: seconds, seconds_<phase>, samples_per_s, ...
    records: list = field(default_factory=list)  # every update, warm-up first
    rss_import_mb: float | None = None  # ru_maxrss after the imports
    heavy_imports: list = field(default_factory=list)  # of diffusers_jobs.HEAVY, loaded by then
    rss_setup_mb: float | None = None  # ... after building the trainer (pipeline, LoRA, optimiser)
    peak_rss_mb: float | None = None  # ... after the last update
    peak_device_mb: float | None = None  # the CUDA allocator's peak over the updates
    load_end: list = field(default_factory=list)
    wall_seconds: float = 0.0
    error: str | None = None


@dataclass
class DiffusersBenchResults:
    command: str
    date: str
    machine: dict
    versions: dict
    git: str
    config: DiffusersBenchConfig
    trl_skipped: str | None
    cells: list[CellResult]
    wall_seconds: float
    format: str = FORMAT


# --- the parent: cells, one subprocess each, results ----------------------------------------------------------
def cells_of(config: DiffusersBenchConfig, model_dir: str, with_trl: bool) -> list[Cell]:
    """(label, side, algorithm, beta_KL, TRL's backward size) for every K and B."""
    trl_size = config.micro_batch == "trl"
    settings = [(a, "scoreaction", a, 0.0, trl_size) for a in config.algorithms]
    settings += [(f"{a} + KL {config.beta_kl:g}", "scoreaction", a, config.beta_kl, trl_size)
                 for a in config.kl_algorithms]
    settings += [(a + MATCHED, "scoreaction", a, 0.0, True) for a in config.matched if not trl_size]
    settings += [(TRL, "trl", "ddpo", 0.0, False)] if with_trl else []
    shared = dict(model_dir=model_dir, precision=PRESETS[config.preset]["precision"], device=config.device,
                  **{k: getattr(config, k) for k in ("warmup", "updates", "epochs", "minibatches", "guidance_scale",
                                                      "eta", "lr", "lora_rank", "seed", "threads")})
    return [Cell(label=label, side=side, algorithm=algo, beta_kl=beta, steps=k, batch_size=b,
                 micro_batch=b // config.minibatches if matched else None, **shared)
            for k in config.steps for b in config.batch_sizes for label, side, algo, beta, matched in settings]


def run(config: DiffusersBenchConfig, log: Callable[[str], None] | None = None) -> DiffusersBenchResults:
    log = log or (lambda message: None)
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with_trl = config.trl and trl_installed()
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="scoreaction-diffusers-bench-") as work:
        model_dir = str(Path(work) / "pipeline")
        save_pipeline(config.preset, config.seed, model_dir)
        cells = cells_of(config, model_dir, with_trl)

        def measure(cell: Cell) -> CellResult:
            result = run_cell(cell, Path(work), config.timeout)
            log(f"K={cell.steps:<3d} B={cell.batch_size:<3d} {cell.label:<28s} " + (
                f"failed: {result.error}" if result.error else f"{result.median['seconds']:.3f} s/update, "
                f"{result.peak_rss_mb:.0f} MB, load {result.load_start[0]:.1f}"))
            return result

        with ThreadPoolExecutor(config.workers) as pool:
            results = list(pool.map(measure, cells))
    versions = {name: package_version(name) for name in PACKAGES}
    machine = {**machine_of(config), "load_average_end": list(os.getloadavg()), "load_average_start": load_start}
    bench = DiffusersBenchResults(
        command=config.command, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine, versions=versions, git=git_state(), config=config,
        trl_skipped=None if with_trl or not config.trl else TRL_MISSING, cells=results,
        wall_seconds=time.perf_counter() - start)
    atomic_write_bytes(out / RESULTS, json.dumps(dataclasses.asdict(bench), indent=1).encode())
    from scoreaction.experiments.diffusers_report import render_markdown

    atomic_write_bytes(out / REPORT, render_markdown(bench).encode())
    log(f"wrote {out / REPORT} in {bench.wall_seconds:.0f} s")
    return bench


def run_cell(cell: Cell, work: Path, timeout: float) -> CellResult:
    """`measure(cell)` in a fresh Python process with `cell.threads` threads, offline; a failure is the cell's error."""
    from scoreaction.experiments.common import run_child

    result = work / (f"{cell.side}-{cell.algorithm}-{cell.beta_kl:g}-{cell.micro_batch}-{cell.steps}-"
                     f"{cell.batch_size}.json")
    start = time.perf_counter()
    done = CellResult(label=cell.label, side=cell.side, algorithm=cell.algorithm, beta_kl=cell.beta_kl,
                      steps=cell.steps, batch_size=cell.batch_size, load_start=list(os.getloadavg()))
    measured, error = run_child("scoreaction.experiments.diffusers_jobs", dataclasses.asdict(cell), result,
                                cell.threads, timeout)
    if error is not None:
        return dataclasses.replace(done, error=error)
    return dataclasses.replace(done, wall_seconds=time.perf_counter() - start, **measured)


def save_pipeline(preset: str, seed: int, folder: str) -> None:
    """Write the preset's random pipeline with `save_pretrained`: both sides load this very folder."""
    from transformers.utils import logging as transformers_logging

    from scoreaction.models.pipeline import build_tiny

    pipe = build_tiny("tiny-sd", seed) if preset == "tiny" else build_random_sd15(seed)
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the text encoder's "Writing model shards" bar
    try:
        pipe.save_pretrained(folder)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def build_random_sd15(seed: int = 0):
    """The Stable Diffusion 1.5 architecture with random weights, nothing downloaded: diffusers' default
    UNet2DConditionModel (320-640-1280-1280, 2 layers per block, 8 heads) with SD 1.5's 768-wide cross-attention
    and 64x64 latents, SD's VAE (128-256-512-512, scaling 0.18215: 512 px images), a 12-layer 768-wide CLIP text
    encoder on the tiny byte-level tokenizer (models/tiny_clip.py), and SD's DDIM scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from scoreaction.models.tiny_clip import TINY_TEXT_CONFIG, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, "hidden_size": 768, "intermediate_size": 3072,
                                           "num_attention_heads": 12, "num_hidden_layers": 12,
                                           "projection_dim": 768, "hidden_act": "quick_gelu"}))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text,
                                   tokenizer=tiny_tokenizer(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_of(config: DiffusersBenchConfig) -> dict:
    from scoreaction.experiments.common import machine_info

    info = machine_info(SimpleNamespace(workers=config.workers, threads=config.threads))
    info["device"] = config.device
    if config.device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_state() -> str:
    """The commit measured, and whether scoreaction/ had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "scoreaction"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (with uncommitted changes in scoreaction/)" if dirty else "")
