"""`scoreaction pretrain --task shapes`: the shapes world's own text-to-image model, trained from its scenes.

Three stages, each on fresh (scene, caption) pairs of `scenes.sample_batch` (batch k of stage S drawn from
seed (seed, S, k)), images x in [-1, 1]:

    clip  a CLIPModel (text and vision towers) with the symmetric contrastive loss; a batch may repeat a
          caption, so the targets are soft: image i matches every caption equal to its own, in equal shares;
    vae   an AutoencoderKL (size -> size / 4, 4 latent channels): ||D(z) - x||^2 + vae_kl KL(q(z|x) || N(0, I)),
          z ~ q(z|x); then scaling_factor = 1 / std of the latents, as Stable Diffusion's 0.18215;
    unet  a UNet2DConditionModel with cross-attention on the CLIP text states (the text tower frozen),
          eps-prediction on z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps with Stable Diffusion's scaled_linear
          betas (0.00085 to 0.012, 1000 steps); the caption dropped to "" with probability caption_dropout
          for classifier-free guidance; the weights saved are an exponential moving average (unet_ema).

The folder (written atomically) is a StableDiffusionPipeline that stock diffusers loads with
`StableDiffusionPipeline.from_pretrained(folder)` (a DDIMScheduler with SD's schedule, set_alpha_to_one false,
steps_offset 1), the whole CLIP model with its tokenizer and image processor in `clip/` (a folder for
`clip:DIR`), and RECORD: the command, the resolved config, the seed, the CPU and wall seconds and the losses
of each stage. Safetensors only; the UNet and the VAE are stored in `weights` precision (fp16 by default),
the text encoder and CLIP in fp32.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scoreaction.config import (
    Options,
    check_choice,
    check_flag,
    check_positive,
    check_positive_int,
    check_range,
    check_seed,
    option,
)
from scoreaction.errors import ConfigError
from scoreaction.io import atomic_folder, atomic_write_bytes
from scoreaction.outputs import Output, holds, named
from scoreaction.shapes.scenes import sample_batch
from scoreaction.shapes.vocab import MODEL_MAX_LENGTH, shapes_tokenizer

FORMAT = "scoreaction-shapes-pipeline-1"
RECORD = "pretrain.json"
CLIP_FOLDER = "clip"
STAGES = ("clip", "vae", "unet")
WEIGHTS = {"fp16": torch.float16, "fp32": torch.float32}
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PIPELINE_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", CLIP_FOLDER, RECORD)
SHAPES_MODEL = Output(f"pretrained shapes pipeline folder (model_index.json, {RECORD})", True,
                      holds("model_index.json", RECORD), named(*PIPELINE_ENTRIES, folders=True))


@dataclass
class ShapesPretrainConfig(Options):
    """Sizes, steps and learning rates of the three stages (module docstring); the defaults are the shipped model's."""

    size: int = option(32, help="image size in pixels (a multiple of 4; latents are size / 4)")
    split: str = option("all", help="captions to train on: all, train or heldout (scenes.sample_batch)")
    text_width: int = option(64, help="CLIP text tower width (also the UNet's cross-attention width)")
    text_layers: int = option(3, help="CLIP text tower layers")
    vision_width: int = option(64, help="CLIP vision tower width")
    vision_layers: int = option(3, help="CLIP vision tower layers")
    patch: int = option(4, help="CLIP vision patch size in pixels")
    projection: int = option(64, help="CLIP embedding size")
    clip_steps: int = option(800, help="CLIP training steps")
    clip_batch: int = option(128, help="CLIP batch size")
    clip_lr: float = option(1e-3, help="CLIP learning rate (AdamW)")
    vae_channels: list = option(factory=lambda: [32, 64, 64], flag=False,
                                help="AutoencoderKL block_out_channels (3 blocks: latents size / 4)")
    vae_steps: int = option(800, help="VAE training steps")
    vae_batch: int = option(64, help="VAE batch size")
    vae_lr: float = option(1e-3, help="VAE learning rate (AdamW)")
    vae_kl: float = option(1e-5, help="weight of the KL term of the VAE loss (per latent value)")
    unet_channels: list = option(factory=lambda: [64, 128], flag=False,
                                 help="UNet block_out_channels (each block with cross-attention)")
    unet_layers: int = option(2, help="UNet layers per block")
    unet_steps: int = option(3000, help="UNet training steps")
    unet_batch: int = option(64, help="UNet batch size")
    unet_lr: float = option(5e-4, help="UNet learning rate (AdamW, cosine decay to 0)")
    unet_ema: float = option(0.999, help="decay of the UNet weights' moving average (0: the last weights)")
    caption_dropout: float = option(0.1, help="probability of training the UNet on the empty caption")
    weights: str = option("fp16", help="precision of the stored UNet and VAE weights: fp16 or fp32")
    eval_per_category: int = option(50, help="captions per category of the checker's evaluation (train, heldout)")
    eval_steps: int = option(20, help="DDIM steps of the evaluation's samples")
    eval_guidance: float = option(5.0, help="classifier-free guidance of the evaluation's samples")
    log_every: int = option(100, help="steps between loss lines")

    def __post_init__(self):
        for name in ("size", "text_width", "text_layers", "vision_width", "vision_layers", "patch", "projection",
                     "clip_steps", "clip_batch", "vae_steps", "vae_batch", "unet_layers", "unet_steps", "unet_batch",
                     "log_every", "eval_per_category", "eval_steps"):
            check_positive_int(name, getattr(self, name))
        if not 32 <= self.size <= 256 or self.size % 4:
            raise ConfigError(f"size must be a multiple of 4 from 32 to 256, found {self.size!r}")
        if self.size % self.patch:
            raise ConfigError(f"patch must divide size {self.size}, found {self.patch!r}")
        check_choice("split", self.split, ("all", "train", "heldout"))
        check_choice("weights", self.weights, WEIGHTS)
        for name in ("clip_lr", "vae_lr", "unet_lr", "vae_kl", "eval_guidance"):
            check_positive(name, getattr(self, name))
        check_range("unet_ema", self.unet_ema, 0.0, 0.99999)
        check_range("caption_dropout", self.caption_dropout, 0.0, 0.5)
        for name, count in (("vae_channels", 3), ("unet_channels", None)):
            value = getattr(self, name)
            if not (isinstance(value, list) and value and all(isinstance(c, int) and not isinstance(c, bool)
                                                              and c >= 8 and c % 8 == 0 for c in value)
                    and (count is None or len(value) == count)):
                raise ConfigError(f"{name} must be a list of {count or 'one or more'} multiples of 8, found {value!r}")
        for name in ("text_width", "vision_width"):
            if getattr(self, name) % 8:
                raise ConfigError(f"{name} must be a multiple of 8 (attention heads of 8 channels), found "
                                  f"{getattr(self, name)!r}")


QUICK = dict(text_width=32, text_layers=1, vision_width=32, vision_layers=1, patch=8, projection=16, clip_steps=3,
             clip_batch=16, vae_channels=[8, 16, 16], vae_steps=3, vae_batch=8, unet_channels=[16, 32], unet_layers=1,
             unet_steps=3, unet_batch=8, unet_ema=0.0, log_every=1, eval_per_category=1, eval_steps=2)  # a smoke test: seconds on one core


def make_config(values: dict | None = None, *, quick: bool = False,
                where: str = "for pretrain --task shapes") -> ShapesPretrainConfig:
    """The config of `values` over the defaults, or over QUICK with `quick`; unknown keys are refused."""
    check_flag("quick", quick)
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"shapes options {where} must be a mapping, found {type(values).__name__}")
    return ShapesPretrainConfig.from_dict({**(QUICK if quick else {}), **(values or {})}, where)


# --- data ---------------------------------------------------------------------------------------------
def batch(seed: int, stage: str, k: int, n: int, cfg: ShapesPretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Batch k of a stage: images (n, 3, size, size) in [-1, 1] and their captions."""
    images, texts = sample_batch(n, (seed, STAGES.index(stage), k), cfg.size, cfg.split)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, texts


def tokens(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded to model_max_length, as StableDiffusionPipeline pads them."""
    out = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


# --- models -------------------------------------------------------------------------------------------
def build_clip(cfg: ShapesPretrainConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_width // 8,
                max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_width // 8,
                  image_size=cfg.size, patch_size=cfg.patch)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection))


def build_vae(cfg: ShapesPretrainConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(cfg.vae_channels),
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=cfg.size)


def build_unet(cfg: ShapesPretrainConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(sample_size=cfg.size // 4, in_channels=4, out_channels=4,
                                block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers,
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=8)


def schedulers():
    """(DDPMScheduler for training, DDIMScheduler for the folder): Stable Diffusion's schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDPMScheduler(**BETAS, clip_sample=False),
            DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1))


# --- stages -------------------------------------------------------------------------------------------
class Stage:
    """CPU seconds (this process, all threads), wall seconds and a loss history of one stage."""

    def __init__(self, name: str, steps: int, every: int, log: Callable[[str], None]):
        self.name, self.steps, self.every, self.log = name, steps, every, log
        self.cpu, self.wall, self.history, self.window = time.process_time(), time.perf_counter(), [], []

    def step(self, k: int, **losses: float) -> None:
        self.window.append(losses)
        if (k + 1) % self.every == 0 or k + 1 == self.steps:
            mean = {key: float(np.mean([w[key] for w in self.window])) for key in losses}
            self.history.append({"step": k + 1, **{key: round(v, 5) for key, v in mean.items()}})
            self.window = []
            shown = "  ".join(f"{key} {v:.4f}" for key, v in mean.items())
            self.log(f"{self.name} step {k + 1:6d}  {shown}  {time.perf_counter() - self.wall:.0f} s")

    def record(self, **extra) -> dict:
        return {"steps": self.steps, "cpu_seconds": round(time.process_time() - self.cpu, 1),
                "wall_seconds": round(time.perf_counter() - self.wall, 1), "history": self.history, **extra}


def cosine(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + np.cos(np.pi * min(k, steps) / steps)))


def clip_loss(model, pixel_values: torch.Tensor, ids: dict, texts: list[str]) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP's logits against soft targets: equal captions share the match."""
    out = model(pixel_values=pixel_values, **ids)
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target))


def train_clip(cfg: ShapesPretrainConfig, tokenizer, seed: int, log) -> tuple[nn.Module, dict]:
    from scoreaction.models.tiny_clip import CLIP_MEAN, CLIP_STD

    torch.manual_seed(seed)
    model = build_clip(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    sched = cosine(opt, cfg.clip_steps)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    stage = Stage("clip", cfg.clip_steps, cfg.log_every, log)
    for k in range(cfg.clip_steps):
        x, texts = batch(seed, "clip", k, cfg.clip_batch, cfg)
        loss = clip_loss(model, ((x + 1) / 2 - mean) / std, tokens(tokenizer, texts), texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        stage.step(k, loss=loss.item())
    return model.eval().requires_grad_(False), stage.record(parameters=sum(p.numel() for p in model.parameters()))


def train_vae(cfg: ShapesPretrainConfig, seed: int, log) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed + 1)
    vae = build_vae(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = cosine(opt, cfg.vae_steps)
    stage = Stage("vae", cfg.vae_steps, cfg.log_every, log)
    for k in range(cfg.vae_steps):
        x, _ = batch(seed, "vae", k, cfg.vae_batch, cfg)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        stage.step(k, mse=mse.item(), kl=kl.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = batch(seed, "vae", cfg.vae_steps, 256, cfg)
        z = vae.encode(x).latent_dist.mode()
        scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    return vae, stage.record(scaling_factor=round(scale, 6), parameters=sum(p.numel() for p in vae.parameters()))


def train_unet(cfg: ShapesPretrainConfig, tokenizer, text_encoder, vae, seed: int, log) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed + 2)
    unet = build_unet(cfg).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler, _ = schedulers()
    abar = noise_scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = cosine(opt, cfg.unet_steps)
    gen = torch.Generator().manual_seed(seed + 3)
    states: dict[str, torch.Tensor] = {}  # caption -> text encoder states (frozen), computed once

    def encode(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in states]
        if new:
            with torch.no_grad():
                hidden = text_encoder(input_ids=tokens(tokenizer, new)["input_ids"]).last_hidden_state
            states.update(zip(new, hidden))
        return torch.stack([states[t] for t in texts])

    stage = Stage("unet", cfg.unet_steps, cfg.log_every, log)
    for k in range(cfg.unet_steps):
        x, texts = batch(seed, "unet", k, cfg.unet_batch, cfg)
        drop = torch.rand(len(texts), generator=gen) < cfg.caption_dropout
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * vae.config.scaling_factor
        t = torch.randint(0, len(abar), (len(z),), generator=gen)
        eps = torch.randn(z.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=encode(texts)).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.unet_ema, (1 + k) / (10 + k))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        stage.step(k, loss=loss.item())
    return ema.eval(), stage.record(parameters=sum(p.numel() for p in unet.parameters()),
                                    captions_seen=len(states))


# --- the folder ----------------------------------------------------------------------------------------
def command(cfg: ShapesPretrainConfig, seed: int, quick: bool) -> str:
    """The command line that makes this model: the options that differ from the preset as --set."""
    base = make_config(quick=quick)
    changed = [f"--set shapes.{k}={json.dumps(v).replace(' ', '')}" for k, v in cfg.to_dict().items()
               if base.to_dict()[k] != v]
    return " ".join(["scoreaction pretrain --task shapes", *(["--quick"] if quick else []), f"--seed {seed}",
                     f"--threads {torch.get_num_threads()}", *changed])


def save(out: str | os.PathLike, pipe, clip, tokenizer, cfg: ShapesPretrainConfig, record: dict, *,
         overwrite: bool = False) -> Path:
    """The pipeline folder, CLIP in `clip/` and RECORD, written atomically (built beside, renamed into place)."""
    from scoreaction.models.tiny_clip import image_processor

    dtype = WEIGHTS[cfg.weights]
    with atomic_folder(out, replace=overwrite) as tmp:
        pipe.unet.to(dtype)
        pipe.vae.to(dtype)
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            pipe.unet.float()
            pipe.vae.float()
        clip.save_pretrained(tmp / CLIP_FOLDER, safe_serialization=True)
        tokenizer.save_pretrained(tmp / CLIP_FOLDER)
        image_processor(cfg.size).save_pretrained(tmp / CLIP_FOLDER)
        atomic_write_bytes(tmp / RECORD, (json.dumps(record, indent=1) + "\n").encode())
    return Path(out)


def evaluate(folder: str | os.PathLike, cfg: ShapesPretrainConfig, seed: int = 0) -> dict:
    """The checker's accuracy per category of the folder's pipeline, loaded by stock diffusers, on
    eval_per_category captions of each category of the train and the heldout split (accuracy.py)."""
    from diffusers import StableDiffusionPipeline

    from scoreaction.models.pipeline_load import library_output
    from scoreaction.shapes.accuracy import draw_captions, pipeline_accuracy

    with library_output():
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return {split: pipeline_accuracy(pipe, draw_captions(split, cfg.eval_per_category, seed), steps=cfg.eval_steps,
                                         guidance=cfg.eval_guidance, seed=seed, size=cfg.size)
                for split in ("train", "heldout")}


def write_metrics(folder: str | os.PathLike, metrics: dict, how: str) -> dict:
    """Replace the checker figures in a shapes folder's RECORD (atomically), noting the command that made them."""
    path = Path(folder) / RECORD
    record = json.loads(path.read_text())
    record["metrics"] = {**metrics, "command": how}
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return record


def pretrain(out: str | os.PathLike, cfg: ShapesPretrainConfig | None = None, *, seed: int = 0, quick: bool = False,
             evaluate_model: bool = True, log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Train CLIP, the VAE and the UNet (module docstring), write the pipeline folder to `out` (an existing
    folder there is replaced only with `overwrite`) and, with `evaluate_model`, add the checker's accuracy
    per category (`evaluate`) to its record. Returns the record written to RECORD.

    Everything is seeded from `seed`: same seed, torch build and thread count -> the same weights."""
    from scoreaction.models.pipeline_load import library_output

    cfg = cfg or make_config(quick=quick)
    check_seed("seed", seed)
    check_flag("evaluate_model", evaluate_model)
    start = time.perf_counter()
    with library_output():
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        tokenizer = shapes_tokenizer()
    clip, clip_record = train_clip(cfg, tokenizer, seed, log)
    vae, vae_record = train_vae(cfg, seed, log)
    text_encoder = clip.text_model
    unet, unet_record = train_unet(cfg, tokenizer, text_encoder, vae, seed, log)

    with library_output():
        encoder = CLIPTextModel(clip.config.text_config)  # CLIP's text tower alone, for the pipeline
        getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
        _, scheduler = schedulers()
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder.eval(), tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    record = {"format": FORMAT, "command": command(cfg, seed, quick), "seed": seed, "quick": quick,
              "config": cfg.to_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - start, 1),
              "stages": {"clip": clip_record, "vae": vae_record, "unet": unet_record}}
    with library_output():
        folder = save(out, pipe, clip, tokenizer, cfg, record, overwrite=overwrite)
    if evaluate_model:
        cpu, wall = time.process_time(), time.perf_counter()
        record["metrics"] = evaluate(folder, cfg, seed)
        record["metrics"].update(cpu_seconds=round(time.process_time() - cpu, 1),
                                 wall_seconds=round(time.perf_counter() - wall, 1))
        for split in ("train", "heldout"):
            m = record["metrics"][split]
            per = ", ".join(f"{c} {v:.2f}" for c, v in m["per_category"].items())
            log(f"checker accuracy ({split}, {m['steps']} DDIM steps, guidance {m['guidance']:g}): overall "
                f"{m['overall']:.3f} ({per}); partial {m['partial']:.3f}")
        atomic_write_bytes(folder / RECORD, (json.dumps(record, indent=1) + "\n").encode())
    return record


__all__ = ["CLIP_FOLDER", "FORMAT", "QUICK", "RECORD", "SHAPES_MODEL", "ShapesPretrainConfig", "evaluate",
           "make_config", "pretrain", "write_metrics"]
