"""Rewards for the images of text-to-image pipelines, made from one spec string by `make_image_reward`.

Conventions (every reward here): `reward(images, cond=None) -> (B,)` float32 on the images' device, with
images a float tensor (B, 3, H, W) of decoded pipeline images, values in [0, 1] (not checked: a
sampler may overshoot; JPEG clamps, CLIP sees the values as given), and cond a LongTensor (B,) of
indices into the prompt list given at construction (or None where a reward needs no prompt).
Images are scored in micro-batches of `micro_batch` on `device`; `differentiable` says whether
gradients flow to the images (reward-gradient methods need it).

Specs:
  jpeg_compressibility, jpeg_incompressibility  -/+ the JPEG size in kB (1000 bytes) of each image
      as uint8, PIL quality 95: DDPO's rewards (Black et al. 2023). Not differentiable.
  clip:DIR         plain cosine similarity in [-1, 1] of CLIP's image and prompt embeddings (not
      x100, not clipped at 0), CLIP from the folder DIR (CLIPModel + tokenizer + preprocessor_config.json).
      The preprocessing (resize the shortest edge, bicubic with antialias; centre crop; normalise with
      the processor's mean and std) is done with torch ops, so the reward is differentiable.
      clip:shapes is the CLIP of the shipped shapes pipeline (docs/shapes.md).
  aesthetic:DIR    a LAION-style aesthetic predictor: a stack of Linear layers (no activations, as
      LAION's v2 predictor) on the normalised CLIP image embedding. DIR holds the CLIP model (as for
      clip:DIR) AND aesthetic_head.safetensors (keys "{i}.weight" (out, in), "{i}.bias" of the i-th
      Linear) + aesthetic_head.json ({"widths": [d_in, ..., 1]}). Ignores cond.
  learned:DIR      a Bradley-Terry ensemble fitted by scoreaction (rewards.preference) on images;
      cond is its class label, i.e. the prompt index.
  geneval, geneval:binary   the shapes checker's partial credit (or 1/0) for prompts[cond], captions of
      the shapes grammar (scoreaction/shapes, docs/shapes.md). Not differentiable.
  package.module:function   any callable (images, cond) -> (B,) float tensor; set an attribute
      `differentiable = True` on it to declare gradients. A spec that imports code is honoured only where
      the user gave it: a checkpoint that names one is refused unless the command line names it again
      (`--set task.reward=package.module:function`; see `imports_only`), since a checkpoint is data.
  NAME             a reward that an installed package declares as an entry point of the group
      `scoreaction.rewards` (pyproject: [project.entry-points."scoreaction.rewards"] NAME = "pkg.mod:fn"),
      a callable as above; a checkpoint may name it, as it names a built-in reward.

The public LAION predictor (sac+logos+ava1-l14-linearMSE.pth, for CLIP ViT-L/14) converts once,
unpickled by you with torch.load (scoreaction never unpickles):

    sd = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    linears = [(sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]) for i in (0, 2, 4, 6, 7)]
    save_aesthetic_head("laion-aesthetic", linears)  # widths [768, 1024, 128, 64, 16, 1]
    CLIPModel.from_pretrained("openai/clip-vit-large-patch14").save_pretrained("laion-aesthetic")
    CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14").save_pretrained("laion-aesthetic")

(indices 1, 3, 5 of its nn.Sequential are Dropouts), then use "aesthetic:laion-aesthetic".
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scoreaction.errors import ScoreactionError

HEAD_WEIGHTS, HEAD_CONFIG = "aesthetic_head.safetensors", "aesthetic_head.json"
NAMES = ("jpeg_compressibility", "jpeg_incompressibility", "clip:DIR", "aesthetic:DIR", "learned:DIR",
         "geneval[:binary]", "package.module:function", "an entry point of scoreaction.rewards")
ENTRY_POINTS = "scoreaction.rewards"
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def as_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', found {device!r}") from None


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class ImageReward:
    """The shared machinery: input checks, micro-batches on `device`, output checks. Subclasses
    implement score(images, cond) -> (b,) on one micro-batch already on self.device."""

    differentiable = False
    channels: int | None = 3

    def __init__(self, name: str, device: str | torch.device = "cpu", micro_batch: int = 16):
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, found {micro_batch!r}")
        self.name, self.micro_batch, self.device = name, micro_batch, as_device(device)

    def to(self, device: str | torch.device) -> ImageReward:
        """Score on `device` from now on: the reward's modules move there. Returns self."""
        self.device = as_device(device)
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(self.device)
        return self

    def score(self, images: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def check_images(self, images) -> None:
        if (not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point()
                or (self.channels is not None and images.shape[1] != self.channels)):
            raise ValueError(f"reward {self.name!r} expects float images (B, {self.channels or 'C'}, H, W), "
                             f"found {describe(images)}")

    def __call__(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_images(images)
        B = images.shape[0]
        if cond is not None:
            cond = torch.as_tensor(cond, device=images.device)
            if cond.is_floating_point() or cond.is_complex() or cond.ndim > 1 or cond.numel() not in (1, B):
                raise ValueError(f"cond must be integer prompt indices of shape ({B},), found {describe(cond)}")
            cond = cond.long().reshape(-1).expand(B)
        out = []
        for i in range(0, B, self.micro_batch):
            x = images[i:i + self.micro_batch].to(self.device)
            r = self.score(x, None if cond is None else cond[i:i + self.micro_batch].to(self.device))
            if not torch.is_tensor(r) or r.shape != (len(x),) or not r.is_floating_point():
                raise ValueError(f"reward {self.name!r} returned {describe(r)}, expected a float tensor of shape "
                                 f"({len(x)},)")
            if not bool(torch.isfinite(r).all()):
                raise ValueError(f"reward {self.name!r} returned non-finite values")
            out.append(r.float().to(images.device))
        return torch.cat(out) if out else torch.zeros(0, device=images.device)


class JPEGSize(ImageReward):
    """sign * JPEG size in kB of each image: quantised as round(255 x) clamped to [0, 255], PIL quality 95."""

    def __init__(self, sign: float, **options):
        super().__init__("jpeg_compressibility" if sign < 0 else "jpeg_incompressibility", **options)
        self.sign = sign

    def score(self, images, cond):
        pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([self.sign * jpeg_bytes(p) / 1000 for p in pixels], dtype=torch.float32)


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> int:
    """Size in bytes of PIL's JPEG encoding of one uint8 image (H, W, 3)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


# --- CLIP ------------------------------------------------------------------------------------------

def load_clip(folder: str | os.PathLike, spec: str) -> tuple[nn.Module, dict]:
    """CLIPModel (frozen, eval) and its preprocessing {resize, crop, mean, std} from a local folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"reward {spec!r}: expected a folder holding a CLIP model, found no folder {str(folder)!r}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clip":
        raise ValueError(f"reward {spec!r}: folder {str(folder)!r} holds no CLIP model (expected config.json with "
                         f"model_type 'clip', found {'no readable config.json' if model_type is None else model_type})")
    try:
        proc = json.loads((folder / "preprocessor_config.json").read_text())
        size, crop = proc.get("size", proc["crop_size"]), proc["crop_size"]
        crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        resize = size if isinstance(size, int) else size.get("shortest_edge") or (int(size["height"]),
                                                                                   int(size["width"]))
        normalise = proc.get("do_normalize", True)
        mean = proc.get("image_mean", [0.0] * 3) if normalise else [0.0] * 3
        std = proc.get("image_std", [1.0] * 3) if normalise else [1.0] * 3
        prep = {"resize": resize, "crop": crop, "mean": torch.tensor(mean).reshape(1, 3, 1, 1),
                "std": torch.tensor(std).reshape(1, 3, 1, 1)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ValueError(f"reward {spec!r}: folder {str(folder)!r} has no valid preprocessor_config.json "
                         f"(CLIP image processor: {type(err).__name__})") from None
    from transformers import CLIPModel
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"reward {spec!r}: cannot load the CLIP model in {str(folder)!r} "
                         f"({first_line(err)})") from None
    check_finite_weights(model, f"reward {spec!r}: the CLIP model in {str(folder)!r}")
    return model.eval().requires_grad_(False), prep


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Every floating weight and buffer of a loaded model is finite; otherwise a ValueError naming the first
    tensor that is not (a model with a NaN weight scores NaN, or worse, something plausible)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} has non-finite values (NaN or inf) in tensor {name!r}")


def preprocess(images: torch.Tensor, prep: dict) -> torch.Tensor:
    """CLIP's image processor in torch ops: resize (shortest edge to `resize`, or to (h, w)) bicubic with
    antialias, centre crop to `crop`, normalise. Differentiable; the identity resize is skipped."""
    x = images.float()
    H, W = x.shape[-2:]
    if isinstance(prep["resize"], int):  # shortest edge, as transformers' get_resize_output_image_size
        short, long = (H, W) if H <= W else (W, H)
        new_short, new_long = prep["resize"], int(prep["resize"] * long / short)
        size = (new_short, new_long) if H <= W else (new_long, new_short)
    else:
        size = tuple(prep["resize"])
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    (h, w), (ch, cw) = x.shape[-2:], prep["crop"]
    if ch > h or cw > w:
        raise ValueError(f"CLIP crop {ch}x{cw} is larger than the resized image {h}x{w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[..., top:top + ch, left:left + cw]
    return (x - prep["mean"].to(x)) / prep["std"].to(x)


def features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def image_embeddings(model: nn.Module, prep: dict, images: torch.Tensor) -> torch.Tensor:
    """(B, D) normalised CLIP image embeddings of images (B, 3, H, W) in [0, 1]; differentiable."""
    pixels = preprocess(images, prep).to(model.dtype)
    return F.normalize(features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


class CLIPScore(ImageReward):
    """cos(CLIP image embedding, CLIP text embedding of prompts[cond]), text embeddings cached per prompt text.

    `prompts` is kept, not copied, and read at each call: prompts appended to it later (an append-only
    table such as models.pipeline.Prompts.texts) are scored too."""

    differentiable = True

    def __init__(self, folder, prompts: list[str] | None, spec: str, **options):
        super().__init__(spec, **options)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"reward {spec!r} needs prompts (a non-empty list of strings), found {prompts!r}")
        model, self.prep = load_clip(folder, spec)
        folder = Path(folder)
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            # transformers would silently build an empty CLIP tokenizer from config.json alone
            raise ValueError(f"reward {spec!r}: folder {str(folder)!r} has no CLIP tokenizer "
                             "(expected tokenizer.json or vocab.json + merges.txt)")
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"reward {spec!r}: cannot load the CLIP tokenizer in {str(folder)!r} "
                             f"({first_line(err)})") from None
        self.model, self.prompts, self.text = model.to(self.device), prompts, {}

    def to(self, device: str | torch.device) -> CLIPScore:
        super().to(device)
        self.text = {k: v.to(self.device) for k, v in self.text.items()}
        return self

    def text_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """(b, D) normalised text embeddings of prompts[cond]; each prompt text is encoded once, then cached."""
        if cond is None:
            raise ValueError(f"reward {self.name!r} needs cond (prompt indices), found None")
        bad = sorted({i for i in cond.tolist() if not 0 <= i < len(self.prompts)})
        if bad:
            raise ValueError(f"prompt indices must lie in [0, {len(self.prompts)}), found {bad[:5]}")
        texts = [self.prompts[i] for i in cond.tolist()]
        new = [t for t in dict.fromkeys(texts) if t not in self.text]
        if new:
            length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=length,
                                    return_tensors="pt").to(self.device)
            with torch.no_grad():
                t = features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"]))
            self.text.update(zip(new, F.normalize(t.float(), dim=-1)))
        return torch.stack([self.text[t] for t in texts])

    def score(self, images, cond):
        return (image_embeddings(self.model, self.prep, images) * self.text_embeddings(cond)).sum(-1)


class AestheticScore(ImageReward):
    """head(normalised CLIP image embedding): LAION's aesthetic predictor v2 form. Ignores prompts and cond."""

    differentiable = True

    def __init__(self, folder, spec: str, **options):
        super().__init__(spec, **options)
        model, self.prep = load_clip(folder, spec)
        self.model = model.to(self.device)
        self.head = load_aesthetic_head(folder, model.config.projection_dim).to(self.device)

    def score(self, images, cond):
        return self.head(image_embeddings(self.model, self.prep, images)).squeeze(-1)


def save_aesthetic_head(folder: str | os.PathLike, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Write Linear layers [(weight (out, in), bias (out,)), ...] as aesthetic_head.safetensors + .json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"{i}.{name}": t.detach().float().contiguous()
             for i, linear in enumerate(layers) for name, t in zip(("weight", "bias"), linear)}
    widths = [int(layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in layers]
    save_file(state, str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(json.dumps({"widths": widths}))
    return folder


def load_aesthetic_head(folder: str | os.PathLike, embed_dim: int) -> nn.Sequential:
    """The Linear stack of aesthetic_head.{json,safetensors}; its widths must run from embed_dim to 1."""
    folder = Path(folder)
    json_path, weights_path = folder / HEAD_CONFIG, folder / HEAD_WEIGHTS
    try:
        widths = json.loads(json_path.read_text())["widths"]
    except (OSError, ValueError, KeyError, TypeError):
        widths = None
    if not (isinstance(widths, list) and len(widths) >= 2 and all(type(w) is int and w > 0 for w in widths)):
        raise ValueError(f"aesthetic head {str(json_path)!r} is missing or not {{'widths': [d_in, ..., 1]}}")
    if widths[0] != embed_dim or widths[-1] != 1:
        raise ValueError(f"aesthetic head widths must run from the CLIP embedding size {embed_dim} to 1, "
                         f"found {widths}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"aesthetic head {str(weights_path)!r} is missing or corrupt ({err})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"aesthetic head {str(weights_path)!r} has non-finite values (NaN or inf) in tensor {bad!r}")
    head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        bad = sorted(set(found) ^ set(expected)) or sorted(k for k in expected if found[k] != expected[k])
        raise ValueError(f"aesthetic head {str(weights_path)!r} does not match widths {widths}: {bad[0]} "
                         f"expected {expected.get(bad[0], 'absent')}, found {found.get(bad[0], 'absent')}")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


# --- learned and user rewards ----------------------------------------------------------------------

class LearnedReward(ImageReward):
    """A scoreaction Bradley-Terry model (BTRewardModel) on images; cond is its class label (prompt index)."""

    differentiable = True

    def __init__(self, folder, spec: str, **options):
        super().__init__(spec, **options)
        from scoreaction.rewards.preference import load_reward_model
        try:
            self.model = load_reward_model(folder).to(self.device)
        except ValueError as err:
            raise ValueError(f"reward {spec!r}: {err}") from None
        if len(self.model.shape) != 3:
            raise ValueError(f"reward {spec!r}: expected a model of images (C, H, W), "
                             f"found sample shape {self.model.shape}")
        self.channels = self.model.shape[0]

    def check_images(self, images) -> None:
        super().check_images(images)
        if tuple(images.shape[1:]) != self.model.shape:
            raise ValueError(f"reward {self.name!r} was fitted on images of shape {self.model.shape}, "
                             f"found images of shape {tuple(images.shape[1:])}")

    def score(self, images, cond):
        return self.model(images.float(), cond)


class FunctionReward(ImageReward):
    """A user function (images, cond) -> (B,), with the shared input and output checks."""

    def __init__(self, fn, spec: str, **options):
        super().__init__(spec, **options)
        self.fn, self.differentiable = fn, bool(getattr(fn, "differentiable", False))

    def score(self, images, cond):
        try:
            return self.fn(images, cond)
        except Exception as err:  # a user function may fail in any way: one line naming it
            raise ValueError(f"reward {self.name!r} failed on images of shape {tuple(images.shape)}: "
                             f"{first_line(err)}") from None


_imports: contextvars.ContextVar = contextvars.ContextVar("reward_imports", default=None)


@contextlib.contextmanager
def imports_only(allowed: Iterable[str], source: str):
    """Within the block, a `package.module:function` reward is imported only if its spec is in `allowed`
    (the specs the user gave on the command line); any other is a one-line ScoreactionError naming `source`
    (e.g. "checkpoint 'RUN/...'"), and its module is never imported. Outside, every spec is imported."""
    token = _imports.set((frozenset(allowed), source))
    try:
        yield
    finally:
        _imports.reset(token)


def import_function(spec: str):
    policy = _imports.get()
    if policy is not None and spec not in policy[0]:
        raise ScoreactionError(f"{policy[1]} names reward {spec!r}, a module of code; pass it on the command line "
                               f"to run it (--set task.reward={spec})")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # a user module may fail in any way while importing
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({first_line(err)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: expected a callable (images, cond) -> (B,) tensor, found a "
                         f"{type(obj).__name__}")
    return obj


def make_image_reward(spec: str, *, prompts: list[str] | None = None, device: str | torch.device = "cpu",
                      micro_batch: int = 16) -> ImageReward:
    """The image reward named by `spec` (see the module docstring); bad specs are one-line ValueErrors."""
    if not isinstance(spec, str):
        raise ValueError(f"reward spec must be a string, found {type(spec).__name__}")
    options = {"device": device, "micro_batch": micro_batch}
    name, colon, arg = spec.partition(":")
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        if colon:
            raise ValueError(f"reward {name!r} takes no argument, found {spec!r}")
        return JPEGSize(-1.0 if name == "jpeg_compressibility" else 1.0, **options)
    if name in ("clip", "aesthetic", "learned"):
        if not arg:
            raise ValueError(f"reward {name!r} needs a folder: expected '{name}:DIR', found {spec!r}")
        if name == "clip":
            from scoreaction.models.pipeline_load import NAMED
            folder = str(NAMED[arg] / "clip") if arg in NAMED else arg  # clip:shapes: the shipped CLIP
            return CLIPScore(folder, prompts, spec, **options)
        return (AestheticScore if name == "aesthetic" else LearnedReward)(arg, spec, **options)
    if name == "geneval":
        from scoreaction.shapes.reward import GenEvalReward
        return GenEvalReward(prompts, spec, **options)
    if colon and DOTTED.fullmatch(name) and DOTTED.fullmatch(arg):
        return FunctionReward(import_function(spec), spec, **options)
    if not colon:
        fn = entry_point_reward(spec)
        if fn is not None:
            return FunctionReward(fn, spec, **options)
    raise ValueError(f"unknown image reward {spec!r}; expected one of {', '.join(NAMES)}")


def entry_point_reward(name: str):
    """The callable that the entry point `name` of the group `scoreaction.rewards` names, or None if none does."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS):
        if entry.name == name:
            try:
                fn = entry.load()
            except Exception as err:  # a plugin may fail in any way: one line naming it
                raise ValueError(f"reward plugin {name!r} ({entry.value}) failed to load: {first_line(err)}") from None
            if not callable(fn):
                raise ValueError(f"reward plugin {name!r} ({entry.value}) is a {type(fn).__name__}, not a callable "
                                 f"(images, cond) -> (B,) tensor")
            return fn
    return None


__all__ = ["make_image_reward", "imports_only", "ImageReward", "JPEGSize", "CLIPScore", "AestheticScore",
           "LearnedReward", "FunctionReward", "preprocess", "save_aesthetic_head", "load_aesthetic_head", "jpeg_bytes"]
