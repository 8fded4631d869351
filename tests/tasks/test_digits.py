"""The digits task: pretraining, the shipped checkpoint, classifier, image metrics, fine-tuning, errors."""

import json
import shutil

import pytest
import torch

from scoreaction.cli import main
from scoreaction.image_metrics import class_accuracy, frechet_distance
from scoreaction.models.classifier import ClassifierTrainConfig, accuracy
from scoreaction.tasks import make_task
from scoreaction.tasks.digits import SHIPPED, DigitsConfig, DigitsTask, digits_data, pretrain
from scoreaction.train import TrainConfig, Trainer

TINY = ["--steps", "2", "--classifier-epochs", "1", "--no-evaluate", "-q"]


@pytest.fixture(scope="module")
def task():
    return make_task("digits")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint from a 2-step pretraining through the CLI."""
    out = tmp_path_factory.mktemp("pretrain") / "tiny"
    assert main(["pretrain", "--task", "digits", *TINY, "--out", str(out)]) == 0
    return out


def test_tiny_pretrain_writes_a_loadable_checkpoint(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["classifier.safetensors", "config.json", "unet.safetensors"]
    manifest = json.loads((tiny / "config.json").read_text())
    assert manifest["task"] == "digits" and manifest["unet"]["train"]["steps"] == 2
    t = DigitsTask(DigitsConfig(checkpoint=str(tiny), classifier=str(tiny), guidance=1.0))
    x, cond = t.prior_sample(4), t.sample_conditions(4)
    score = t.pretrained(0.5, x, cond)
    assert score.shape == x.shape and torch.isfinite(score).all()
    assert t.reward(x, cond).shape == (4,)


def test_pretrain_is_reproducible(tmp_path, tiny):
    pretrain(tmp_path / "again", steps=2, seed=0, classifier_config=ClassifierTrainConfig(epochs=1), evaluate=False,
             log=lambda _: None)
    for name in ("unet.safetensors", "classifier.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny / name).read_bytes(), name


def test_shipped_checkpoint_is_small_and_describes_itself():
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 5e6
    manifest = json.loads((SHIPPED / "config.json").read_text())
    assert manifest["format"] == "scoreaction-digits-1" and manifest["command"].startswith("scoreaction pretrain")


def test_shipped_model_samples_are_the_asked_digits(task):
    """10 per class, DDIM with 25 steps, no guidance: measured 0.96 with 30 per class and 50 steps."""
    cond = torch.arange(10).repeat_interleave(10)
    x = task.sample(cond=cond, solver="ddim", steps=25, seed=0)
    assert x.shape == (100, 1, 8, 8) and torch.isfinite(x).all()
    assert class_accuracy(task.classifier, x, cond)["accuracy"] >= 0.8


def test_guidance_sharpens_the_classes(task):
    guided = DigitsTask(DigitsConfig(guidance=2.0))
    cond = torch.arange(10).repeat_interleave(5)
    r_plain = task.reward(task.sample(cond=cond, steps=20, seed=1), cond).mean()
    r_guided = guided.reward(guided.sample(cond=cond, steps=20, seed=1), cond).mean()
    assert r_guided > r_plain


def test_classifier_is_accurate_on_held_out_digits(task):
    for split in ("heldout_a", "heldout_b"):
        assert accuracy(task.classifier, *digits_data(split)) > 0.9


def test_frechet_real_vs_real_is_far_below_noise_vs_real(task):
    (a, _), (b, _) = digits_data("heldout_a"), digits_data("heldout_b")
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    floor, noisy = frechet_distance(task.classifier, a, b), frechet_distance(task.classifier, noise, b)
    assert floor * 10 < noisy


def test_splits_are_disjoint_and_scaled():
    sets = [digits_data(s)[0].reshape(-1, 64) for s in ("train", "heldout_a", "heldout_b")]
    assert [len(s) for s in sets] == [1197, 300, 300]
    assert all(float(s.min()) == -1.0 and float(s.max()) == 1.0 for s in sets)


@pytest.mark.parametrize("action", ["full", "residual"])
def test_action_starts_at_the_pretrained_score(action):
    t = DigitsTask(DigitsConfig(action=action, guidance=0.5))
    mu = t.make_action()
    x, cond = t.prior_sample(3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 4, 9])
    torch.testing.assert_close(mu(0.3, x, cond), t.pretrained(0.3, x, cond))
    assert any(p.requires_grad for p in mu.parameters())
    assert not any(p.requires_grad for p in t.pretrained.parameters())


@pytest.mark.parametrize("action", ["full", "residual"])
def test_short_finetune_changes_the_policy(tmp_path, action):
    cfg = TrainConfig(task={"name": "digits", "action": action}, algorithm="ctrl", updates=2, batch_size=8, steps=4,
                      eval_every=0, eval_n=8, eval_steps=4, out=str(tmp_path / "run"))
    tr = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    last = tr.run()
    after = tr.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(before)
    assert "eval_reward" in last and (tmp_path / "run" / "checkpoints" / "latest").is_file()
    x, cond = tr.task.prior_sample(2), torch.tensor([1, 2])
    assert not torch.allclose(tr.policy.score(0.5, x, cond), tr.task.pretrained(0.5, x, cond))


def test_train_cli_runs_on_digits(tmp_path, capsys):
    code = main(["train", "--task", "digits", "--algorithm", "ctrl", "--updates", "1", "-q", "--out", str(tmp_path),
                 "--set", "batch_size=8", "--set", "steps=4", "--set", "eval_n=8", "--set", "eval_steps=4"])
    assert code == 0 and "eval_reward" in capsys.readouterr().out


def test_float64_training_runs_the_frozen_model_in_its_own_dtype(tmp_path):
    cfg = TrainConfig(task={"name": "digits", "action": "residual"}, algorithm="ctrl", updates=1, batch_size=4, steps=3,
                      dtype="float64", eval_every=0, eval_n=4, eval_steps=3, out=str(tmp_path / "run"))
    assert torch.isfinite(torch.tensor(Trainer(cfg, progress=False).run()["J"]))


# --- errors -----------------------------------------------------------------------------------------
def test_conditions_outside_the_classes_are_value_errors(task):
    x = task.prior_sample(2)
    for bad in (torch.tensor([0, 10]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match=r"class labels must lie in 0..9"):
            task.pretrained(0.5, x, bad)
        with pytest.raises(ValueError, match=r"class labels must lie in 0..9"):
            task.reward(x, bad)
    with pytest.raises(ValueError, match="integer tensor"):
        task.reward(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"classes must lie in 0..9, found 12"):
        make_task("digits", {"classes": [3, 12]})
    assert set(make_task("digits", {"classes": [3, 5]}).sample_conditions(50).tolist()) == {3, 5}


def _copy_shipped(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, folder)
    return folder


def test_truncated_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    folder = _copy_shipped(tmp_path)
    data = (folder / "unet.safetensors").read_bytes()
    (folder / "unet.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"unet\.safetensors' is truncated or corrupt"):
        make_task("digits", {"checkpoint": str(folder)})


def test_mismatched_shapes_are_a_value_error_naming_the_file(tmp_path):
    folder = _copy_shipped(tmp_path)
    manifest = json.loads((folder / "config.json").read_text())
    manifest["unet"]["config"]["base"] = 32
    (folder / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"unet\.safetensors' does not match its config: .* has shape"):
        make_task("digits", {"checkpoint": str(folder)})


def test_wrong_task_or_missing_files_are_value_errors(tmp_path):
    folder = _copy_shipped(tmp_path)
    manifest = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**manifest, "task": "gaussian"}))
    with pytest.raises(ValueError, match=r"config\.json' is for task 'gaussian', expected 'digits'"):
        make_task("digits", {"checkpoint": str(folder)})
    with pytest.raises(ValueError, match="is not a folder"):
        make_task("digits", {"checkpoint": str(tmp_path / "nowhere")})
    (folder / "config.json").write_text(json.dumps(manifest))
    (folder / "classifier.safetensors").unlink()
    with pytest.raises(ValueError, match="missing classifier.safetensors"):
        make_task("digits", {"classifier": str(folder)})
    with pytest.raises(ValueError, match="trained on path"):
        make_task("digits", {"path": "cosine"})


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--task", "digits", "--updates", "1", "--set", f"task.checkpoint={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing config.json" in err
    assert main(["pretrain", "--task", "gaussian", "--out", str(tmp_path / "x")]) == 2
    assert "task must be one of ['digits', 'shapes']" in capsys.readouterr().err


# --- rewards by name, and the residual action with a cached pretrained score --------------------------
def test_utility_and_learned_rewards(tmp_path, task):
    from scoreaction.rewards.preference import Comparisons, fit_reward_model
    from scoreaction.rewards.utilities import make_utility

    x, cond = digits_data("heldout_a")
    torch.testing.assert_close(make_task("digits", {"reward": "utility:ink"}).reward(x[:5], cond[:5]),
                               make_utility("digits", "ink")(x[:5]))
    half = len(x) // 2
    fit = fit_reward_model(Comparisons(left=x[:half], right=x[half:2 * half], choice=torch.ones(half),
                                       cond=cond[:half]), ensemble=2, epochs=1, min_steps=2, num_classes=10)
    fit.model.save(tmp_path / "rm")
    learned = make_task("digits", {"reward": f"learned:{tmp_path / 'rm'}"}).reward
    torch.testing.assert_close(learned(x[:5], cond[:5]), fit.model(x[:5], cond[:5]))
    with pytest.raises(ValueError, match="needs the reward model's folder"):
        make_task("digits", {"reward": "learned"})
    points = fit_reward_model(Comparisons(left=torch.randn(8, 2), right=torch.randn(8, 2), choice=torch.ones(8)),
                              ensemble=1, epochs=1, min_steps=1)
    points.model.save(tmp_path / "points")
    with pytest.raises(ValueError, match=r"takes samples of shape \(2,\) with 0 classes; the digits task needs shape"):
        make_task("digits", {"reward": f"learned:{tmp_path / 'points'}"})
    with pytest.raises(ValueError, match="digits reward must be one of"):
        make_task("digits", {"reward": "beauty"})


def test_residual_action_with_a_cached_pretrained_score_is_the_same_action(task):
    mu = task.make_action()
    torch.nn.init.normal_(mu.conv_out.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    x, cond = task.prior_sample(3, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 5, 7])
    s = torch.tensor([0.2, 0.5, 0.9])
    s_pre = task.pretrained(s, x, cond)
    torch.testing.assert_close(mu(s, x, cond, s_pre=s_pre), mu(s, x, cond), rtol=0, atol=1e-6)
    assert not torch.allclose(mu(s, x, cond), s_pre, atol=1e-3)  # the correction is really there


def test_x0_residual_is_the_eps_residual_scaled_to_fade_in_the_noise(task):
    """The same net read two ways (EpsResidual): eps gives delta = -h / sigma, x0 gives delta = K_s h with
    K_s = posterior_gain, E21's gain for data of variance DATA_VAR: 1 at the data, ~ alpha(s) DATA_VAR in the noise."""
    from scoreaction.models.residual import posterior_gain
    from scoreaction.tasks.digits import DATA_VAR, EpsResidual

    eps, x0 = (EpsResidual(task.pretrained, residual=r) for r in ("eps", "x0"))
    torch.nn.init.normal_(eps.conv_out.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    x0.load_state_dict(eps.state_dict())
    x, cond = task.prior_sample(3, generator=torch.Generator().manual_seed(1)).double(), torch.tensor([2, 5, 7])
    eps.double(), x0.double()
    s = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    s_pre = task.pretrained(s, x, cond)
    h = -task.path.sigma(s)[:, None, None, None] * (eps(s, x, cond, s_pre=s_pre) - s_pre)
    gain = posterior_gain(task.path, s, DATA_VAR)
    torch.testing.assert_close(x0(s, x, cond, s_pre=s_pre) - s_pre, gain[:, None, None, None] * h)
    a, sig2 = task.path.alpha(s), task.path.sigma2(s)
    torch.testing.assert_close(gain, a * DATA_VAR / (a**2 * DATA_VAR + sig2))
    assert float(posterior_gain(task.path, 0.0, DATA_VAR)) == pytest.approx(1.0)
    assert float(posterior_gain(task.path, 1.0, DATA_VAR)) == pytest.approx(float(task.path.alpha(1.0)) * DATA_VAR,
                                                                            rel=1e-3)
    with pytest.raises(ValueError, match="residual must be one of"):
        DigitsConfig(residual="score")
