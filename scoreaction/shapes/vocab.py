"""The tokenizer of the shapes model: CLIP's byte-level BPE whose merges spell each word of the grammar as
one token, built offline.

The vocabulary is CLIP's 256 byte characters, the same with the end-of-word suffix "</w>" (as
models/tiny_clip.py), then the tokens the merges make, then "<|startoftext|>" and "<|endoftext|>" (the
largest id, as in CLIP, so that pooling at argmax(input_ids) and at the first eos agree). The merges are
learned by byte-pair encoding on WORDS, each word once, until every word is a single symbol; ties between
equally frequent pairs go to the pair that sorts first. So every word of the grammar is one token and any
other text still tokenizes, byte by byte. model_max_length is MODEL_MAX_LENGTH: the longest caption of the
grammar, with GenEval's "a photo of " in front, is 13 tokens with the start and end tokens.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from scoreaction.models.tiny_clip import BOS, EOS, bytes_to_unicode
from scoreaction.shapes.grammar import COLOURS, NUMBERS, RELATIONS, SHAPES

MODEL_MAX_LENGTH = 16
WORDS = tuple(dict.fromkeys(["a", "and", "photo", "of", *SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *NUMBERS,
                             *(w for r in RELATIONS for w in r.split())]))


def symbols(word: str) -> tuple[str, ...]:
    """A word as CLIP's BPE starts it: its characters, the last with "</w>"."""
    return tuple(word[:-1]) + (word[-1] + "</w>",)


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Every occurrence of `pair` in `word`, left to right, joined into one symbol."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@functools.cache
def learn_merges(words: tuple[str, ...] = WORDS) -> tuple[tuple[str, str], ...]:
    """BPE merges, in rank order, until each of `words` is one symbol (module docstring)."""
    spelt, merges = [symbols(w) for w in words], []
    while any(len(w) > 1 for w in spelt):
        counts = Counter(p for w in spelt for p in zip(w, w[1:]))
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        spelt = [merge_pair(w, pair) for w in spelt]
    return tuple(merges)


def vocabulary(words: tuple[str, ...] = WORDS) -> dict[str, int]:
    """token -> id: byte characters, byte characters with "</w>", merged tokens, BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in learn_merges(words)]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(folder: str | os.PathLike, words: tuple[str, ...] = WORDS) -> None:
    """vocab.json and merges.txt of the shapes tokenizer into `folder`."""
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocabulary(words), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in learn_merges(words)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def shapes_tokenizer():
    """The CLIPTokenizer of the shapes model; pad_token "<|endoftext|>" as Stable Diffusion's."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS,
                                             local_files_only=True)


__all__ = ["MODEL_MAX_LENGTH", "WORDS", "learn_merges", "shapes_tokenizer", "vocabulary", "write_tokenizer_files"]
