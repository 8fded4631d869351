"""The trainer: exact resume, non-finite rewards never reach the weights, checkpoints, CLI."""

import json

import pytest
import torch

from scoreaction.cli import main
from scoreaction.train import TrainConfig, Trainer
from scoreaction.train.loop import NonFiniteReward

SMALL = dict(batch_size=32, steps=6, eval_n=256, eval_steps=20, eval_every=0, dtype="float64")


def config(tmp_path, algorithm="ctrl", name="run", **kw):
    return TrainConfig(algorithm=algorithm, out=str(tmp_path / name), **{"task": {"name": "gaussian"}, **SMALL, **kw})


def weights(tr):
    state = {f"policy.{k}": v.clone() for k, v in tr.policy.state_dict().items()}
    for name, module in tr.algorithm.modules().items():
        state.update({f"{name}.{k}": v.clone() for k, v in module.state_dict().items()})
    return state


def last_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("algorithm", ["ctrl", "ddpo"])
def test_resume_continues_exactly(tmp_path, algorithm):
    full = Trainer(config(tmp_path, algorithm, "full", updates=4, grid="random"), progress=False)
    full.run()
    first = Trainer(config(tmp_path, algorithm, "split", updates=2, grid="random"), progress=False)
    first.run()
    resumed = Trainer.from_checkpoint(str(tmp_path / "split"), {"updates": 4}, progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    m_full, m_resumed = last_metrics(tmp_path / "full"), last_metrics(tmp_path / "split")
    for key in ("step", "trajectories", "reward_mean", "path_kl", "J", "loss", "eval_J"):
        assert m_full[key] == m_resumed[key], key


def test_checkpoint_is_safetensors_and_json(tmp_path):
    tr = Trainer(config(tmp_path, updates=1), progress=False)
    tr.run()
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.json", "train.safetensors"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000001"
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 1 and state["config"]["algorithm"] == "ctrl"
    for name in ("model.safetensors", "train.safetensors"):
        assert b"\x80\x04" not in (folder / name).read_bytes()[:2]  # not a pickle


def test_non_finite_reward_never_reaches_the_weights(tmp_path):
    tr = Trainer(config(tmp_path, max_skipped=3, updates=10), progress=False)
    reward = tr.task.reward
    before = weights(tr)

    def bad_reward(x, cond=None):
        r = reward(x, cond)
        r[3] = float("nan")
        return r

    tr.task.reward = bad_reward
    for step in (1, 2):
        metrics = tr.update()
        assert metrics["skipped"] == 1 and f"update {step}" in metrics["message"] and "non-finite" in metrics["message"]
    after = weights(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(NonFiniteReward, match="update 3: .*stopping after 3 such batches in a row"):
        tr.update()
    tr.task.reward = reward  # a good batch resets the count and trains
    assert "skipped" not in tr.update()
    assert any(not torch.equal(before[k], v) for k, v in weights(tr).items())


def test_reward_of_the_wrong_shape_stops_with_a_clear_message(tmp_path):
    tr = Trainer(config(tmp_path), progress=False)
    reward = tr.task.reward
    tr.task.reward = lambda x, cond=None: reward(x, cond).unsqueeze(-1)
    with pytest.raises(ValueError, match=r"update 1: the reward must return a float tensor of shape \(32,\), "
                                         r"found shape \(32, 1\)"):
        tr.update()
    tr.task.reward = lambda x, cond=None: (reward(x, cond) > 0).long()
    with pytest.raises(ValueError, match="dtype torch.int64"):
        tr.update()


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be a positive integer, found 0"),
    ("grid", "zigzag", "grid must be one of"),
    ("algorithm", "ppo", "algorithm must be one of"),
    ("task", {"name": "gaussain", "dim": 2}, "task must be one of"),
    ("task", [2], "task must be a mapping of options with a 'name'"),
    ("algo", {"group_size": 4}, "unknown option 'group_size' for algorithm 'ctrl'"),
])
def test_invalid_train_config(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **{field: value})


def test_cli_train_evaluate_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--algorithm", "dpok", "--updates", "2", "--out", str(out), "-q"]
    for key, value in SMALL.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    assert "eval_fraction" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out), "--solver", "dpm2", "--steps", "5", "--n", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["solver"] == "dpm2" and result["step"] == 2 and "gain" in result
    assert main(["train", "--resume", str(out), "--updates", "3", "-q"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "algo.lr=-1"], "lr must be a number > 0, found -1"),
    (["train", "--set", "algo.clip=0"], "clip must be a number > 0, found 0"),
    (["train", "--algorithm", "ppo"], "algorithm must be one of"),
    (["train", "--set", "learning_rate=1"], "unknown option 'learning_rate' for training"),
    (["evaluate", "--checkpoint", "/nonexistent/run"], "is not a folder"),
])
def test_cli_bad_training_input(tmp_path, capsys, argv, message):
    assert main(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    tr = Trainer(config(tmp_path, updates=1), progress=False)
    tr.run()
    model = tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:40])
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    Trainer(config(tmp_path, updates=1), progress=False).run()
    with pytest.raises(ValueError, match="does not match the policy"):
        Trainer(config(tmp_path, updates=1, hidden=64), resume=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="hidden was 128, found 64"):  # what from_checkpoint refuses up front
        Trainer.from_checkpoint(str(tmp_path / "run"), {"hidden": 64}, progress=False)


def test_monitors_are_logged_and_never_trained_on(tmp_path):
    """A monitor equal to the reward logs the reward's batch mean; a second run without it has the same weights."""
    seen = []

    def reward_copy(x, cond=None):
        seen.append(x.shape[0])
        return tr.task.reward(x, cond)

    tr = Trainer(config(tmp_path, updates=2), progress=False, monitors={"copy": reward_copy})
    metrics = [tr.update() for _ in range(2)]
    assert seen == [32, 32]
    for m in metrics:
        assert m["copy_mean"] == pytest.approx(m["reward_mean"], rel=1e-12)
    plain = Trainer(config(tmp_path, name="plain", updates=2), progress=False)
    for _ in range(2):
        plain.update()
    for a, b in zip(weights(tr).values(), weights(plain).values()):
        assert torch.equal(a, b)


def test_evaluation_defaults_come_from_the_task(tmp_path):
    cfg = dict(batch_size=8, steps=4, eval_every=0)
    assert (lambda t: (t.eval_n, t.eval_steps))(Trainer(config(tmp_path, **cfg, eval_n=None, eval_steps=None),
                                                        progress=False)) == (4096, 200)
    digits = Trainer(TrainConfig(task={"name": "digits"}, out=str(tmp_path / "d"), **cfg), progress=False)
    assert (digits.eval_n, digits.eval_steps) == (512, 50)
    explicit = Trainer(TrainConfig(task={"name": "digits"}, out=str(tmp_path / "e"), eval_n=16, eval_steps=3, **cfg),
                       progress=False)
    assert (explicit.eval_n, explicit.eval_steps) == (16, 3)


def test_linear_schedule_decays_to_zero_and_resumes_exactly(tmp_path):
    lr = 1e-3
    full = Trainer(config(tmp_path, name="full", updates=4, lr_schedule="linear", checkpoint_every=2, algo={"lr": lr}),
                   progress=False)
    full.run()
    logged = [json.loads(line)["lr"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr], rel=1e-12)
    resumed = Trainer.from_checkpoint(str(tmp_path / "full" / "checkpoints" / "step-000002"),
                                      {"out": str(tmp_path / "resumed")}, progress=False)
    assert resumed.learning_rate() == pytest.approx(0.5 * lr)
    resumed.run()
    for key, value in weights(full).items():
        assert torch.equal(value, weights(resumed)[key]), key
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        config(tmp_path, lr_schedule="cosine")


def test_config_is_typed_and_round_trips(tmp_path):
    from scoreaction.algorithms.ctrl import CTRLConfig
    from scoreaction.tasks.gaussian import GaussianConfig

    cfg = config(tmp_path, task={"dim": 4}, algo={"lr": 0.01})  # a task mapping without a name is gaussian's
    assert isinstance(cfg.task, GaussianConfig) and cfg.task.dim == 4
    assert isinstance(cfg.algo, CTRLConfig) and cfg.algo.lr == 0.01 and cfg.algo.clip == CTRLConfig().clip
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="group_size=8, found 12"):  # checked once, at construction
        config(tmp_path, algorithm="grpo", algo={"group_size": 8}, batch_size=12)
