"""Image rewards: JPEG size, CLIP score, aesthetic head, learned Bradley-Terry model, user functions.

Every CLIP here is a tiny random one written offline (scoreaction.models.tiny_clip); the reference
values are computed by hand with transformers' own CLIPModel and PIL."""

import io
import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from scoreaction.models.tiny_clip import CLIP_MEAN, CLIP_STD, tiny_tokenizer, write_tiny_aesthetic
from scoreaction.rewards import RewardModel
from scoreaction.rewards.images import ImageReward, load_clip, make_image_reward, preprocess, save_aesthetic_head
from scoreaction.rewards.preference import Comparisons, fit_reward_model

PROMPTS = ["a photo of a cat", "a red bicycle", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (crop 32) with an aesthetic head (widths [16, 8, 1]) in one folder."""
    return write_tiny_aesthetic(tmp_path_factory.mktemp("tiny") / "clip", seed=0, image_size=32)


@pytest.fixture(scope="module")
def clip_model(clip_dir):
    return CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()


def rand_images(B, H=32, W=32, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def normalise(x):
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def features(out):
    return out if torch.is_tensor(out) else out.pooler_output


# --- JPEG ------------------------------------------------------------------------------------------

def pil_jpeg_kb(image: torch.Tensor) -> float:
    pixels = np.clip(np.rint(image.double().numpy() * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_match_pil_and_rank_flat_above_noise():
    compress = make_image_reward("jpeg_compressibility")
    incompress = make_image_reward("jpeg_incompressibility")
    assert not compress.differentiable and not incompress.differentiable
    grey = torch.full((1, 3, 32, 32), 0.5)
    noise = rand_images(1)
    assert compress(grey) > compress(noise) + 1.0  # at least 1 kB apart
    for x in (torch.cat([grey, noise]), rand_images(3, 24, 40, seed=1) * 1.2 - 0.1):  # out of range: clamped
        r = compress(x)
        assert r.dtype == torch.float32 and r.shape == (len(x),)
        assert torch.equal(r, torch.tensor([-pil_jpeg_kb(img) for img in x], dtype=torch.float32))  # exact
        assert torch.equal(incompress(x), -r)


def test_jpeg_micro_batches_give_the_same_values():
    x = rand_images(7, 16, 16)
    assert torch.equal(make_image_reward("jpeg_compressibility", micro_batch=2)(x),
                       make_image_reward("jpeg_compressibility", micro_batch=16)(x))


# --- CLIP ------------------------------------------------------------------------------------------

def test_torch_preprocessing_matches_clips_own_image_processor(clip_dir):
    _, prep = load_clip(clip_dir, "clip:test")
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    for H, W in [(32, 32), (64, 48), (40, 72)]:
        u8 = (F.avg_pool2d(torch.rand(2, 3, H, W, generator=gen), 3, 1, 1) * 255).round().to(torch.uint8)
        ref = processor(images=[Image.fromarray(a.permute(1, 2, 0).numpy()) for a in u8],
                        return_tensors="pt")["pixel_values"]
        ours = preprocess(u8.float() / 255, prep)
        assert ours.shape == ref.shape == (2, 3, 32, 32)
        # PIL resamples to uint8: one grey level / std ~ 0.015 apart at most; no resize: equal
        assert (ours - ref).abs().max() < (1e-5 if H == W == 32 else 0.02)


def test_clip_score_is_the_cosine_of_clips_embeddings(clip_dir, clip_model):
    reward = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS)
    assert isinstance(reward, RewardModel) and isinstance(reward, ImageReward) and reward.differentiable
    x, cond = rand_images(5), torch.tensor([0, 1, 2, 1, 0])
    r = reward(x, cond)
    assert r.shape == (5,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    assert (r.abs() <= 1).all()
    tokens = tiny_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = features(clip_model.get_text_features(input_ids=tokens["input_ids"]))
        image = features(clip_model.get_image_features(pixel_values=normalise(x)))
    expected = F.cosine_similarity(image, text[cond], dim=-1)
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=0)
    # the prompt matters: the same images scored against another prompt
    assert not torch.allclose(reward(x, torch.zeros(5, dtype=torch.long)), reward(x, torch.ones(5, dtype=torch.long)))


def test_clip_score_of_other_sizes_resizes_and_crops(clip_dir, clip_model):
    x = rand_images(2, 48, 64, seed=3)  # shortest edge 48 -> 32: 32 x 42, then the centre 32 x 32 (columns 5..37)
    r = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS)(x, torch.tensor([2, 0]))
    resized = F.interpolate(x, size=(32, 42), mode="bicubic", antialias=True, align_corners=False)[..., 5:37]
    tokens = tiny_tokenizer()([PROMPTS[2], PROMPTS[0]], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.cosine_similarity(features(clip_model.get_image_features(pixel_values=normalise(resized))),
                                       features(clip_model.get_text_features(**tokens)), dim=-1)
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=0)


def test_clip_score_has_finite_gradients_and_micro_batches_agree(clip_dir):
    x = rand_images(8, 40, 40).requires_grad_(True)
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    r1 = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS, micro_batch=1)(x, cond)
    r8 = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS, micro_batch=8)(x, cond)
    torch.testing.assert_close(r1, r8, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(r8.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    (grad1,) = torch.autograd.grad(r1.sum(), x)
    torch.testing.assert_close(grad1, grad, atol=1e-6, rtol=1e-4)


def test_clip_text_embeddings_are_computed_once_per_prompt(clip_dir):
    reward = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS, micro_batch=2)
    encoded = []
    original = reward.model.get_text_features

    def counting(*args, **kwargs):
        encoded.append(len(kwargs["input_ids"]))
        return original(*args, **kwargs)

    reward.model.get_text_features = counting
    x = rand_images(6)
    first = reward(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert sum(encoded) == 2  # prompts 0 and 1, each once, although 3 micro-batches used them
    assert torch.equal(reward(x, torch.tensor([0, 1, 0, 1, 0, 1])), first)
    reward(x, torch.tensor([2, 2, 1, 0, 2, 1]))
    assert sum(encoded) == 3


def test_clip_reads_prompts_appended_after_construction(clip_dir):
    prompts = list(PROMPTS[:2])  # an append-only prompt table, as models.pipeline.Prompts.texts
    reward = make_image_reward(f"clip:{clip_dir}", prompts=prompts)
    x = rand_images(2)
    one_line_error(lambda: reward(x, torch.tensor([0, 2])), r"\[0, 2\)")
    prompts.append(PROMPTS[2])
    full = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS)
    torch.testing.assert_close(reward(x, torch.tensor([0, 2])), full(x, torch.tensor([0, 2])), atol=1e-6, rtol=0)


def test_clip_errors_are_one_line(clip_dir, tmp_path):
    one_line_error(lambda: make_image_reward(f"clip:{tmp_path / 'nowhere'}", prompts=PROMPTS), "no folder")
    one_line_error(lambda: make_image_reward(f"clip:{tmp_path}", prompts=PROMPTS), "holds no CLIP model")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    one_line_error(lambda: make_image_reward(f"clip:{tmp_path / 'unet'}", prompts=PROMPTS), "model_type 'clip'")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(clip_dir / name, no_weights / name)
    one_line_error(lambda: make_image_reward(f"clip:{no_weights}", prompts=PROMPTS), "cannot load the CLIP model")
    shutil.copy(clip_dir / "model.safetensors", no_weights / "model.safetensors")
    one_line_error(lambda: make_image_reward(f"clip:{no_weights}", prompts=PROMPTS), "has no CLIP tokenizer")
    (no_weights / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00truncated")
    one_line_error(lambda: make_image_reward(f"clip:{no_weights}", prompts=PROMPTS), "cannot load the CLIP model")
    (no_weights / "preprocessor_config.json").unlink()
    one_line_error(lambda: make_image_reward(f"clip:{no_weights}", prompts=PROMPTS), "preprocessor_config.json")
    one_line_error(lambda: make_image_reward(f"clip:{clip_dir}"), "needs prompts")
    one_line_error(lambda: make_image_reward("clip:", prompts=PROMPTS), "needs a folder")
    reward = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS)
    one_line_error(lambda: reward(rand_images(2)), "needs cond")
    one_line_error(lambda: reward(rand_images(2), torch.tensor([0, 3])), r"\[0, 3\)")
    one_line_error(lambda: reward(rand_images(2), torch.tensor([0.0, 1.0])), "integer prompt indices")
    one_line_error(lambda: reward(torch.rand(2, 1, 32, 32), torch.tensor([0, 1])), r"\(B, 3, H, W\)")


# --- aesthetic -------------------------------------------------------------------------------------

def test_aesthetic_head_matches_a_hand_computation(clip_dir, clip_model):
    reward = make_image_reward(f"aesthetic:{clip_dir}")
    assert reward.differentiable
    x = rand_images(4)
    r = reward(x)
    state = load_file(str(clip_dir / "aesthetic_head.safetensors"))
    with torch.no_grad():
        h = F.normalize(features(clip_model.get_image_features(pixel_values=normalise(x))), dim=-1)
        h = h @ state["0.weight"].T + state["0.bias"]  # no activation between the Linears, as LAION's v2
        expected = (h @ state["1.weight"].T + state["1.bias"]).squeeze(-1)
    assert r.shape == (4,) and r.dtype == torch.float32
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=0)
    assert torch.equal(reward(x, torch.tensor([0, 1, 2, 3])), r)  # prompts play no part


class LaionMLP(nn.Module):
    """The layer structure of LAION's aesthetic predictor v2 (improved-aesthetic-predictor), with the
    tiny CLIP's embedding size 16 instead of ViT-L/14's 768."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_the_documented_laion_conversion_loads(clip_dir, clip_model, tmp_path):
    torch.manual_seed(0)
    mlp = LaionMLP(16).eval()
    sd = mlp.state_dict()  # what torch.load gives for sac+logos+ava1-l14-linearMSE.pth (the docstring's recipe)
    folder = tmp_path / "laion"
    shutil.copytree(clip_dir, folder)
    save_aesthetic_head(folder, [(sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]) for i in (0, 2, 4, 6, 7)])
    assert json.loads((folder / "aesthetic_head.json").read_text()) == {"widths": [16, 1024, 128, 64, 16, 1]}
    x = rand_images(3, seed=5)
    with torch.no_grad():
        emb = F.normalize(features(clip_model.get_image_features(pixel_values=normalise(x))), dim=-1)
        expected = mlp(emb).squeeze(-1)
    torch.testing.assert_close(make_image_reward(f"aesthetic:{folder}")(x), expected, atol=1e-6, rtol=0)


def test_bad_aesthetic_heads_are_one_line_errors(clip_dir, tmp_path):
    folder = tmp_path / "aes"
    shutil.copytree(clip_dir, folder)
    spec = f"aesthetic:{folder}"
    state = load_file(str(folder / "aesthetic_head.safetensors"))
    save_file({**state, "1.weight": torch.zeros(1, 9)}, str(folder / "aesthetic_head.safetensors"))
    err = one_line_error(lambda: make_image_reward(spec), "does not match widths")
    assert "1.weight" in err and "(1, 8)" in err and "(1, 9)" in err
    (folder / "aesthetic_head.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(lambda: make_image_reward(spec), "missing or corrupt")
    (folder / "aesthetic_head.safetensors").unlink()
    one_line_error(lambda: make_image_reward(spec), "missing or corrupt")
    (folder / "aesthetic_head.json").write_text(json.dumps({"widths": [768, 1024, 1]}))
    one_line_error(lambda: make_image_reward(spec), "from the CLIP embedding size 16 to 1")
    (folder / "aesthetic_head.json").write_text(json.dumps({"widths": [16, 0, 1]}))
    one_line_error(lambda: make_image_reward(spec), "aesthetic_head.json")
    (folder / "aesthetic_head.json").write_text("{not json")
    one_line_error(lambda: make_image_reward(spec), "aesthetic_head.json")
    (folder / "aesthetic_head.json").unlink()
    one_line_error(lambda: make_image_reward(spec), "aesthetic_head.json")


# --- learned ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory):
    """A tiny conditional Bradley-Terry ensemble on (3, 8, 8) images: brighter preferred for class 0,
    darker for class 1."""
    gen = torch.Generator().manual_seed(0)
    left, right = torch.rand(60, 3, 8, 8, generator=gen), torch.rand(60, 3, 8, 8, generator=gen)
    cond = torch.arange(60) % 2
    brighter = (left.mean((1, 2, 3)) > right.mean((1, 2, 3))).float()
    comps = Comparisons(left, right, torch.where(cond == 0, brighter, 1 - brighter), cond)
    fit = fit_reward_model(comps, ensemble=2, min_steps=10, epochs=1, val_fraction=0.0, seed=0)
    return fit.model.save(tmp_path_factory.mktemp("learned") / "reward")


def test_learned_reward_equals_the_bradley_terry_model(learned_dir):
    from scoreaction.rewards.preference import load_reward_model

    model = load_reward_model(learned_dir)
    reward = make_image_reward(f"learned:{learned_dir}", micro_batch=3)
    assert reward.differentiable
    x, cond = rand_images(7, 8, 8, seed=2), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    r = reward(x, cond)
    assert r.shape == (7,) and r.dtype == torch.float32
    torch.testing.assert_close(r, model(x, cond), atol=1e-6, rtol=0)
    assert not torch.allclose(r, model(x, 1 - cond))  # cond reaches the model as its class label
    torch.testing.assert_close(reward(x.double(), cond), r, atol=1e-6, rtol=0)


def test_learned_reward_of_the_wrong_shape_is_a_one_line_error(learned_dir, tmp_path):
    reward = make_image_reward(f"learned:{learned_dir}")
    err = one_line_error(lambda: reward(rand_images(2, 16, 16), torch.tensor([0, 1])), "fitted on images")
    assert "(3, 8, 8)" in err and "(3, 16, 16)" in err
    points = fit_reward_model(Comparisons(torch.randn(10, 2), torch.randn(10, 2), torch.ones(10)),
                              ensemble=1, min_steps=2, epochs=1, val_fraction=0.0).model.save(tmp_path / "points")
    one_line_error(lambda: make_image_reward(f"learned:{points}"), r"found sample shape \(2,\)")
    one_line_error(lambda: make_image_reward(f"learned:{tmp_path / 'nowhere'}"), "not a folder")


# --- user functions --------------------------------------------------------------------------------

USER_MODULE = textwrap.dedent("""
    import torch

    def brightness(images, cond):
        return images.mean((1, 2, 3))

    brightness.differentiable = True

    def echo_cond(images, cond):
        return cond.double()

    def per_pixel(images, cond):
        return images.mean(1)

    def counts(images, cond):
        return torch.zeros(len(images), dtype=torch.long)

    def nan(images, cond):
        return torch.full((len(images),), float("nan"))

    NOT_A_FUNCTION = 3
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "scoreaction_test_user_rewards.py").write_text(USER_MODULE)
    (tmp_path / "scoreaction_test_broken_rewards.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "scoreaction_test_user_rewards"


def test_a_user_function_is_wrapped(user_module):
    reward = make_image_reward(f"{user_module}:brightness", micro_batch=2)
    assert reward.differentiable
    x = rand_images(5)
    torch.testing.assert_close(reward(x), x.mean((1, 2, 3)))
    cond = torch.tensor([4, 0, 3, 1, 2])
    echo = make_image_reward(f"{user_module}:echo_cond", micro_batch=2)
    assert not echo.differentiable
    out = echo(x, cond)
    assert out.dtype == torch.float32 and torch.equal(out, cond.float())  # each micro-batch gets its own cond


def test_bad_user_functions_are_one_line_errors(user_module):
    x = rand_images(3)
    one_line_error(lambda: make_image_reward("scoreaction_no_such_module:f"), "cannot import module")
    one_line_error(lambda: make_image_reward("scoreaction_test_broken_rewards:f"), "broken on import")
    one_line_error(lambda: make_image_reward(f"{user_module}:missing"), "has no attribute 'missing'")
    one_line_error(lambda: make_image_reward(f"{user_module}:NOT_A_FUNCTION"), "found a int")
    err = one_line_error(lambda: make_image_reward(f"{user_module}:per_pixel")(x), "expected a float tensor")
    assert "(3, 32, 32)" in err and "(3,)" in err
    err = one_line_error(lambda: make_image_reward(f"{user_module}:counts")(x), "expected a float tensor")
    assert "torch.int64" in err
    one_line_error(lambda: make_image_reward(f"{user_module}:nan")(x), "non-finite")


# --- specs and options -----------------------------------------------------------------------------

def test_bad_specs_and_options_are_one_line_errors():
    err = one_line_error(lambda: make_image_reward("pickscore"), "unknown image reward 'pickscore'")
    for name in ("jpeg_compressibility", "clip:DIR", "aesthetic:DIR", "learned:DIR", "package.module:function"):
        assert name in err
    one_line_error(lambda: make_image_reward("jpeg_compressibility:9"), "takes no argument")
    one_line_error(lambda: make_image_reward("not a spec:also not"), "unknown image reward")
    one_line_error(lambda: make_image_reward("jpeg_compressibility", micro_batch=0), "micro_batch")
    one_line_error(lambda: make_image_reward("jpeg_compressibility", device="no-such-device"), "device")
    reward = make_image_reward("jpeg_compressibility")
    one_line_error(lambda: reward(torch.rand(3, 32, 32)), r"\(B, 3, H, W\)")
    one_line_error(lambda: reward(torch.randint(0, 255, (2, 3, 8, 8))), "float images")
    one_line_error(lambda: reward(rand_images(2), torch.tensor([0, 1, 2])), "prompt indices of shape")
    assert reward(torch.rand(0, 3, 8, 8)).shape == (0,)


def test_device_option_returns_to_the_images_device(clip_dir):
    reward = make_image_reward(f"clip:{clip_dir}", prompts=PROMPTS, device=torch.device("cpu"))
    assert reward.device == torch.device("cpu")
    x = rand_images(2)
    r = reward(x, torch.tensor([0, 1]))
    assert r.device == x.device and r.shape == (2,)
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")
    assert torch.equal(reward(x, torch.tensor([0, 1])), r)
    one_line_error(lambda: reward.to("no-such-device"), "device")
    reward.to("meta")  # modules and cached text embeddings move (meta: a device without data, here on any machine)
    assert all(p.device.type == "meta" for p in reward.model.parameters())
    assert reward.text and all(t.device.type == "meta" for t in reward.text.values())
    aesthetic = make_image_reward(f"aesthetic:{clip_dir}").to("meta")
    assert all(p.device.type == "meta" for p in [*aesthetic.model.parameters(), *aesthetic.head.parameters()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rewards_run_on_another_device_and_come_back(clip_dir):
    x, cond = rand_images(3), torch.tensor([0, 1, 2])
    for spec in (f"clip:{clip_dir}", f"aesthetic:{clip_dir}", "jpeg_compressibility"):
        reward = make_image_reward(spec, prompts=PROMPTS)
        on_cpu = reward(x, cond)
        on_gpu = make_image_reward(spec, prompts=PROMPTS, device="cuda")(x, cond)
        assert on_gpu.device == x.device
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=0)
        torch.testing.assert_close(reward.to("cuda")(x.cuda(), cond.cuda()).cpu(), on_cpu, atol=1e-4, rtol=0)
