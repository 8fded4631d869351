"""evaluation.prompt_gain and `scoreaction evaluate --prompts`: each prompt's images from the policy and from the
pretrained model on the same noise, the paired gains, GenEval's accuracy per category for shapes captions."""

import json

import numpy as np
import pytest
import torch

from scoreaction.evaluation import paired, prompt_gain
from scoreaction.shapes.checker import score, summarise
from scoreaction.shapes.grammar import category
from scoreaction.tasks import make_task
from tests.helpers import one_line_error, run_cli

pytestmark = pytest.mark.filterwarnings("ignore")
CAPTIONS = ["a red circle", "a circle and a square", "two triangles", "a blue square left of a green circle"]


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return make_task("diffusers", {"model": "shapes", "prompts": "shapes-train", "reward": "geneval"})


def test_paired_standard_error_is_that_of_the_differences():
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 1.0])
    gain, se = paired(a, b)
    assert gain == pytest.approx(5 / 3) and se == pytest.approx(float(torch.tensor([1.0, 1.0, 3.0]).std()) / 3 ** 0.5)


def test_an_untuned_policy_gains_exactly_nothing_and_the_accuracy_is_the_checkers(task):
    """The action starts at the pretrained model (LoRA B = 0): on the same noise every gain is exactly 0; the
    report is checker.summarise of the images, which the test scores again itself."""
    from scoreaction.policy import ScoreAsAction

    policy = ScoreAsAction(task.path, task.make_action(), task.pretrained, eta=1.0, kernel="ddim")
    out = prompt_gain(policy, task, CAPTIONS, 3, "ddim", 5, seed=7, batch=5)
    assert out["n"] == 12 and out["gain"] == 0.0 and out["accuracy_gain"]["overall"] == {"gain": 0.0, "se": 0.0}
    assert out["reward"] == out["reward_pretrained"] and out["accuracy"] == out["accuracy_pretrained"]
    assert set(out["accuracy"]["per_category"]) == {category(c) for c in CAPTIONS}
    alone = prompt_gain(None, task, CAPTIONS, 3, "ddim", 5, seed=7, batch=5)
    assert alone["accuracy_pretrained"] == out["accuracy_pretrained"] and "gain" not in alone
    ids = task.add_prompts(CAPTIONS).repeat_interleave(3)
    from scoreaction.evaluation import sample_with

    images = torch.cat([task.images(sample_with(None, task, "ddim", 5, len(c), 7 + k, cond=c, pretrained=True)[0])
                        for k, c in enumerate(ids.split(5))])
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    texts = [task.prompts.texts[i] for i in ids.tolist()]
    binary = [score(p, t).binary for p, t in zip(pixels, texts)]
    assert out["accuracy_pretrained"] == summarise([category(t) for t in texts], binary)


def test_prompts_outside_the_grammar_get_the_reward_only():
    """A prompt list that is not all captions of the grammar: the task's reward, no accuracy (nothing guessed)."""
    task = make_task("diffusers", {"model": "shapes", "prompts": ["a red circle"], "reward": "jpeg_compressibility"})
    out = prompt_gain(None, task, ["a red circle", "a yellow star"], 2, "ddim", 3)
    assert out["n"] == 4 and np.isfinite(out["reward_pretrained"]) and "accuracy_pretrained" not in out


def test_evaluate_cli_on_prompts_pairs_a_run_with_its_pretrained_model(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--set", "task.name=diffusers", "--set", "task.model=shapes",
                           "--set", "task.prompts=shapes-train", "--set", "task.reward=geneval", "--kernel", "ddim",
                           "--grid", "scheduler", "--steps", "3", "--batch-size", "4", "--updates", "1",
                           "--eval-every", "1", "--threads", "1", "-q", "--out", str(run),
                           "--set", f"eval_prompts=[{prompts}]", "--set", "eval_per_prompt=2")
    assert code == 0, err
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 1] and log[0]["eval_path_kl"] == 0.0  # the baseline
    # each evaluation also scores the eval_prompts file, paired with the pretrained model: nothing gained at step 0
    assert log[0]["eval_prompts_accuracy"] == log[0]["eval_prompts_accuracy_pretrained"] == \
        log[1]["eval_prompts_accuracy_pretrained"] and log[0]["eval_prompts_gain"] == 0.0
    assert {f"eval_prompts_{c}" for c in map(category, CAPTIONS)} < set(log[1]) and "eval_prompts_gain_se" in log[1]
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", str(run), "--prompts", str(prompts), "--per-prompt",
                             "2", "--solver", "ddim", "--steps", "4", "--json", "--threads", "1")
    assert code == 0, err
    result = json.loads(out)
    assert result["step"] == 1 and result["n"] == 8 and result["prompts"] == 4
    assert set(result["accuracy_gain"]["per_category"]) == {category(c) for c in CAPTIONS}
    code, out, err = run_cli(capsys, "evaluate", "--pretrained", "--task", "diffusers", "--set", "task.model=shapes",
                             "--prompts", str(prompts), "--per-prompt", "2", "--solver", "ddim", "--steps", "4",
                             "--json", "--threads", "1")
    assert code == 0, err
    alone = json.loads(out)
    assert alone["model"] == "shapes" and "accuracy_pretrained" in alone and "accuracy" not in alone


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "--checkpoint", "x", "--prompts", "shapes-train"], "found both"),
    ([], "found neither"),
    (["--pretrained", "--task", "diffusers"], "give --prompts FILE"),
    (["--checkpoint", "x", "--prompts", "shapes-train", "--n", "4"], "give --per-prompt"),
    (["--checkpoint", "x", "--per-prompt", "0"], "per_prompt"),
    (["--pretrained", "--task", "gaussian", "--prompts", "shapes-train"], "has no prompts"),
    (["--pretrained", "--task", "diffusers", "--set", "task.model=shapes", "--prompts", "no-such-file"],
     "no such file"),
])
def test_bad_evaluate_options_are_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, "evaluate", *args)
    one_line_error(code, err, message)
