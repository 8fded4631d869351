"""Building and loading diffusers pipelines: the built-in tiny ones from configs, and local folders checked
component by component, with the libraries' own output held back; the digest of a pipeline's weights.

Nothing is fetched: a folder is read with `local_files_only`, and a model_index.json may name only classes of
diffusers and transformers (nothing else is imported).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from scoreaction.errors import ScoreactionError

TINY = ("tiny-sd", "tiny-sd3")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
NAMED = {"shapes": ASSETS / "shapes"}  # pipelines shipped in the package (docs/shapes.md), by name


def model_folder(model: str) -> Path:
    """The folder of a pipeline named by `model`: a shipped one by name (NAMED), else the path itself."""
    return NAMED.get(model, Path(model))


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
    folder = model_folder(model)
    if model in NAMED and not (folder / "model_index.json").is_file():
        raise ScoreactionError(f"the shipped {model!r} pipeline is missing from this installation (expected "
                               f"{folder}/model_index.json): reinstall scoreaction")
    if not folder.exists():
        raise ScoreactionError(f"model must be a local diffusers pipeline folder, one of {TINY} or "
                               f"{tuple(NAMED)}, "
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
    root = model_folder(model)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(f"{path.relative_to(root).as_posix()} {path.stat().st_size}\n".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(2**24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
