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
import json
from pathlib import Path

import torch
from torch import nn

from scoreaction.config import check_memory
from scoreaction.errors import ConfigError, ScoreactionError
from scoreaction.paths import Discrete, GaussianPath, RectifiedFlow, as_time

TINY = ("tiny-sd", "tiny-sd3")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
ADAPTER = "scoreaction"
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow": "velocity"}
ENCODE_BATCH = 64  # prompts per pass of the text encoders


# --- loading -------------------------------------------------------------------------------------

def build_tiny(name: str, seed: int = 0):
    """A randomly initialised pipeline of the SD-1.5 (`tiny-sd`) or SD3 (`tiny-sd3`) architecture: 8x8x4
    latents (32 px images), tiny text encoders; identical weights for identical seeds."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from scoreaction.models.tiny_clip import tiny_tokenizer

    torch.manual_seed(seed)
    vae_options = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                       down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=len(tiny_tokenizer()))
    if name == "tiny-sd":
        unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=2)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=AutoencoderKL(**vae_options),
                                       text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tiny_tokenizer(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if name == "tiny-sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                            pooled_projection_dim=64, out_channels=4)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)) for _ in range(2)]
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=AutoencoderKL(**vae_options, shift_factor=0.0609, scaling_factor=1.5035),
                                        text_encoder=encoders[0], tokenizer=tiny_tokenizer(), text_encoder_2=encoders[1],
                                        tokenizer_2=tiny_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    raise ScoreactionError(f"tiny model must be one of {TINY}, found {name!r}")


def load_pipeline(model: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A built-in tiny pipeline by name, or a diffusers pipeline from a local folder (`local_files_only`:
    nothing is fetched), checked component by component (`load_folder`). Every failure is one line naming
    the folder, the component and the file; the libraries' own output is held back (`library_output`)."""
    if model in TINY:
        with library_output():
            pipe = build_tiny(model, seed)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    folder = Path(model)
    if not folder.exists():
        raise ScoreactionError(f"model must be a local diffusers pipeline folder or one of {TINY}, "
                               f"found {model!r} (no such folder)")
    if not (folder / "model_index.json").is_file():
        raise ScoreactionError(f"model folder {model!r} is not a diffusers pipeline (expected model_index.json in it)")
    index = read_config(folder / "model_index.json", f"model folder {model!r}: model_index.json")
    if not ({"unet", "transformer"} & set(index)):
        raise ScoreactionError(f"model folder {model!r}: expected a pipeline with a 'unet' or 'transformer', "
                               f"found components {sorted(index)}")
    with library_output():
        return load_folder(folder, index, dtype)


# --- a pipeline folder, component by component ------------------------------------------------------
SHOW_LIBRARY_OUTPUT = False  # the command line's --verbose: diffusers' and transformers' own output is shown
LIBRARIES = ("diffusers", "transformers")  # the only modules a model_index.json may name (nothing else is imported)


@contextlib.contextmanager
def library_output():
    """Hold back what diffusers and transformers print inside the block (their log lines below errors,
    progress bars, Python warnings, stdout and stderr), unless SHOW_LIBRARY_OUTPUT."""
    if SHOW_LIBRARY_OUTPUT:
        yield
        return
    import io
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]  # handlers on the real stderr
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, (level, bars) in zip(libraries, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def read_config(path: Path, where: str) -> dict:
    """A JSON object from a config file of a pipeline folder; otherwise one line naming it."""
    if not path.is_file():
        raise ScoreactionError(f"{where} is missing (expected the file {str(path)!r})")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise ScoreactionError(f"{where} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ScoreactionError(f"{where} must hold a JSON object, found {type(value).__name__}")
    return value


def check_weights(path: Path, where: str) -> None:
    """A safetensors file, whole: its header parses and its tensors end exactly at the end of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > min(size - 8, 100 * 2**20):
                raise ValueError("its header length is beyond the file")
            header = json.loads(fh.read(n))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as err:
        raise ScoreactionError(f"{where}: weights file {str(path)!r} is not a safetensors file ({err})") from None
    if 8 + n + end != size:
        raise ScoreactionError(f"{where}: weights file {str(path)!r} is truncated or padded ({size} bytes, its "
                               f"header describes {8 + n + end})")


def component_class(entry, name: str, where: str):
    """The class a model_index.json entry ["library", "Class"] names, from diffusers or transformers only."""
    import importlib

    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ScoreactionError(f"{where}: component {name!r} must be [library, class], found {entry!r}")
    library, cls_name = entry
    if library not in LIBRARIES:
        raise ScoreactionError(f"{where}: component {name!r} names the library {library!r}; expected one of {LIBRARIES}")
    cls = getattr(importlib.import_module(library), cls_name, None)
    if not isinstance(cls, type):
        raise ScoreactionError(f"{where}: component {name!r} names the class {cls_name!r}, which {library} does not have")
    return cls


def load_component(folder: Path, name: str, cls, dtype: torch.dtype):
    """One component from its subfolder: its config file read, its weights checked, then loaded by its class."""
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel

    sub, where = folder / name, f"model folder {str(folder)!r}: component {name!r} ({cls.__name__})"
    if not sub.is_dir():
        raise ScoreactionError(f"{where} is missing (expected the folder {str(sub)!r})")
    if issubclass(cls, SchedulerMixin):
        config_file = sub / "scheduler_config.json"
        config = read_config(config_file, f"{where}: {config_file.name}")
        check_scheduler_config(config, f"{where}: {str(config_file)!r}")
        try:
            return cls.from_config(config)
        except (ValueError, TypeError, KeyError, NotImplementedError) as err:
            raise ScoreactionError(f"{where}: {str(config_file)!r} is not a valid {cls.__name__} config "
                                   f"({_first_line(err)})") from None
    if not issubclass(cls, (ModelMixin, PreTrainedModel)):  # tokenizers, image processors
        try:
            return cls.from_pretrained(str(sub), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise ScoreactionError(f"{where} could not be loaded from {str(sub)!r} ({_first_line(err)})") from None
    read_config(sub / "config.json", f"{where}: config.json")
    weights = sorted(sub.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in sub.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth"))
        raise ScoreactionError(f"{where} has no safetensors weights in {str(sub)!r}"
                               + (f" (only {pickled}: pickle files, which scoreaction never loads)" if pickled else ""))
    for path in weights:
        check_weights(path, where)
    dtype_key = "torch_dtype" if issubclass(cls, ModelMixin) else "dtype"
    try:
        model, info = cls.from_pretrained(str(sub), local_files_only=True, use_safetensors=True,
                                          output_loading_info=True, **{dtype_key: dtype})
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise ScoreactionError(f"{where}: the weights in {str(sub)!r} do not fit its config.json "
                               f"({_first_line(err)})") from None
    for kind in ("missing_keys", "mismatched_keys"):
        found = list(info.get(kind) or [])
        if found:
            raise ScoreactionError(f"{where}: the weights in {str(sub)!r} do not fit its config.json "
                                   f"({len(found)} {kind.replace('_', ' ')}, e.g. {found[0]!r})")
    return model


def check_scheduler_config(config: dict, where: str) -> None:
    """The values a scheduler's config must hold for a Gaussian path: at least 2 training timesteps, finite betas."""
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 10**7:
        raise ScoreactionError(f"{where}: num_train_timesteps must be an integer in [2, 10000000], found {steps!r}")
    for key in ("beta_start", "beta_end", "shift"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < (1 if key != "shift" else 1e6)):
            raise ScoreactionError(f"{where}: {key} must be a number in (0, {1 if key != 'shift' else '1e6'}), "
                                   f"found {value!r}")


def check_loaded(pipe, folder: Path) -> None:
    """The values of the loaded denoiser and VAE that the task reads: sizes and the latent scale."""
    import math

    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser, where = getattr(pipe, name), f"model folder {str(folder)!r}: {str(folder / name / 'config.json')!r}"
    for key in ("sample_size", "in_channels"):
        value = denoiser.config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**16:
            raise ScoreactionError(f"{where}: {key} must be an integer in [1, 65536], found {value!r}")
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ScoreactionError(f"model folder {str(folder)!r}: the pipeline has no vae (expected one to decode latents)")
    scale = vae.config.get("scaling_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ScoreactionError(f"model folder {str(folder)!r}: {str(folder / 'vae' / 'config.json')!r}: "
                               f"scaling_factor must be a finite number > 0, found {scale!r}")


def load_folder(folder: Path, index: dict, dtype: torch.dtype):
    """The pipeline of a folder: its class and every component checked and loaded one by one (see load_component)."""
    import inspect

    import diffusers

    where = f"model folder {str(folder)!r}: model_index.json"
    pipeline_cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
        raise ScoreactionError(f"{where}: _class_name must name a diffusers pipeline, found {index.get('_class_name')!r}")
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or name not in parameters or not isinstance(entry, list):
            continue
        if entry in ([None, None], [None]) or entry[0] is None:
            components[name] = None
            continue
        components[name] = load_component(folder, name, component_class(entry, name, where), dtype)
    for name, parameter in parameters.items():
        if name != "self" and name not in components and parameter.kind is parameter.POSITIONAL_OR_KEYWORD \
                and parameter.default is parameter.empty:
            components[name] = None  # safety_checker, feature_extractor: not used here
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    try:
        pipe = pipeline_cls(**components)
    except (ValueError, TypeError, AttributeError) as err:
        raise ScoreactionError(f"model folder {str(folder)!r}: its components do not make a "
                               f"{pipeline_cls.__name__} ({_first_line(err)})") from None
    check_loaded(pipe, folder)
    pipe.register_to_config(_name_or_path=str(folder))
    return pipe


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". If you")[0][:300] if text else type(err).__name__


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
        device = self.pipe.text_encoder.device if self.pipe.text_encoder is not None else "cpu"
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


# --- identity of the base weights --------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_digest(model: str, pipe=None) -> str:
    """"sha256:HEX" of a pipeline's weights, so that a run can tell whether it resumes on the weights it was
    trained on. A folder: every weight file under it (WEIGHT_SUFFIXES), in sorted order, by relative path, size
    and bytes. A built-in tiny pipeline (`pipe` as built): each component's tensors by name, dtype, shape and
    bytes, before any adapter is added."""
    import hashlib

    digest = hashlib.sha256()
    if model in TINY:
        for name, component in sorted(pipe.components.items()):
            if isinstance(component, nn.Module):
                for key, tensor in sorted(component.state_dict().items()):
                    t = tensor.detach().cpu().contiguous()
                    digest.update(f"{name}.{key} {t.dtype} {tuple(t.shape)}\n".encode())
                    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"sha256:{digest.hexdigest()}"
    root = Path(model)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(f"{path.relative_to(root).as_posix()} {path.stat().st_size}\n".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(2**24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
