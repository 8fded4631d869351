"""The units of work of `scoreaction bench --task diffusers` (experiments/diffusers_bench.py): one configuration,
measured in the process that runs `child_main` (a fresh one per configuration).

`measure(cell)` builds one side's trainer on the saved pipeline folder, runs `warmup + updates` updates and
returns, per update, the seconds of each phase, the UNet rows evaluated with and without gradients and their
forward seconds, the VAE rows decoded (a `Probe` of hooks), and the process's peak resident set after the imports,
after the setup and at the end. Data comes in and goes out as JSON, never pickle.

TRL's DDPOTrainer.step samples (decoding the images inside its pipeline), scores, computes advantages and trains;
a minimal subclass times those methods. Its VAE decode is timed by the probe and counted as reward time, as it is
on scoreaction's side (whose reward decodes the latents): rollout is then the denoising loop on both sides.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scoreaction.io import atomic_write_bytes

PHASES = ("rollout", "reward", "prepare", "update")
HEAVY = ("accelerate", "datasets", "pandas", "pyarrow")  # imported by some trainers and not by others
TRL, MATCHED = "TRL ddpo", " (TRL's backward size)"  # TRL's label; the suffix of ours with TRL's backward size


@dataclass
class Cell:
    """One measured configuration: what a child process needs."""

    label: str
    side: str  # scoreaction or trl
    algorithm: str
    beta_kl: float
    steps: int
    batch_size: int
    micro_batch: int | None  # scoreaction's transitions per backward pass (None: each minibatch at once)
    model_dir: str
    precision: str
    device: str
    warmup: int
    updates: int
    epochs: int
    minibatches: int
    guidance_scale: float
    eta: float
    lr: float
    lora_rank: int
    seed: int
    threads: int


class Probe:
    """Counts and times the UNet's forward passes (rows, split by whether autograd records them) and the VAE's
    decodes, through forward hooks and a wrapper of `vae.decode` (synchronising CUDA around each)."""

    def __init__(self, unet, vae, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"
        self.counts: dict = {}
        self.started = 0.0
        unet.register_forward_pre_hook(self.before)
        unet.register_forward_hook(self.after)
        decode = vae.decode

        def timed_decode(z, *args, **kwargs):
            t = self.now()
            out = decode(z, *args, **kwargs)
            self.add("vae", len(z), self.now() - t)
            return out

        vae.decode = timed_decode

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, rows: int, seconds: float) -> None:
        for key, value in (("calls", 1), ("rows", rows), ("seconds", seconds)):
            self.counts[f"{name}_{key}"] = self.counts.get(f"{name}_{key}", 0) + value

    def before(self, module, args):
        self.started = self.now()

    def after(self, module, args, output):
        rows = len(args[0]) if args else 0
        self.add("unet_grad" if self.torch.is_grad_enabled() else "unet_nograd", rows, self.now() - self.started)

    def take(self) -> dict:
        counts, self.counts = self.counts, {}
        return {f"{name}_{key}": counts.get(f"{name}_{key}", 0) for name in ("unet_nograd", "unet_grad", "vae")
                for key in ("calls", "rows", "seconds")}


def maxrss_mb() -> float:
    per_mb = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is in bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def child_main(cell_json: str, result_path: str) -> None:
    cell = Cell(**json.loads(cell_json))
    atomic_write_bytes(Path(result_path), json.dumps(measure(cell)).encode())


def measure(cell: Cell) -> dict:
    """Build one side's trainer, run warmup + updates updates; per-update records, medians, memory."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(cell.threads)
    torch.manual_seed(cell.seed)
    modules = ["scoreaction.train", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"]
    for name in modules + (["trl.trainer.ddpo_trainer"] if cell.side == "trl" else []):
        importlib.import_module(name)  # the imports' memory, counted apart from the setup's
    rss_import, heavy = maxrss_mb(), [name for name in HEAVY if name in sys.modules]
    update, probe = (trl_side if cell.side == "trl" else scoreaction_side)(cell)
    rss_setup = maxrss_mb()
    cuda, peak_device, records = cell.device == "cuda", None, []
    for _ in range(cell.warmup + cell.updates):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        record = {**update(), **probe.take()}
        record["samples_per_s"] = cell.batch_size / record["seconds"]
        if cuda:
            record["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
            peak_device = max(peak_device or 0.0, record["peak_device_mb"])
        records.append(record)
    measured = records[cell.warmup:]
    median = {k: statistics.median(r[k] for r in measured) for k in measured[0]}
    return {"median": median, "records": records, "rss_import_mb": rss_import, "heavy_imports": heavy,
            "rss_setup_mb": rss_setup, "peak_rss_mb": maxrss_mb(), "peak_device_mb": peak_device,
            "load_end": list(os.getloadavg())}


def scoreaction_side(cell: Cell):
    """scoreaction's Trainer as configs/sd15-aesthetic.yaml builds it: DDIM kernel on the scheduler's timesteps,
    LoRA, the PPO ratio averaged over the latent (`ratio: mean`, DDPO's clipping) with TRL's clip 1e-4."""
    from scoreaction.train import TrainConfig, Trainer

    algo = {"lr": cell.lr, "epochs": cell.epochs, "minibatches": cell.minibatches, "ratio": "mean", "clip": 1e-4}
    if cell.algorithm == "grpo":
        algo["group_size"] = math.gcd(cell.batch_size, 4)
    task = {"name": "diffusers", "model": cell.model_dir, "prompts": "animals", "reward": "jpeg_compressibility",
            "beta_kl": cell.beta_kl, "guidance_scale": cell.guidance_scale, "eta": cell.eta,
            "precision": cell.precision, "lora_rank": cell.lora_rank, "lora_alpha": float(cell.lora_rank),
            "seed": cell.seed}
    config = TrainConfig.from_dict({"task": task, "algorithm": cell.algorithm, "algo": algo, "kernel": "ddim",
                                    "grid": "scheduler", "steps": cell.steps, "batch_size": cell.batch_size,
                                    "seed": cell.seed, "device": cell.device, "micro_batch": cell.micro_batch,
                                    "tensorboard": False, "eval_every": 0, "updates": cell.warmup + cell.updates,
                                    "out": tempfile.mkdtemp(prefix="scoreaction-bench-run-")}, "for bench")
    trainer = Trainer(config, progress=False)
    probe = Probe(trainer.task.denoiser, trainer.task.pipe.vae, cell.device)

    def update() -> dict:
        m = trainer.update()
        return {"seconds": m["seconds"], **{f"seconds_{p}": m.get(f"seconds_{p}", 0.0) for p in PHASES}}

    return update, probe


def trl_side(cell: Cell):
    """TRL 0.23.1's DDPOTrainer on the same folder: DefaultDDPOStableDiffusionPipeline (LoRA r=4 on to_k, to_q, to_v,
    to_out.0), sample_batch_size B in one batch, train_batch_size B / minibatches, no trackers, offline."""
    import random

    import torch
    from accelerate import PartialState
    from trl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from scoreaction.rewards.images import make_image_reward
    from scoreaction.tasks.diffusers import PROMPT_LISTS

    if cell.lora_rank != 4:
        raise ValueError(f"TRL's DefaultDDPOStableDiffusionPipeline fixes the LoRA rank at 4, found {cell.lora_rank}")
    PartialState(cpu=cell.device == "cpu")  # accelerate's logging needs its state before the pipeline warns
    pipe = DefaultDDPOStableDiffusionPipeline(cell.model_dir, use_lora=True)
    reward = make_image_reward("jpeg_compressibility")
    prompts, rng = PROMPT_LISTS["animals"], random.Random(cell.seed)
    times: dict = {}

    def clocked(phase: str, fn):
        def run(*args, **kwargs):
            if cell.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if cell.device == "cuda":
                torch.cuda.synchronize()
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - t
            return out
        return run

    class Timed(DDPOTrainer):
        _generate_samples = clocked("sample", DDPOTrainer._generate_samples)
        compute_rewards = clocked("reward", DDPOTrainer.compute_rewards)
        _train_batched_samples = clocked("update", DDPOTrainer._train_batched_samples)

    config = ddpo_config(updates=cell.warmup + cell.updates, seed=cell.seed, device=cell.device,
                         precision=cell.precision, steps=cell.steps, eta=cell.eta, guidance_scale=cell.guidance_scale,
                         batch_size=cell.batch_size, minibatches=cell.minibatches, epochs=cell.epochs, lr=cell.lr)
    trainer = Timed(config, lambda images, texts, meta: (reward(images.float()), {}),
                    lambda: (rng.choice(prompts), {}), pipe)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    probe = Probe(pipe.unet, pipe.vae, cell.device)
    epoch = iter(range(10**9))

    def update() -> dict:
        times.clear()
        clocked("total", trainer.step)(next(epoch), 0)
        decode = probe.counts.get("vae_seconds", 0.0)  # inside TRL's sampling: counted as reward, as ours
        rollout, score, train = times["sample"] - decode, times["reward"] + decode, times["update"]
        return {"seconds": times["total"], "seconds_rollout": rollout, "seconds_reward": score,
                "seconds_prepare": times["total"] - times["sample"] - times["reward"] - train,
                "seconds_update": train}

    return update, probe


def ddpo_config(*, updates: int, seed: int, device: str, precision: str, steps: int, eta: float, guidance_scale: float,
                batch_size: int, minibatches: int, epochs: int, lr: float, clip: float = 1e-4, adv_clip: float = 5.0,
                **options):
    """TRL's DDPOConfig for `updates` calls of DDPOTrainer.step: one sampling batch of `batch_size` per step, trained
    in `minibatches` optimiser steps per epoch over all K timesteps, no trackers, checkpoints or hub; `options`: more
    of DDPOConfig's fields."""
    from trl import DDPOConfig

    return DDPOConfig(num_epochs=updates, seed=seed, log_with=None,
                      mixed_precision="no" if precision == "fp32" else precision,
                      accelerator_kwargs={"cpu": device == "cpu"}, save_freq=10**9,
                      logdir=tempfile.mkdtemp(prefix="scoreaction-bench-trl-"), sample_num_steps=steps,
                      sample_eta=eta, sample_guidance_scale=guidance_scale, sample_batch_size=batch_size,
                      sample_num_batches_per_epoch=1, train_batch_size=batch_size // minibatches,
                      train_gradient_accumulation_steps=1, train_num_inner_epochs=epochs, train_learning_rate=lr,
                      train_clip_range=clip, train_adv_clip_max=adv_clip, train_timestep_fraction=1.0, **options)
