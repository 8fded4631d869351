"""Diffusers pipelines as score models (Eq. E2): the denoiser, its Gaussian path, text conditions, guidance, LoRA.

Clock: DIFFUSION time s. Two families:

    unet   UNet2DConditionModel + a DDPM-type scheduler (Stable Diffusion 1.x/2.x): the scheduler's
           `alphas_cumprod` is the discrete VP path (paths.Discrete; step index i sits at s = (i + 1) / N), the
           network takes the step index (`Discrete.timestep`: exact integers on the scheduler's knots) and
           predicts eps (`epsilon`), x0 (`sample`) or v = alpha eps - sigma x0 (`v_prediction`).
    sd3    SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler (Stable Diffusion 3): the rectified-flow
           path x_s = (1 - s) x0 + s eps (paths.RectifiedFlow), time input 1000 s, and the network predicts the
           velocity dx_s/ds = eps - x0, converted to a score.

Conditions are prompt indices (a LongTensor (B,)) into a `Prompts` table whose text embeddings the pipeline's
own encoders compute once per prompt. Classifier-free guidance mixes the conditional and unconditional
(negative-prompt) predictions, pred = u + w (c - u); the guided prediction is the action, for the fine-tuned
policy and its reference alike (as DDPO and the papers do). With LoRA (peft), the reference is the same network
with its adapters disabled, not a second copy in memory.

The built-in `tiny-sd` and `tiny-sd3` are randomly initialised pipelines of the two architectures, built from
configs with a fixed seed (as diffusers' own tests build theirs); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from scoreaction.config import check_memory
from scoreaction.errors import ConfigError, ScoreactionError
from scoreaction.models.pipeline_load import TINY, build_tiny, library_output, load_pipeline, weights_digest  # noqa: F401
from scoreaction.paths import Discrete, GaussianPath, RectifiedFlow, as_time

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
ADAPTER = "scoreaction"
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow": "velocity"}
ENCODE_BATCH = 64  # prompts per pass of the text encoders


def family_of(pipe) -> tuple[str, GaussianPath, str]:
    """(family, Gaussian path, prediction kind) of a pipeline, from its denoiser and scheduler."""
    scheduler = pipe.scheduler
    if getattr(pipe, "transformer", None) is not None:
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ScoreactionError(f"a transformer pipeline needs FlowMatchEulerDiscreteScheduler (rectified flow), "
                                   f"found {type(scheduler).__name__}")
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ScoreactionError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting is not supported "
                                   "(expected a fixed shift, as SD3)")
        return "sd3", RectifiedFlow(T=1.0 - 1.0 / scheduler.config.num_train_timesteps), "velocity"
    if getattr(pipe, "unet", None) is None:
        raise ScoreactionError(f"pipeline {type(pipe).__name__} has neither a unet nor a transformer")
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ScoreactionError(f"unsupported scheduler {type(scheduler).__name__}: expected a DDPM-type scheduler "
                               f"with alphas_cumprod (DDIM, DDPM, PNDM, Euler, ...)")
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "sample", "v_prediction"):
        raise ScoreactionError(f"unsupported prediction type {kind!r}: expected epsilon, sample or v_prediction")
    return "unet", Discrete(scheduler.alphas_cumprod.double().numpy()), PREDICTIONS[kind]


# --- text conditions ----------------------------------------------------------------------------

class Prompts:
    """Prompt strings and their text embeddings, computed once per prompt by the pipeline's encoders.

    `cond` tensors are indices into `texts`; `add` appends new prompts (e.g. for sampling) and returns their
    indices. `embed(ids)` gives the denoiser's keyword arguments for those prompts; `negative(n)` those of the
    negative prompt (the unconditional branch of guidance)."""

    def __init__(self, pipe, family: str, texts: list[str], negative_prompt: str = ""):
        self.pipe, self.family, self.texts = pipe, family, []
        self.table: dict[str, list[torch.Tensor]] = {}
        self.uncond = self._encode([negative_prompt])
        self.add(texts)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The encoders' embeddings of `texts`; what the libraries print meanwhile (a long prompt's truncation
        warning) is held back unless --verbose."""
        device = self.pipe.text_encoder.device if self.pipe.text_encoder is not None else "cpu"
        with library_output():
            if self.family == "unet":
                emb, _ = self.pipe.encode_prompt(texts, device, 1, False)
                return {"encoder_hidden_states": emb}
            emb, _, pooled, _ = self.pipe.encode_prompt(texts, texts, texts, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False, max_sequence_length=77)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def add(self, texts: list[str]) -> list[int]:
        """Encode the prompts not seen before, ENCODE_BATCH at a time; refused before the first batch when
        their embeddings would not fit in memory (the first batch's size, times the number of batches)."""
        known = set(self.texts)
        new = [t for t in dict.fromkeys(texts) if t not in known]
        for start in range(0, len(new), ENCODE_BATCH):
            batch = new[start:start + ENCODE_BATCH]
            encoded = self._encode(batch)
            if start == 0 and len(new) > ENCODE_BATCH:
                per_prompt = sum(v[0].numel() * v.element_size() for v in encoded.values())
                check_memory("prompts", len(new), 2 * per_prompt, f"text embeddings of {per_prompt} bytes each")
            for key, value in encoded.items():
                self.table.setdefault(key, []).extend(value.unbind(0))
            self.texts.extend(batch)
        index = {t: i for i, t in enumerate(self.texts)}
        return [index[t] for t in texts]

    def embed(self, ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
        ids = ids.tolist()
        return {key: torch.stack([rows[i] for i in ids]).to(device) for key, rows in self.table.items()}

    def negative(self, n: int, device) -> dict[str, torch.Tensor]:
        return {key: value.expand(n, *value.shape[1:]).to(device) for key, value in self.uncond.items()}


# --- the denoiser as a score --------------------------------------------------------------------

@contextlib.contextmanager
def adapters_disabled(denoiser: nn.Module):
    """The denoiser without its LoRA adapters (the pretrained network) inside the block.

    What diffusers' `disable_adapters()` / `enable_adapters()` do, on the adapter layers directly: those read
    peft's installed version from its metadata and walk every module twice per call, and peft's `enable_adapters`
    resets requires_grad on every adapter weight: 2.0 ms per reference pass on tiny-sd (536 modules, 32 adapter
    layers) against 0.46 ms here. The weights' requires_grad is left alone: the adapters are unused inside."""
    if not getattr(denoiser, "_hf_peft_config_loaded", False):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


class DenoiserScore(nn.Module):
    """s(s, x, c): the guided prediction of a diffusers denoiser as a score (Eq. E2), on latents (B, C, h, w).

    `adapters=False` evaluates the network with its LoRA adapters disabled: the pretrained reference, which
    holds the shared network without registering it (its frozen weights are frozen by the task).
    `amp_dtype` (bf16/fp16) runs the network under autocast; the score comes back in x's dtype."""

    def __init__(self, denoiser: nn.Module, path: GaussianPath, prediction: str, family: str, prompts: Prompts,
                 guidance_scale: float = 1.0, adapters: bool = True, amp_dtype: torch.dtype | None = None):
        super().__init__()
        if adapters:
            self.denoiser = denoiser
        else:  # the reference shares the trained network: not a submodule, so freezing it leaves the LoRA alone
            object.__setattr__(self, "denoiser", denoiser)
        self.path, self.prediction, self.family = path, prediction, family
        self.prompts, self.guidance_scale, self.adapters, self.amp_dtype = prompts, guidance_scale, adapters, amp_dtype

    def time_input(self, s: torch.Tensor) -> torch.Tensor:
        if self.family == "sd3":
            return s * 1000.0
        return self.path.timestep(s)

    def network(self, s: torch.Tensor, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        t_in = self.time_input(s).to(device=x.device, dtype=torch.float32)
        amp = torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        off = contextlib.nullcontext() if self.adapters else adapters_disabled(self.denoiser)
        weight_dtype = next(self.denoiser.parameters()).dtype
        with off, amp:
            x_in = x if self.amp_dtype else x.to(weight_dtype)
            kwargs = {k: v.to(weight_dtype) if v.is_floating_point() and not self.amp_dtype else v
                      for k, v in kwargs.items()}
            if self.family == "sd3":
                out = self.denoiser(hidden_states=x_in, timestep=t_in, return_dict=False, **kwargs)[0]
            else:
                out = self.denoiser(x_in, t_in, return_dict=False, **kwargs)[0]
        return out.to(x.dtype)

    def forward(self, s, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ScoreactionError("a text-conditioned denoiser needs prompt indices as its condition, found None")
        s = as_time(s).expand(x.shape[0]) if as_time(s).ndim == 0 else as_time(s)
        n, kwargs = x.shape[0], self.prompts.embed(cond, x.device)
        if self.guidance_scale == 1.0:
            pred = self.network(s, x, kwargs)
        else:
            neg = self.prompts.negative(n, x.device)
            both = {k: torch.cat([neg[k], kwargs[k]]) for k in kwargs}
            uncond, text = self.network(torch.cat([s, s]), torch.cat([x, x]), both).chunk(2)
            pred = uncond + self.guidance_scale * (text - uncond)
        return self.to_score(pred, s, x)

    def to_score(self, pred: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.prediction == "v":  # v = alpha eps - sigma x0 on a VP path (alpha^2 + sigma^2 = 1): eps = sigma x + alpha v
            a, sg = (c.to(x).reshape(-1, *[1] * (x.ndim - 1)) for c in (self.path.alpha(s), self.path.sigma(s)))
            return self.path.to_score("eps", sg * x + a * pred, s, x)
        return self.path.to_score(self.prediction, pred, s, x)


def add_lora(denoiser: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Inject fresh LoRA adapters (B = 0: the adapted network starts exactly at the pretrained one) into the
    denoiser, train only them, and keep them in float32 whatever the frozen weights' dtype."""
    from peft import LoraConfig

    if getattr(denoiser, "_hf_peft_config_loaded", False) and ADAPTER in denoiser.peft_config:
        denoiser.delete_adapters(ADAPTER)
    widths = [min(m.in_features, m.out_features) for name, m in denoiser.named_modules()  # peft's matching
              if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if widths and rank > max(widths):
        raise ConfigError(f"lora_rank must be at most {max(widths)} (the largest rank of a targeted layer of this "
                          f"denoiser; a higher rank adds nothing), found {rank}")
    denoiser.requires_grad_(False)
    try:
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(targets)), adapter_name=ADAPTER)
    except ValueError as err:
        raise ScoreactionError(f"LoRA targets {list(targets)}: {str(err).splitlines()[0]}") from None
    denoiser.set_adapter(ADAPTER)
    for p in denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's naming (what diffusers' `save_lora_weights` takes)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)


def save_lora(pipe, family: str, denoiser: nn.Module, folder: str | Path) -> None:
    """Write the LoRA in diffusers' format (pytorch_lora_weights.safetensors, with its LoraConfig as metadata),
    so that a stock pipeline's `load_lora_weights(folder)` adapts its denoiser exactly as fine-tuned."""
    prefix = "transformer" if family == "sd3" else "unet"
    with library_output():
        type(pipe).save_lora_weights(str(folder), safe_serialization=True, **{
            f"{prefix}_lora_layers": lora_state_dict(denoiser),
            f"{prefix}_lora_adapter_metadata": denoiser.peft_config[ADAPTER].to_dict()})


def save_merged(pipe, denoiser: nn.Module, folder: str | Path) -> None:
    """Write the whole pipeline with the fine-tuned weights folded into the denoiser (LoRA merged)."""
    import copy

    merged = copy.deepcopy(denoiser)
    if getattr(merged, "_hf_peft_config_loaded", False):
        merged.fuse_lora(adapter_names=[ADAPTER])
        merged.unload_lora()
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    components = {**pipe.components, name: merged}
    with library_output():
        type(pipe)(**{k: v for k, v in components.items() if k in type(pipe).__init__.__code__.co_varnames}
                   ).save_pretrained(str(folder), safe_serialization=True)
