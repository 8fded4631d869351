"""The shipped shapes model (scoreaction/assets/shapes): a StableDiffusionPipeline folder within the package budget,
with the record of the command that trained it; stock diffusers samples scenes that follow their captions; the
names `shapes` (task.model), `shapes-train` / `shapes-heldout` (task.prompts) and `clip:shapes` (reward) select it."""

import json

import numpy as np
import pytest
import torch

from scoreaction.models.pipeline_load import NAMED
from scoreaction.shapes.accuracy import draw_captions, prompt_set
from scoreaction.shapes.checker import score
from scoreaction.shapes.grammar import CATEGORIES, parse, specs
from scoreaction.shapes.pretrain import CLIP_FOLDER, FORMAT, RECORD
from scoreaction.tasks import make_task

pytestmark = pytest.mark.filterwarnings("ignore")
FOLDER = NAMED["shapes"]


def test_the_folder_is_within_budget_and_records_how_it_was_trained():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 10**6
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]  # safetensors only
    record = json.loads((FOLDER / RECORD).read_text())
    assert record["format"] == FORMAT and record["command"].startswith("scoreaction pretrain --task shapes")
    assert "--quick" not in record["command"]
    assert all(record["stages"][s]["cpu_seconds"] > 0 for s in ("clip", "vae", "unet"))
    assert list(record["metrics"]["train"]["per_category"]) == list(CATEGORIES)


@pytest.fixture(scope="module")
def stock():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def other_caption(caption: str, rng) -> str:
    """Another caption of the same category that differs in meaning (validation.implied both ways excluded)."""
    from scoreaction.shapes.validation import implied

    spec = parse(caption)
    pool = [s for s in specs("all", spec.category) if not implied(s, spec) and not implied(spec, s)]
    return pool[rng.integers(len(pool))].caption


def test_stock_diffusers_draws_scenes_that_follow_their_captions(stock):
    """Each image passes the checker for its own caption far more often than for another caption of its category:
    the prompt steers the picture (an unconditional model would pass both alike)."""
    captions = draw_captions("train", 16, seed=21)
    images = stock(captions, num_inference_steps=20, guidance_scale=5.0, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    rng = np.random.default_rng(0)
    own = np.array([score(np.clip(im, 0, 1), c).binary for im, c in zip(images, captions)])
    other = np.array([score(np.clip(im, 0, 1), other_caption(c, rng)).binary for im, c in zip(images, captions)])
    diff = own - other
    assert diff.mean() > 5 * diff.std() / len(diff) ** 0.5, (own.mean(), other.mean())


def test_names_select_the_shipped_model_its_prompts_and_its_clip():
    task = make_task("diffusers", {"model": "shapes", "prompts": "shapes-heldout", "reward": "clip:shapes"})
    assert task.shape == (4, 8, 8) and task.prompts.texts == prompt_set("heldout", 8, 0)
    assert [parse(t).category for t in task.prompts.texts] == ["counting"] * 8 + ["colors"] * 3 + ["position"] * 8 + [
        "color_attr"] * 8  # the held-out split has 3 colours captions: all of them
    assert len(make_task("diffusers", {"model": "shapes", "prompts": "shapes-train"}).prompts.texts) == 3 + 6 + 8 * 4
    from scoreaction.models.pipeline_load import weights_digest

    assert weights_digest("shapes") == weights_digest(str(FOLDER))


def test_the_shipped_clip_scores_a_scene_higher_for_its_own_caption():
    """clip:shapes on ground-truth scenes: its own caption beats another caption of the category on most scenes."""
    from scoreaction.rewards.images import make_image_reward
    from scoreaction.shapes.scenes import render

    captions = draw_captions("train", 8, seed=22)
    rng = np.random.default_rng(1)
    others = [other_caption(c, rng) for c in captions]
    reward = make_image_reward("clip:shapes", prompts=captions + others)
    images = torch.tensor(np.stack([render(c, seed=i) for i, c in enumerate(captions)])).permute(0, 3, 1, 2) / 255
    n = len(captions)
    own = reward(images, torch.arange(n))
    wrong = reward(images, torch.arange(n, 2 * n))
    assert float((own > wrong).float().mean()) >= 0.75, (own - wrong)
