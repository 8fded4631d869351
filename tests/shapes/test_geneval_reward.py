"""The checker as image reward `geneval` / `geneval:binary`: images (B, 3, H, W) in [0, 1] and prompt
indices in, the checker's score of each image against its prompt out; bad specs and prompts are one line."""

import pytest
import torch

from scoreaction.rewards.images import make_image_reward
from scoreaction.shapes.checker import score
from scoreaction.shapes.scenes import render

PROMPTS = ["a circle", "three red squares", "a blue triangle above a white circle", "a red circle and a green square"]


def as_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x in images])


def test_geneval_scores_each_image_against_its_prompt():
    arrays = [render(p, i) for i, p in enumerate(PROMPTS)]
    images, cond = as_tensor(arrays), torch.arange(len(PROMPTS))
    partial = make_image_reward("geneval", prompts=PROMPTS)
    binary = make_image_reward("geneval:binary", prompts=PROMPTS)
    assert partial(images, cond).tolist() == [1.0] * 4 and binary(images, cond).tolist() == [1.0] * 4
    shifted = cond.roll(1)
    expected = [score(a, PROMPTS[i]) for a, i in zip(arrays, shifted.tolist())]
    assert partial(images, shifted).tolist() == pytest.approx([s.partial for s in expected])
    assert binary(images, shifted).tolist() == [s.binary for s in expected] and sum(s.binary for s in expected) < 4
    assert not partial.differentiable


def test_prompts_added_later_are_scored():
    prompts = list(PROMPTS)
    reward = make_image_reward("geneval", prompts=prompts)
    prompts.append("four squares")
    assert reward(as_tensor([render("four squares", 0)]), torch.tensor([4])).tolist() == [1.0]
    prompts.append("a cat")
    with pytest.raises(ValueError, match="'a cat' is outside the shapes grammar"):
        reward(as_tensor([render("a circle", 0)]), torch.tensor([5]))


@pytest.mark.parametrize("spec, prompts, fragment", [
    ("geneval:strict", PROMPTS, "expected 'geneval' or 'geneval:binary'"),
    ("geneval", None, "needs prompts"),
    ("geneval", ["a circle", "a photo of a cat"], "'a photo of a cat' is outside the shapes grammar"),
])
def test_bad_specs_and_prompts_are_one_line(spec, prompts, fragment):
    with pytest.raises(ValueError) as info:
        make_image_reward(spec, prompts=prompts)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cond, fragment", [(None, "needs cond"), (torch.tensor([7]), "must lie in [0, 4)")])
def test_bad_conditions_are_refused(cond, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        make_image_reward("geneval", prompts=PROMPTS)(as_tensor([render("a circle", 0)]), cond)


@pytest.mark.filterwarnings("ignore")
def test_the_diffusers_task_takes_geneval_with_grammar_prompts():
    from scoreaction.tasks import make_task

    task = make_task("diffusers", {"prompts": PROMPTS, "reward": "geneval:binary"})
    x, cond = task.start(3, generator=torch.Generator().manual_seed(0))
    r = task.reward(x, cond)
    assert r.shape == (3,) and set(r.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        make_task("diffusers", {"prompts": ["a cat"], "reward": "geneval"})
