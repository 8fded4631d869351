"""Fault tables of non-finite values, of code named by data, and of defaults: each case runs `scoreaction ARGV`
in this process against a shared world of good and damaged files, and every refusal is exit code 2 with one
line naming what was expected and what was found, every file hashed unchanged.

- reward models (and the classifiers and CLIP models that score) with a NaN/inf weight or a normalisation
  scale that is not > 0 are refused at load, by every command that loads one;
- a run whose updates all change nothing (a non-finite reward, every optimiser step skipped or rolled back)
  stops with exit 2 after `max_skipped` updates, or at its end, and writes no checkpoint;
- a non-finite tensor or optimiser number in a checkpoint is refused by every command that reads it, and
  a trainer never writes one;
- comparisons without a winner are not fitted; seeds and timestamps out of range are refused everywhere;
- a checkpoint naming a `package.module:function` reward never imports it unless the command line names it;
- `sample` and `evaluate` default to the task's (the run's) sizes: a handful of images for diffusers.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file
from test_reliability_cli import ERROR_LINE, quiet_main, snapshot

from scoreaction.feedback.store import PreferenceStore
from scoreaction.rewards.preference import BTRewardModel, Comparisons, FitConfig, load_reward_model, save_comparisons

pytestmark = pytest.mark.filterwarnings("ignore")

MARKER_MODULE = "scoreaction_test_marker_reward"  # writes marker.txt beside itself when imported
TRAIN = ["train", "--updates", "2", "--batch-size", "8", "--steps", "4", "--hidden", "16", "--eval-n", "64",
         "--eval-steps", "4", "-q", "--threads", "1", "--no-tensorboard"]


def edit_tensors(file: Path, fn) -> None:
    save_file(fn(load_file(str(file))), str(file))


def poison(name: str, value: float):
    """tensors -> the same with one entry of tensor `name` (None: the first floating one) set to `value`."""
    def change(tensors):
        key = name or next(k for k, v in tensors.items() if v.is_floating_point())
        t = tensors[key].clone()
        t.view(-1)[0] = value
        return {**tensors, key: t}
    return change


def copy_with(world: Path, good: str, name: str, change) -> None:
    shutil.copytree(world / good, world / name)
    change(world / name)


def edit_json(file: str, fn):
    def change(folder):
        (folder / file).write_text(json.dumps(fn(json.loads((folder / file).read_text()))))
    return change


def tensors_of(file: str, fn):
    return lambda folder: edit_tensors(folder / file, fn)


def store_with(path: Path, choices: list[str]) -> None:
    with PreferenceStore(path, create=True) as store:
        points = np.random.default_rng(1).normal(size=(len(choices) + 1, 2)).astype(np.float32)
        ids = store.add_items(points, task="gaussian", model="test")
        store.add_comparisons([{"left": ids[i], "right": ids[i + 1], "choice": c, "labeler": "ann"}
                               for i, c in enumerate(choices)])


def build_world(world: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world)
        quiet_main(*TRAIN, "--checkpoint-every", 1, "--out", "run")
        # a diffusers run whose reward is a module of code (imported here, by the command line that names it)
        (world / f"{MARKER_MODULE}.py").write_text(
            "from pathlib import Path\nPath(__file__).with_name('marker.txt').write_text('imported')\n\n"
            "def reward(images, cond=None):\n    return images.mean((1, 2, 3))\n")
        mp.syspath_prepend(str(world))
        quiet_main("train", "--task", "diffusers", "--set", f"task.reward={MARKER_MODULE}:reward", "--steps", 2,
                   "--batch-size", 2, "--updates", 1, "--eval-every", 0, "--eval-n", 2, "--eval-steps", 2,
                   "--device", "cpu", "--no-tensorboard", "-q", "--threads", 1, "--out", "run_code")
    (world / "marker.txt").unlink()
    sys.modules.pop(MARKER_MODULE, None)

    # checkpoints with a non-finite tensor or optimiser number
    good = "run/checkpoints/step-000002"
    for name, change in {
        "ck_model_nan": tensors_of("model.safetensors", poison(None, float("nan"))),
        "ck_model_inf": tensors_of("model.safetensors", poison(None, float("inf"))),
        "ck_adam_nan": tensors_of("train.safetensors", poison("optimizer.state.0.exp_avg_sq", float("nan"))),
        "ck_eps_nan": edit_json("state.json", lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": [
            {**s["optimizer"]["param_groups"][0], "eps": float("nan")}]}}),
        "ck_model_huge": tensors_of("model.safetensors", lambda t: {k: torch.full_like(v, 1e30) for k, v in t.items()}),
        "ck_betas_inf": edit_json("state.json", lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": [
            {**s["optimizer"]["param_groups"][0], "betas": [float("inf"), 0.999]}]}}),
    }.items():
        copy_with(world, good, name, change)

    # comparisons, a reward model and damaged copies of it
    quiet_main("reward", "simulate", "--task", "gaussian", "--n", 60, "--items", 30, "--out", world / "cmp.safetensors")
    quiet_main("reward", "fit", "--comparisons", world / "cmp.safetensors", "--out", world / "rm", "--epochs", 1,
               "--ensemble", 2, "--set", "hidden=8", "--min-steps", 1)
    for name, change in {
        "rm_nan_weight": tensors_of("model.safetensors", poison(None, float("nan"))),
        "rm_inf_weight": tensors_of("model.safetensors", poison(None, float("-inf"))),
        "rm_nan_offset": tensors_of("model.safetensors", poison("offset", float("nan"))),
        "rm_zero_std": tensors_of("model.safetensors", lambda t: {**t, "input_std": torch.zeros_like(t["input_std"])}),
        "rm_negative_std": tensors_of("model.safetensors", poison("input_std", -1.0)),
        "rm_json_zero_std": edit_json("reward.json", lambda c: {**c, "normalisation": {**c["normalisation"],
                                                                                        "std": [0.0, 1.0]}}),
        "rm_huge_weights": tensors_of("model.safetensors", lambda t: {k: v if k == "input_std" else
                                                                      torch.full_like(v, 1e30) for k, v in t.items()}),
        "rm_json_nan_mean": edit_json("reward.json", lambda c: {**c, "normalisation": {**c["normalisation"],
                                                                                        "mean": [float("nan"), 0]}}),
    }.items():
        copy_with(world, "rm", name, change)

    # preference stores: answers with a winner, only ties, and one winner among ties
    store_with(world / "store.db", ["left", "right"] * 5)
    store_with(world / "ties.db", ["tie"] * 10)
    store_with(world / "one_winner.db", ["tie"] * 19 + ["left"])
    save_comparisons(world / "ties.safetensors", Comparisons(torch.zeros(6, 2), torch.ones(6, 2), torch.full((6,), 0.5)))
    save_file({"left": torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "right": torch.zeros(2, 2),
               "choice": torch.tensor([1.0, 0.0])}, str(world / "inf_items.safetensors"))

    # the digits model folder with a NaN in its classifier (the reward) and in its UNet
    from scoreaction.tasks.digits import CLASSIFIER_FILE, SHIPPED, UNET_FILE

    for name, file in (("digits_nan_classifier", CLASSIFIER_FILE), ("digits_nan_unet", UNET_FILE)):
        shutil.copytree(SHIPPED, world / name)
        edit_tensors(world / name / file, poison(None, float("nan")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tmp_path_factory.mktemp("finite_world")
    build_world(world)
    return world


def refused(capsys, world, cwd, argv, *fragments):
    """Run argv in cwd: exit 2, one error line naming each fragment, no file of the world or cwd changed."""
    before = snapshot(world, cwd)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and ERROR_LINE.match(err), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(world, cwd) == before
    return err


# --- reward models with non-finite weights or a scale that is not > 0 --------------------------------------
BAD_MODELS = [("rm_nan_weight", "model.safetensors"), ("rm_inf_weight", "model.safetensors"),
              ("rm_nan_offset", "'offset'"), ("rm_zero_std", "tensor input_std must be finite and > 0, found 0.0"),
              ("rm_negative_std", "tensor input_std must be finite and > 0, found -1.0"),
              ("rm_json_zero_std", "std must be finite and > 0"), ("rm_json_nan_mean", "mean must be finite")]
MODEL_COMMANDS = {
    "reward evaluate": ["reward", "evaluate", "--comparisons", "{w}/cmp.safetensors", "--model", "{m}"],
    "enqueue disagreement": ["feedback", "enqueue", "--store", "{w}/store.db", "--pairs", "2", "--strategy",
                             "disagreement", "--reward-model", "{m}"],
    "train learned": ["train", "--task", "digits", "--set", "task.reward=learned:{m}", "--updates", "1",
                      "--batch-size", "2", "--steps", "2", "-q", "--threads", "1", "--out", "{cwd}/out"],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("model, fragment", BAD_MODELS)
def test_a_non_finite_reward_model_is_refused_at_load(world, tmp_path, monkeypatch, capsys, command, model, fragment):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(w=world, m=world / model, cwd=tmp_path) for a in MODEL_COMMANDS[command]]
    refused(capsys, world, tmp_path, argv, str(world / model), fragment)


def test_the_good_reward_model_loads(world):
    model = load_reward_model(world / "rm")
    assert torch.isfinite(model.input_std).all() and bool((model.input_std > 0).all())


@pytest.mark.parametrize("folder, option, file", [("digits_nan_classifier", "classifier", "classifier.safetensors"),
                                                   ("digits_nan_unet", "checkpoint", "unet.safetensors")])
def test_a_non_finite_digits_model_is_refused(world, tmp_path, monkeypatch, capsys, folder, option, file):
    monkeypatch.chdir(tmp_path)
    refused(capsys, world, tmp_path, ["train", "--task", "digits", "--set", f"task.{option}={world / folder}",
                                      "--updates", "1", "-q", "--out", tmp_path / "out"], str(world / folder / file),
            "non-finite")


@pytest.mark.parametrize("kind", ["clip", "aesthetic"])
def test_a_non_finite_clip_model_or_aesthetic_head_is_refused(tmp_path, kind):
    from scoreaction.models.tiny_clip import write_tiny_aesthetic, write_tiny_clip
    from scoreaction.rewards.images import make_image_reward

    folder = (write_tiny_clip if kind == "clip" else write_tiny_aesthetic)(tmp_path / kind)
    file = folder / ("model.safetensors" if kind == "clip" else "aesthetic_head.safetensors")
    edit_tensors(file, poison(None, float("nan")))
    with pytest.raises(ValueError, match="non-finite values") as err:
        make_image_reward(f"{kind}:{folder}", prompts=["a cat"])
    assert str(folder) in str(err.value) and "tensor '" in str(err.value) and "\n" not in str(err.value)


def test_a_model_with_a_non_finite_weight_is_never_written(world, tmp_path):
    model = load_reward_model(world / "rm")
    model.offset[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not written: tensor 'offset' has non-finite values"):
        model.save(tmp_path / "rm")
    assert not (tmp_path / "rm").exists()
    with pytest.raises(ValueError, match="normalisation std must be finite and > 0, found 0.0"):
        BTRewardModel({**model.config, "normalisation": {"mean": 0.0, "std": 0.0}})


# --- runs whose updates all change nothing ------------------------------------------------------------------
def nan_reward(monkeypatch):
    from scoreaction.rewards import QuadraticReward

    monkeypatch.setattr(QuadraticReward, "__call__", lambda self, x, cond=None: torch.full((len(x),), float("nan")))


def infinite_lr(monkeypatch):
    from scoreaction.train import Trainer

    monkeypatch.setattr(Trainer, "learning_rate", lambda self: float("inf"))  # every step rolled back


def late_infinite_lr(monkeypatch):
    from scoreaction.train import Trainer

    monkeypatch.setattr(Trainer, "learning_rate", lambda self: 1e-3 if self.step == 0 else float("inf"))


def infinite_gradient(monkeypatch):
    from scoreaction.train import loop

    monkeypatch.setattr(loop.torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf")))


FAILING = [(nan_reward, 10, [], "stopping after 3 such batches in a row"),
           (nan_reward, 10, ["--max-skipped", "2"], "stopping after 2 such batches in a row"),
           (nan_reward, 2, [], "no update of the run (1..2) changed the weights"),
           (infinite_lr, 10, [], "stopping after 3 such updates in a row"),
           (infinite_lr, 2, [], "no update of the run (1..2) changed the weights"),
           (infinite_gradient, 10, [], "stopping after 3 such updates in a row"),
           (infinite_gradient, 2, ["--checkpoint-every", "1"], "no update of the run (1..2) changed the weights"),
           (infinite_gradient, 1, [], "no update of the run (1..1) changed the weights"),
           (late_infinite_lr, 2, [], "the run ended with 1 update(s) in a row (2..2) that changed no weight"),
           (late_infinite_lr, 3, ["--max-skipped", "5"], "the run ended with 2 update(s) in a row (2..3)")]


@pytest.mark.parametrize("fault, updates, flags, message", FAILING,
                         ids=[f"{f.__name__}-{u}-{'-'.join(x)}" for f, u, x, _ in FAILING])
def test_a_run_whose_updates_all_fail_stops_with_an_error(tmp_path, monkeypatch, capsys, fault, updates, flags,
                                                          message):
    fault(monkeypatch)
    code, out, err = run_cli(capsys, *TRAIN[:2], updates, *TRAIN[3:], *flags, "--out", tmp_path / "out")
    lines = err.splitlines()
    assert code == 2 and ERROR_LINE.match(lines[-1]) and message in lines[-1], err
    assert all(line.startswith("scoreaction: warning: update ") for line in lines[:-1]), err
    for folder in (tmp_path / "out" / "checkpoints").glob("step-*"):  # only those before any update changed
        for file in ("model.safetensors", "train.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(folder / file)).values() if t.is_floating_point())
    if "--checkpoint-every" not in flags:
        assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_trainer_never_writes_a_non_finite_checkpoint(tmp_path):
    from scoreaction.errors import CheckpointError
    from scoreaction.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(updates=1, batch_size=8, steps=4, hidden=16, out=str(tmp_path / "run"),
                                  tensorboard=False), progress=False)
    with torch.no_grad():
        trainer.params[0].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="not written: its model.safetensors: tensor '.*' has non-finite"):
        trainer.save()
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("value", ["1e30", "101", "0", "-3"])
def test_guidance_scale_out_of_range_is_refused(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, tmp_path, ["train", "--task", "diffusers", "--set", f"task.guidance_scale={value}",
                                         "-q", "--out", tmp_path / "out"], "guidance_scale must be")


# --- non-finite values in a checkpoint ----------------------------------------------------------------------
BAD_CHECKPOINTS = [("ck_model_nan", "model.safetensors"), ("ck_model_inf", "model.safetensors"),
                   ("ck_adam_nan", "'optimizer.state.0.exp_avg_sq'"), ("ck_eps_nan", "eps must be finite"),
                   ("ck_betas_inf", "betas[0] must be finite")]
CHECKPOINT_COMMANDS = {
    "resume": ["train", "--resume", "{ck}", "--updates", "3", "-q"],
    "sample": ["sample", "--checkpoint", "{ck}", "--n", "4", "--steps", "2", "-q", "--out", "{cwd}/s.npz"],
    "evaluate": ["evaluate", "--checkpoint", "{ck}", "--n", "8", "--steps", "2"],
    "add-items": ["feedback", "add-items", "--store", "{w}/store.db", "--checkpoint", "{ck}", "--n", "2", "--steps",
                  "2"],
}


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("name, fragment", BAD_CHECKPOINTS)
def test_a_non_finite_checkpoint_is_refused_at_load(world, tmp_path, monkeypatch, capsys, command, name, fragment):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(ck=world / name, w=world, cwd=tmp_path) for a in CHECKPOINT_COMMANDS[command]]
    refused(capsys, world, tmp_path, argv, str(world / name), fragment)


# --- outputs that would be non-finite -----------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--checkpoint", "{w}/ck_model_huge", "--n", "4", "--steps", "2", "-q", "--out", "{cwd}/s.npz"],
     "NaN or infinite values"),
    (["evaluate", "--checkpoint", "{w}/ck_model_huge", "--n", "8", "--steps", "2"], "gave non-finite values (reward nan"),
    (["reward", "evaluate", "--comparisons", "{w}/cmp.safetensors", "--model", "{w}/rm_huge_weights"],
     "non-finite win probabilities for 60 of 60"),
    (["reward", "fit", "--comparisons", "{w}/inf_items.safetensors", "--out", "{cwd}/rm"],
     "inf_items.safetensors': 1 of 2 comparisons have non-finite samples"),
    (["reward", "evaluate", "--comparisons", "{w}/inf_items.safetensors", "--model", "{w}/rm"],
     "inf_items.safetensors': 1 of 2 comparisons have non-finite samples"),
], ids=["sample", "evaluate", "reward evaluate", "reward fit on inf", "reward evaluate on inf"])
def test_finite_weights_that_give_non_finite_outputs_are_refused(world, tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(tmp_path)
    refused(capsys, world, tmp_path, [a.format(w=world, cwd=tmp_path) for a in argv], fragment)


# --- comparisons without a winner -----------------------------------------------------------------------
@pytest.mark.parametrize("source, message", [
    (["--store", "{w}/ties.db"], "all 10 comparisons are ties"),
    (["--comparisons", "{w}/ties.safetensors"], "all 6 comparisons are ties"),
    (["--store", "{w}/one_winner.db", "--val-fraction", "0.5"], "split"),
])
def test_comparisons_without_a_winner_are_not_fitted(world, tmp_path, monkeypatch, capsys, source, message):
    monkeypatch.chdir(tmp_path)
    argv = ["reward", "fit", *[a.format(w=world) for a in source], "--out", tmp_path / "rm", "--epochs", "1",
            "--min-steps", "1"]
    refused(capsys, world, tmp_path, argv, message)
    assert not (tmp_path / "rm").exists()


# --- seeds and timestamps -----------------------------------------------------------------------------------
SEED_COMMANDS = {
    "train --seed": [*TRAIN, "--out", "{cwd}/out", "--seed", "{v}"],
    "train seed=": [*TRAIN, "--out", "{cwd}/out", "--set", "seed={v}"],
    "train task.seed": ["train", "--task", "diffusers", "--set", "task.seed={v}", "-q", "--out", "{cwd}/out"],
    "sample --seed": ["sample", "--task", "gaussian", "--seed", "{v}", "-q", "--out", "{cwd}/s.npz"],
    "sample task.seed": ["sample", "--task", "diffusers", "--set", "task.seed={v}", "-q", "--out", "{cwd}/s.npz"],
    "add-items": ["feedback", "add-items", "--store", "{w}/store.db", "--task", "gaussian", "--pretrained", "--n", "4",
                  "--seed", "{v}"],
    "enqueue": ["feedback", "enqueue", "--store", "{w}/store.db", "--pairs", "2", "--seed", "{v}"],
    "simulate": ["feedback", "simulate", "--store", "{w}/store.db", "--pairs", "2", "--labeler", "sim", "--seed", "{v}"],
    "reward fit": ["reward", "fit", "--comparisons", "{w}/cmp.safetensors", "--out", "{cwd}/rm", "--seed", "{v}"],
    "reward simulate": ["reward", "simulate", "--task", "gaussian", "--out", "{cwd}/c.safetensors", "--seed", "{v}"],
    "bench": ["bench", "--out", "{cwd}/bench", "--seed", "{v}"],
    "pretrain": ["pretrain", "--out", "{cwd}/pre", "--seed", "{v}"],
    "quickstart": ["quickstart", "--out", "{cwd}/qs", "--set", "seed={v}"],
}


@pytest.mark.parametrize("value", [-1, 2**63, 2**64])
@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_a_seed_out_of_range_is_refused_everywhere(world, tmp_path, monkeypatch, capsys, command, value):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(v=value, w=world, cwd=tmp_path) for a in SEED_COMMANDS[command]]
    refused(capsys, world, tmp_path, argv, "seed must")


def test_a_seed_out_of_range_is_refused_by_the_library():
    from scoreaction.tasks import task_config

    for value in (-1, 2**63, True, 1.5):
        with pytest.raises(ValueError, match="seed must"):
            FitConfig(seed=value)
        with pytest.raises(ValueError, match="seed must"):
            task_config({"name": "diffusers", "seed": value})


@pytest.mark.parametrize("created", [-1, 1e300, float("nan"), float("inf"), 10**400, True, "2024-01-01"])
def test_a_timestamp_out_of_range_is_refused(tmp_path, created):
    from scoreaction.errors import ScoreactionError

    store_with(tmp_path / "s.db", ["left"])
    before = snapshot(tmp_path)
    with PreferenceStore(tmp_path / "s.db") as store:
        ids = [item["id"] for item in store.items()]
        with pytest.raises(ScoreactionError, match="created must be Unix time in seconds") as err:
            store.add_comparisons([{"left": ids[0], "right": ids[1], "choice": "left", "labeler": "ann",
                                    "created": created}])
        assert "\n" not in str(err.value)
        assert len(store.comparisons()) == 1
    assert snapshot(tmp_path).keys() == before.keys()


# --- checkpoints cannot run code ------------------------------------------------------------------------------
CODE_COMMANDS = {
    "evaluate": ["evaluate", "--checkpoint", "{run}", "--n", "2", "--steps", "2"],
    "sample": ["sample", "--checkpoint", "{run}", "--n", "2", "--steps", "2", "-q", "--out", "{cwd}/s.npz"],
    "resume": ["train", "--resume", "{run}", "--updates", "2", "-q", "--out", "{cwd}/resumed"],
    "add-items": ["feedback", "add-items", "--store", "{w}/store.db", "--checkpoint", "{run}", "--n", "2", "--steps",
                  "2"],
}


@pytest.fixture
def code_on_path(world, monkeypatch):
    """The marker module importable (as it was when the run was trained), not yet imported."""
    monkeypatch.syspath_prepend(str(world))
    sys.modules.pop(MARKER_MODULE, None)
    yield world / "marker.txt"
    sys.modules.pop(MARKER_MODULE, None)
    (world / "marker.txt").unlink(missing_ok=True)


@pytest.mark.parametrize("command", CODE_COMMANDS)
def test_a_checkpoint_never_imports_the_code_it_names(world, tmp_path, monkeypatch, capsys, code_on_path, command):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(run=world / "run_code", w=world, cwd=tmp_path) for a in CODE_COMMANDS[command]]
    spec = f"{MARKER_MODULE}:reward"
    refused(capsys, world, tmp_path, argv, f"names reward '{spec}', a module of code",
            f"(--set task.reward={spec})")
    assert not code_on_path.exists() and MARKER_MODULE not in sys.modules


def test_the_command_line_may_name_the_code_again(world, tmp_path, capsys, code_on_path):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", world / "run_code", "--n", 2, "--steps", 2, "-q",
                             "--set", f"task.reward={MARKER_MODULE}:reward", "--out", tmp_path / "s.npz")
    assert code == 0, err
    assert code_on_path.exists() and (tmp_path / "s.npz").exists()
    code, out, err = run_cli(capsys, "sample", "--checkpoint", world / "run_code", "--n", 2, "-q",
                             "--set", "task.prompts=simple", "--out", tmp_path / "t.npz")
    assert code == 2 and "task.prompts" in err and not (tmp_path / "t.npz").exists()


def test_an_entry_point_reward_is_resolved_from_a_checkpoint(tmp_path, monkeypatch):
    from scoreaction.rewards.images import imports_only, make_image_reward

    (tmp_path / "scoreaction_test_ep_rewards.py").write_text("def dark(images, cond=None):\n"
                                                             "    return -images.mean((1, 2, 3))\n")
    info = tmp_path / "scoreaction_test_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scoreaction-test-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[scoreaction.rewards]\nscoreaction_test_dark = "
                                           "scoreaction_test_ep_rewards:dark\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with imports_only([], "checkpoint 'x'"):
        reward = make_image_reward("scoreaction_test_dark")
        with pytest.raises(ValueError, match="checkpoint 'x' names reward 'scoreaction_test_ep_rewards:dark'"):
            make_image_reward("scoreaction_test_ep_rewards:dark")
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(reward(images), -images.mean((1, 2, 3)))


# --- defaults sized for the task ------------------------------------------------------------------------------
def test_sample_draws_a_handful_of_images_of_a_diffusers_task_by_default(tmp_path, capsys):
    code, out, err = run_cli(capsys, "sample", "--task", "diffusers", "--device", "cpu", "--threads", 1,
                             "--out", tmp_path / "s.npz")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape[0] == 8
    assert "steps 20" in out and "n 8" in out
    assert "8 samples" in err  # the count in the progress bar


def test_evaluate_defaults_to_the_runs_evaluation_sizes(world, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", world / "run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 64 and result["steps"] == 4  # the run's --eval-n and --eval-steps
