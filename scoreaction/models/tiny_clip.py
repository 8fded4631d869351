"""Tiny, randomly initialised CLIP models built offline from configs, for tests and smoke runs.

Nothing here downloads. The tokenizer is CLIP's byte-level BPE with no merges: its vocabulary is
the 256 byte characters of CLIP's `bytes_to_unicode`, the same 256 with the end-of-word suffix
"</w>", then "<|startoftext|>" (id 512) and "<|endoftext|>" (id 513): 514 tokens, in the order of
the real CLIP vocabulary (which has its 48894 merges between the byte tokens and the two specials).
Every word is spelt byte by byte, so any text tokenizes. model_max_length is 77 as in CLIP and
Stable Diffusion, and padding uses "<|endoftext|>" as SD's tokenizer does.

A text encoder for this tokenizer needs vocab_size >= TINY_VOCAB_SIZE (514) and
max_position_embeddings >= 77; TINY_TEXT_CONFIG sets bos_token_id = 512 and eos_token_id = 513. As
"<|endoftext|>" has the largest id, configs with the legacy eos_token_id = 2 (which pool the text at
argmax(input_ids), as diffusers' tiny test pipelines) pool at the same token.

Folders written by `write_tiny_clip` load with `CLIPModel.from_pretrained(folder, local_files_only=True)`,
`CLIPProcessor.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`;
`write_tiny_aesthetic` adds an aesthetic head in the format of `scoreaction.rewards.images`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_VOCAB_SIZE = 514
MODEL_MAX_LENGTH = 77
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's normalisation
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_TEXT_CONFIG = {"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": MODEL_MAX_LENGTH,
                    "bos_token_id": TINY_VOCAB_SIZE - 2, "eos_token_id": TINY_VOCAB_SIZE - 1,
                    "pad_token_id": TINY_VOCAB_SIZE - 1}
TINY_AESTHETIC_WIDTHS = [16, 8, 1]  # the head's Linear widths, from the CLIP projection_dim (16) to 1


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> dict[str, int]:
    """token -> id: the byte characters, the same with "</w>", then BOS and EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    assert len(tokens) == TINY_VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def tiny_tokenizer():
    """A CLIPTokenizer with the 514-token byte-level vocabulary above and no merges, built offline.

    Deterministic; model_max_length = 77; pad_token = "<|endoftext|>" (as Stable Diffusion's)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS,
                                             local_files_only=True)


def tiny_clip_config(image_size: int = 32):
    """CLIPConfig of a tiny CLIP: width 32, 2 layers, 4 heads, projection_dim 16, patches of image_size / 4."""
    from transformers import CLIPConfig

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an integer >= 4, found {image_size!r}")
    patch = 8 if image_size % 8 == 0 and image_size >= 16 else 4 if image_size % 4 == 0 else image_size
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": image_size, "patch_size": patch}
    return CLIPConfig(text_config=dict(TINY_TEXT_CONFIG), vision_config=vision, projection_dim=16)


def image_processor(image_size: int):
    """CLIP's image processor (PIL backend where transformers has one: it needs no torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                     image_mean=CLIP_MEAN, image_std=CLIP_STD)


def write_tiny_clip(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A random tiny CLIPModel with its tokenizer and image processor, saved into `folder`.

    The same seed gives identical weights; the global RNG is left alone."""
    from transformers import CLIPModel

    folder = Path(folder)
    config = tiny_clip_config(image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    image_processor(image_size).save_pretrained(folder)
    return folder


def write_tiny_aesthetic(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIP (write_tiny_clip) plus a random aesthetic head (aesthetic_head.safetensors + .json)
    of Linear widths TINY_AESTHETIC_WIDTHS, in the same folder: the `aesthetic:DIR` format."""
    from scoreaction.rewards.images import save_aesthetic_head

    folder = write_tiny_clip(folder, seed, image_size)
    gen = torch.Generator().manual_seed(seed + 1)
    widths = TINY_AESTHETIC_WIDTHS
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):  # nn.Linear's initialisation, U(-1/sqrt(fan_in), ...)
        bound = fan_in ** -0.5
        layers.append(((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound,
                       (torch.rand(fan_out, generator=gen) * 2 - 1) * bound))
    return save_aesthetic_head(folder, layers)


__all__ = ["tiny_tokenizer", "tiny_clip_config", "write_tiny_clip", "write_tiny_aesthetic", "bytes_to_unicode",
           "TINY_VOCAB_SIZE", "TINY_TEXT_CONFIG", "MODEL_MAX_LENGTH"]
