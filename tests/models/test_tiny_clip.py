"""Tiny random CLIP models built offline: the tokenizer's vocabulary, saving and loading, seeds."""

import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel

from scoreaction.models.tiny_clip import (
    MODEL_MAX_LENGTH,
    TINY_TEXT_CONFIG,
    TINY_VOCAB_SIZE,
    bytes_to_unicode,
    tiny_tokenizer,
    write_tiny_aesthetic,
    write_tiny_clip,
)
from scoreaction.rewards.images import load_aesthetic_head


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0, image_size=32)


def test_bytes_to_unicode_is_clips_map():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"  # GPT-2 / CLIP's printable stand-ins


def test_tokenizer_vocabulary_special_tokens_and_padding():
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    assert len(vocab) == TINY_VOCAB_SIZE == 514
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == 512
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 513
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 513
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    ids = tok("A cat").input_ids  # lower-cased, spelt byte by byte, "</w>" on the last byte of a word
    assert ids == [512, vocab["a</w>"], vocab["c"], vocab["a"], vocab["t</w>"], 513]
    padded = tok(["a cat", "a much longer prompt"], padding="max_length", max_length=77).input_ids
    assert [len(p) for p in padded] == [77, 77] and padded[0][6:] == [513] * 71


def test_tokenizer_is_deterministic_and_covers_every_byte():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "héllo wörld, 東京 🙂 #42"
    ids = a(text).input_ids
    assert ids == b(text).input_ids
    assert 513 not in ids[1:-1]  # no byte falls back to the unknown token (= <|endoftext|>)
    decoded = a.decode(ids, skip_special_tokens=True)  # CLIP decodes every pre-token as a word: "#42" -> "# 4 2"
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_text_encoder_for_the_tokenizer_pools_at_the_end_of_text():
    tok = tiny_tokenizer()
    ids = tok(["a cat", "a dog on a bike"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    ends = (ids == tok.eos_token_id).int().argmax(-1)  # the first <|endoftext|> of each row
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    out = encoder(ids)
    assert out.last_hidden_state.shape == (2, 77, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), ends])
    # <|endoftext|> has the largest id, so configs with the legacy eos_token_id=2 (pooling at argmax(input_ids),
    # as diffusers' tiny test pipelines) pool at the same place
    torch.manual_seed(0)
    legacy = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, "eos_token_id": 2})).eval()
    assert tok.eos_token_id == max(tok.get_vocab().values())
    torch.testing.assert_close(legacy(ids).pooler_output, out.pooler_output)


def test_written_clip_loads_with_transformers(clip_folder):
    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True)
    cfg = model.config
    assert (cfg.projection_dim, cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers,
            cfg.vision_config.num_attention_heads, cfg.vision_config.image_size) == (16, 32, 2, 4, 32)
    assert cfg.vision_config.patch_size in (4, 8)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.vocab_size) == (32, 2, 514)
    processor = CLIPProcessor.from_pretrained(clip_folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(clip_folder, local_files_only=True)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab() and tokenizer.pad_token == "<|endoftext|>"
    inputs = processor(text=["a cat", "a dog"], images=[torch.zeros(40, 48, 3, dtype=torch.uint8).numpy()] * 2,
                       padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    out = model(**inputs)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    a = CLIPModel.from_pretrained(write_tiny_clip(tmp_path / "a", seed=3), local_files_only=True).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = CLIPModel.from_pretrained(write_tiny_clip(tmp_path / "b", seed=3), local_files_only=True).state_dict()
    c = CLIPModel.from_pretrained(write_tiny_clip(tmp_path / "c", seed=4), local_files_only=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "visual_projection.weight"
    assert not torch.equal(a[key], c[key])


def test_image_size_sets_the_processor_and_bad_sizes_are_refused(tmp_path):
    folder = write_tiny_clip(tmp_path / "clip16", image_size=16)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["crop_size"] == {"height": 16, "width": 16} and config["size"] == {"shortest_edge": 16}
    assert CLIPModel.from_pretrained(folder, local_files_only=True).config.vision_config.image_size == 16
    with pytest.raises(ValueError, match="image_size"):
        write_tiny_clip(tmp_path / "bad", image_size=2)


def test_tiny_aesthetic_writes_a_loadable_head(tmp_path):
    folder = write_tiny_aesthetic(tmp_path / "aes", seed=1)
    assert json.loads((folder / "aesthetic_head.json").read_text())["widths"][0] == 16
    head = load_aesthetic_head(folder, embed_dim=16)
    assert head(torch.randn(5, 16)).shape == (5, 1)
    again = load_aesthetic_head(write_tiny_aesthetic(tmp_path / "again", seed=1), embed_dim=16)
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), again.parameters()))
