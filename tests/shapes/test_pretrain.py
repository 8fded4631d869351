"""`scoreaction pretrain --task shapes`: the tokenizer spells the grammar's words whole, the quick setting writes
a pipeline folder that stock diffusers loads and samples from, that scoreaction's diffusers task loads with the
geneval and clip rewards, with a record of how it was made; bad options are refused before any work."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from scoreaction.shapes.grammar import CATEGORIES, captions
from scoreaction.shapes.pretrain import CLIP_FOLDER, QUICK, RECORD, STAGES, ShapesPretrainConfig, make_config
from scoreaction.shapes.vocab import MODEL_MAX_LENGTH, WORDS, shapes_tokenizer
from scoreaction.tasks import make_task
from tests.helpers import one_line_error, run_cli

pytestmark = pytest.mark.filterwarnings("ignore")


def test_each_word_of_the_grammar_is_one_token_and_every_caption_fits():
    tok = shapes_tokenizer()
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    longest = max(captions(), key=lambda c: len(c.split()))
    ids = tok("a photo of " + longest)["input_ids"]
    assert len(ids) <= MODEL_MAX_LENGTH and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id == len(tok) - 1 == tok.pad_token_id  # pooling at argmax(input_ids) finds eos
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False)["input_ids"]) == list("zebr") + ["a</w>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The quick model, written by the command line (its output checked in the test below)."""
    out = tmp_path_factory.mktemp("pretrain") / "shapes"
    from scoreaction.cli import main

    torch_threads = torch.get_num_threads()
    try:
        code = main(["pretrain", "--task", "shapes", "--quick", "--out", str(out), "--threads", "1", "-q",
                     "--set", "shapes.unet_steps=4"])
    finally:
        torch.set_num_threads(torch_threads)
    assert code == 0
    return out


def test_the_folder_holds_a_pipeline_a_clip_model_and_the_record(folder):
    record = json.loads((folder / RECORD).read_text())
    assert record["command"] == ("scoreaction pretrain --task shapes --quick --seed 0 --threads 1 "
                                 "--set shapes.unet_steps=4")
    assert record["config"] == make_config({"unet_steps": 4}, quick=True).to_dict() and record["seed"] == 0
    for stage in STAGES:
        entry = record["stages"][stage]
        assert entry["cpu_seconds"] >= 0 and entry["wall_seconds"] >= 0
        assert len(entry["history"]) == entry["steps"] == QUICK[f"{stage}_steps"] + (stage == "unet")
        assert all(np.isfinite(v) for h in entry["history"] for v in h.values())
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                     and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    assert weights == [f"{CLIP_FOLDER}/model.safetensors", "text_encoder/model.safetensors",
                       "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert record["stages"]["vae"]["scaling_factor"] == pytest.approx(
        json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    metrics = record["metrics"]  # the checker on one image per category, by stock diffusers
    assert list(metrics["train"]["per_category"]) == list(CATEGORIES)
    assert list(metrics["heldout"]["per_category"]) == ["counting", "colors", "position", "color_attr"]
    assert all(0 <= v <= 1 for split in ("train", "heldout") for v in metrics[split]["per_category"].values())


def test_stock_diffusers_loads_the_folder_and_samples_32_px_images(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.beta_start == 0.00085 and pipe.scheduler.config.beta_end == 0.012
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.cross_attention_dim == QUICK["text_width"]
    prompts = ["a red circle", "two squares"]
    images = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    clip = CLIPModel.from_pretrained(folder / CLIP_FOLDER, local_files_only=True)
    text = clip.text_model.state_dict()
    for key, value in pipe.text_encoder.state_dict().items():  # the pipeline's encoder is CLIP's text tower
        assert torch.equal(value, text[key.removeprefix("text_model.")] if key not in text else text[key]), key


@pytest.mark.parametrize("reward", ["geneval", "clip"])
def test_the_diffusers_task_loads_the_folder(folder, reward):
    spec = f"clip:{folder / CLIP_FOLDER}" if reward == "clip" else reward
    task = make_task("diffusers", {"model": str(folder), "prompts": ["a red circle", "two squares"], "reward": spec,
                                   "guidance_scale": 3.0})
    assert task.shape == (4, 8, 8)
    x = torch.randn(2, *task.shape, generator=torch.Generator().manual_seed(0))
    r = task.reward(x, torch.tensor([0, 1]))
    assert r.shape == (2,) and torch.isfinite(r).all()
    assert task.images(x).shape == (2, 3, 32, 32)


def digest(path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()


@pytest.mark.parametrize("flags, fragment", [
    (["--quick"], "for --task shapes"),
    (["--task", "shapes", "--steps", "5"], "shapes.unet_steps"),
    (["--task", "shapes", "--set", "shapes.nope=1"], "unknown option 'nope'"),
    (["--task", "shapes", "--set", "shapes.unet_steps=0"], "unet_steps must be a positive integer"),
    (["--task", "shapes", "--set", "shapes.size=30"], "size must be a multiple of 4"),
    (["--task", "shapes", "--set", "shapes.vae_channels=[8,16]"], "vae_channels"),
    (["--task", "shapes", "--set", "shapes.caption_dropout=.nan"], "caption_dropout must be finite"),
    (["--task", "shapes", "--set", "shapes.weights=bf16"], "weights"),
    (["--task", "shapes", "--set", "shapes=3"], "mapping"),
])
def test_bad_options_are_refused_in_one_line(capsys, tmp_path, flags, fragment):
    code, _, err = run_cli(capsys, "pretrain", *flags, "--out", tmp_path / "out")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_replaced_only_with_overwrite(capsys, folder):
    before = digest(folder)
    code, _, err = run_cli(capsys, "pretrain", "--task", "shapes", "--quick", "--out", folder, "-q")
    one_line_error(code, err, "--overwrite")
    assert digest(folder) == before
    other = folder.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "pretrain", "--task", "shapes", "--quick", "--out", other, "--overwrite", "-q")
    one_line_error(code, err, "never replaced")
    assert (other / "notes.txt").read_text() == "mine"


def test_the_config_defaults_are_valid_and_stay_under_the_package_budget():
    cfg = ShapesPretrainConfig()
    assert make_config() == cfg and make_config(quick=True).unet_steps == QUICK["unet_steps"]
    from scoreaction.shapes.pretrain import build_clip, build_unet, build_vae

    tok = shapes_tokenizer()
    n = {"clip": sum(p.numel() for p in build_clip(cfg, len(tok), tok.bos_token_id, tok.eos_token_id).parameters()),
         "unet": sum(p.numel() for p in build_unet(cfg).parameters()),
         "vae": sum(p.numel() for p in build_vae(cfg).parameters())}
    text = n["clip"] // 2  # the text encoder is stored again beside CLIP (fp32, an upper bound)
    megabytes = (4 * (n["clip"] + text) + 2 * (n["unet"] + n["vae"])) / 2**20
    assert megabytes < 20, n
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")


def test_overwrite_replaces_a_shapes_folder_whole(capsys, folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "unet" / "stale.safetensors").write_bytes(b"")  # a file of the old folder, not of the new one
    threads = torch.get_num_threads()
    try:
        code, out, _ = run_cli(capsys, "pretrain", "--task", "shapes", "--quick", "--out", copy, "--overwrite",
                               "--seed", "1", "--no-evaluate", "--threads", "1", "-q")
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and f"task.model={copy}" in out
    record = json.loads((copy / RECORD).read_text())
    assert record["seed"] == 1 and "metrics" not in record and not (copy / "unet" / "stale.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_shapes_accuracy_scores_a_folder_and_rewrites_its_record_on_request(folder, capsys, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    code, out, err = run_cli(capsys, "shapes", "accuracy", "--model", copy, "--per-category", "1", "--steps", "2",
                             "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert list(metrics["train"]["per_category"]) == list(CATEGORIES) and metrics["train"]["steps"] == 2
    assert "command" not in json.loads((copy / RECORD).read_text())["metrics"]  # written only with --record
    code, out, err = run_cli(capsys, "shapes", "accuracy", "--model", copy, "--per-category", "1", "--steps", "2",
                             "--record")
    assert code == 0, err
    record = json.loads((copy / RECORD).read_text())
    assert record["metrics"]["command"].endswith("--record") and record["metrics"]["train"] == metrics["train"]
    code, _, err = run_cli(capsys, "shapes", "accuracy", "--model", tmp_path / "none")
    one_line_error(code, err, "no such folder")
    (tmp_path / "bare").mkdir()
    code, _, err = run_cli(capsys, "shapes", "accuracy", "--model", tmp_path / "bare", "--record")
    one_line_error(code, err, "has none")
