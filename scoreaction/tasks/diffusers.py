"""`diffusers`: fine-tune a text-to-image diffusers pipeline (Stable Diffusion 1.x/2.x, SD3) on its VAE latents.

Clock: the pretrained model and the action take DIFFUSION time s; rollouts run in RL time t = T - s.

The state is the latent (C, h, w); the condition is a prompt index (models/pipeline.Prompts); rewards see the
decoded images in [0, 1], shape (B, 3, H, W) (rewards/images.py). The action is the pipeline's own denoiser with
LoRA adapters (peft; `lora_rank: 0` fine-tunes every weight), under classifier-free guidance; the reference
(pretrained) policy is the same network with its adapters disabled.

Grids end where diffusers' samplers end: at the scheduler's last noise level (alphas_cumprod[0] for DDPM-type
schedulers with set_alpha_to_one false, as Stable Diffusion; s = 1/N for flow matching), because the DDIM
kernel adds no noise on a step to s = 0. Grid `scheduler` is the pipeline scheduler's own timesteps (DDIM's
`leading` spacing with its steps_offset, or the shifted flow-matching sigmas), so that rollouts and a stock
pipeline run the network at identical, integer timesteps.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scoreaction.config import check_choice, check_memory, check_positive, check_positive_int, check_seed, shown
from scoreaction.errors import ScoreactionError
from scoreaction.models.pipeline import (
    LORA_TARGETS,
    TINY,
    DenoiserScore,
    Prompts,
    add_lora,
    family_of,
    load_pipeline,
    weights_digest,
)
from scoreaction.models.residual import MLP
from scoreaction.paths import Discrete
from scoreaction.samplers import make_grid
from scoreaction.tasks.base import Task, TaskConfig

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond this saturates every image (Stable Diffusion uses 1-15)
PROMPT_LISTS = {
    "animals": ["a cat", "a dog", "a horse", "a rabbit", "a fox", "an owl", "a fish", "a bear"],
    "simple": ["a red circle", "a blue square", "a green triangle", "a yellow star"],
}
SHAPES_PROMPTS = {"shapes-train": "train", "shapes-heldout": "heldout"}  # up to 8 captions per category (41 / 27)


@dataclass
class DiffusersConfig(TaskConfig):
    name: str = "diffusers"
    beta_kl: float = 0.01
    model: str = "tiny-sd"  # a local pipeline folder, shapes (shipped), or tiny-sd / tiny-sd3 (random, from configs)
    seed: int = 0  # weights of the tiny pipelines
    prompts: str | list = "animals"  # a built-in list (animals, simple, shapes-train, shapes-heldout), a prompt file (one per line), or a list
    negative_prompt: str = ""
    guidance_scale: float = 5.0
    reward: str = "jpeg_compressibility"  # see rewards/images.py: jpeg_*, clip:DIR, aesthetic:DIR, learned:DIR, pkg.mod:fn
    reward_device: str | None = None  # default: the training device
    reward_batch: int = 16  # images per reward call
    decode_batch: int = 16  # latents per VAE decode
    lora_rank: int = 4  # 0: full fine-tuning
    lora_alpha: float = 4.0
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    precision: str = "fp32"  # bf16 / fp16: frozen weights in that dtype under autocast, LoRA weights in fp32
    gradient_checkpointing: bool = False
    eval_n: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.path != "vp" or self.path_options:
            raise ScoreactionError("task diffusers takes its path from the pipeline's scheduler: leave out "
                                   f"path and path_options, found path={self.path!r}, path_options={self.path_options!r}")
        check_choice("precision", self.precision, PRECISIONS)
        check_positive("guidance_scale", self.guidance_scale)
        if self.guidance_scale > MAX_GUIDANCE:
            raise ScoreactionError(f"guidance_scale must be in (0, {MAX_GUIDANCE:g}], "
                                   f"found {shown(self.guidance_scale)}")
        check_seed("seed", self.seed)
        for name in ("reward_batch", "decode_batch", "eval_n"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ScoreactionError(f"lora_rank must be an integer >= 0 (0: full fine-tuning), found {self.lora_rank!r}")
        check_memory("lora_rank", self.lora_rank, 8, "two float32 values per rank of a layer at least")
        check_positive("lora_alpha", self.lora_alpha)
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ScoreactionError(f"lora_targets must be a non-empty list of module names, found {self.lora_targets!r}")
        read_prompts(self.prompts)


def read_prompts(prompts: str | list) -> list[str]:
    """A built-in list by name, a file with one prompt per line (blank lines skipped), or a list of strings."""
    if isinstance(prompts, list):
        texts = prompts
    elif isinstance(prompts, str) and prompts in PROMPT_LISTS:
        texts = PROMPT_LISTS[prompts]
    elif isinstance(prompts, str) and prompts in SHAPES_PROMPTS:
        from scoreaction.shapes.accuracy import prompt_set
        texts = prompt_set(SHAPES_PROMPTS[prompts], per_category=8, seed=0)
    elif isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_file():
            raise ScoreactionError(f"prompts must be one of {sorted(PROMPT_LISTS) + sorted(SHAPES_PROMPTS)} or a "
                                   f"prompt file (one per line), "
                                   f"found {prompts!r} (no such file)")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of a prompt
        except UnicodeDecodeError:
            raise ScoreactionError(f"prompt file {prompts!r} is not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            check_prompt(line, f"prompt file {prompts!r} line {number}")
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ScoreactionError(f"prompt file {prompts!r} is empty (expected one prompt per line)")
    else:
        raise ScoreactionError(f"prompts must be a name, a file or a list of strings, found {prompts!r}")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ScoreactionError(f"prompts must be non-empty strings, found {shown(texts)}")
    for k, text in enumerate(texts):
        check_prompt(text, f"prompts[{k}]")
    return list(texts)


MAX_PROMPT = 10_000  # characters; the text encoders read the first 77 tokens (a few hundred characters)


def check_prompt(text: str, where: str) -> None:
    """A prompt is text of at most MAX_PROMPT characters without control characters (tabs aside)."""
    if len(text) > MAX_PROMPT:
        raise ScoreactionError(f"{where}: a prompt must have at most {MAX_PROMPT} characters, found {len(text)}")
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c != "\t"), None)
    if bad is not None:
        raise ScoreactionError(f"{where}: a prompt must be text without control characters, found {bad!r} "
                               f"at position {text.index(bad)}")


class LatentReward:
    """r(x, c) = image_reward(decode(x), c) on latents: the task's reward in the RewardModel signature."""

    def __init__(self, task: "DiffusersTask", image_reward):
        self.task, self.image_reward = task, image_reward
        self.differentiable = bool(getattr(image_reward, "differentiable", False))

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.image_reward(self.task.images(x), cond).to(x.dtype)


class DiffusersTask(Task):
    name = "diffusers"
    eval_steps = 20
    sample_n, sample_steps = 8, 20  # `scoreaction sample`: a handful of images (a 512 px image costs seconds)

    def __init__(self, config: DiffusersConfig):
        from scoreaction.rewards.images import make_image_reward

        self.config = config
        self.amp_dtype = PRECISIONS[config.precision]
        self.pipe = load_pipeline(config.model, seed=config.seed, dtype=self.amp_dtype or torch.float32)
        # a tiny pipeline's weights are hashed as built (before adapters); a folder's files when first asked
        self._weights_digest = weights_digest(config.model, self.pipe) if config.model in TINY else None
        self.family, self.path, self.prediction = family_of(self.pipe)
        self.denoiser = self.pipe.transformer if self.family == "sd3" else self.pipe.unet
        self.denoiser.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, encoder, None) is not None:
                getattr(self.pipe, encoder).requires_grad_(False)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.prompts = Prompts(self.pipe, self.family, read_prompts(config.prompts), config.negative_prompt)
        size = self.denoiser.config.sample_size
        self.shape = (self.denoiser.config.in_channels, size, size)
        self.num_classes = len(self.prompts.texts)
        self.beta_kl, self.eta, self.eval_n = float(config.beta_kl), float(config.eta), config.eval_n
        self.pretrained = self.score_model(adapters=False)
        self.reward = LatentReward(self, make_image_reward(config.reward, prompts=self.prompts.texts,
                                                           device=config.reward_device or "cpu",
                                                           micro_batch=config.reward_batch))

    @property
    def weights_digest(self) -> str:
        """"sha256:..." of the base model's weights (models/pipeline.weights_digest), computed once; a run
        records it in its checkpoints and resumes, samples and evaluates only on the same weights."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.config.model, self.pipe)
        return self._weights_digest

    def score_model(self, *, adapters: bool, denoiser: nn.Module | None = None) -> DenoiserScore:
        return DenoiserScore(denoiser or self.denoiser, self.path, self.prediction, self.family, self.prompts,
                             self.config.guidance_scale, adapters=adapters, amp_dtype=self.amp_dtype)

    # --- devices ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "DiffusersTask":
        """Move the pipeline (denoiser, VAE, text encoders), a separate pretrained copy and the reward's
        default device there."""
        self.pipe.to(device)
        self.pretrained.to(device)
        if self.config.reward_device is None:
            self.reward.image_reward.to(device)
        return self

    # --- conditions, grids, images ------------------------------------------------------------------
    def sample_conditions(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n prompt indices, uniformly over the training prompt list (the first `num_classes` prompts: prompts added
        later by `add_prompts`, e.g. held-out ones being evaluated, are never drawn for training)."""
        return torch.randint(self.num_classes, (n,), generator=generator)

    def add_prompts(self, texts: list[str]) -> torch.Tensor:
        """Indices of `texts` as conditions, encoding the ones not seen before."""
        return torch.tensor(self.prompts.add(texts))

    @property
    def s_end(self) -> float:
        """Diffusion time where sampling stops: the scheduler's last noise level (see the module docstring)."""
        if isinstance(self.path, Discrete):
            return 0.0 if self.pipe.scheduler.config.get("set_alpha_to_one", False) else self.path.T / self.path.N
        return 1.0 - self.path.T

    def grid(self, name: str, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The RL-time grid `name`, ending at `s_end`; `scheduler` is the pipeline scheduler's own timesteps."""
        if name == "scheduler":
            s = self.scheduler_times(steps)
        else:
            s = self.path.T - make_grid(name, self.path, steps, generator)
        s_end = self.s_end
        s = torch.cat([s[s > s_end + 1e-9], torch.tensor([s_end], dtype=torch.float64)])
        return self.path.T - s

    def scheduler_times(self, steps: int) -> torch.Tensor:
        """Diffusion times of the pipeline scheduler's `set_timesteps(steps)`: DDIM's for DDPM-type schedulers."""
        from diffusers import DDIMScheduler

        if self.family == "sd3":
            scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            scheduler.set_timesteps(steps)
            return torch.clamp(scheduler.sigmas.double(), max=self.path.T)
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return (scheduler.timesteps.double() + 1.0) * self.path.T / self.path.N

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> decoded images in [0, 1], (B, 3, H, W), float32, in micro-batches;
        differentiable in x (reward-gradient methods backpropagate through the VAE decoder)."""
        vae = self.pipe.vae
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor", None) or 0.0
        out = []
        for chunk in x.split(self.config.decode_batch):
            latents = (chunk / scale + shift).to(device=vae.device, dtype=vae.dtype)
            out.append(vae.decode(latents, return_dict=False)[0].float())
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1).to(x.device)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Labelers and learned rewards (`learned:DIR`) see the decoded images."""
        with torch.no_grad():
            return self.images(x)

    # --- what fine-tuning trains ------------------------------------------------------------------
    def make_action(self, hidden: int = 128) -> nn.Module:
        """The denoiser with fresh LoRA adapters (or, with lora_rank 0, every weight trainable and a frozen copy
        as the reference), as a score; it starts exactly at the pretrained model."""
        cfg = self.config
        if cfg.lora_rank == 0:
            import copy

            frozen = copy.deepcopy(self.denoiser).requires_grad_(False)
            self.pretrained = self.score_model(adapters=True, denoiser=frozen)
            self.denoiser.requires_grad_(True)
            return self.score_model(adapters=True)
        add_lora(self.denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        return self.score_model(adapters=True)

    def make_value_head(self, hidden: int = 128) -> nn.Module:
        return MLP(self.dim, 1, hidden=hidden, num_classes=self.num_classes, T=self.path.T)
