"""Resume continues exactly the run it names, never rewrites what was written, and a step that would make the
weights non-finite is rolled back."""

import json

import pytest
import torch

from scoreaction.train import Trainer
from tests.helpers import one_line_error, run_cli
from tests.train.test_train import config

ARGS = ["--batch-size", "16", "--steps", "4", "--eval-n", "64", "--eval-steps", "8", "-q"]


@pytest.fixture
def run(tmp_path, capsys):
    """A two-update ctrl run with a checkpoint after each update."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--updates", "2", "--checkpoint-every", "1", "--out", out, *ARGS)
    assert code == 0, err
    return out


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "ddpo"], "algorithm was 'ctrl', found 'ddpo'"),
    (["--set", "task.name=mixture"], "task was"),
    (["--set", "task.beta_kl=0.5"], "task was"),
    (["--seed", "7"], "seed was 0, found 7"),
    (["--hidden", "64"], "hidden was 128"),
    (["--set", "algo.lr=0.01"], "algo was"),
    (["--steps", "8"], "steps was 4"),
    (["--updates", "1"], "updates 1 is fewer than the 2"),
])
def test_incompatible_resume_is_refused_and_writes_nothing(run, capsys, argv, message):
    before = files(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, *argv, "-q")
    one_line_error(code, err, message)
    assert files(run) == before


def test_safe_changes_are_recorded_and_nothing_is_rewritten(run, capsys):
    before = files(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--updates", "3", "--eval-every", "1", "-q")
    assert code == 0, err
    after = files(run)
    for name, data in before.items():
        if name != "metrics.jsonl" and not name.endswith("latest"):
            assert after[name] == data, name  # config.json and both checkpoints untouched
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"step": 2, "changes": {"updates": [2, 3], "eval_every": [20, 1]}}]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # step 0: the pretrained policy's evaluation, the baseline of the curve
    code, _, err = run_cli(capsys, "train", "--resume", run, "--updates", "3", "-q")  # nothing left to do
    assert code == 0 and files(run).keys() == after.keys()
    assert (run / "checkpoints" / "step-000003" / "state.json").read_bytes() == after["checkpoints/step-000003/state.json"]


def test_resume_cuts_the_log_back_to_the_checkpoint(run, capsys):
    """A kill after step 2 was logged but before its checkpoint: resuming from step 1 leaves each step once."""
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "reward_mean": 0.0}\n{"step": 4, "rew')  # torn last line
    code, _, err = run_cli(capsys, "train", "--resume", run / "checkpoints" / "step-000001", "--updates", "3", "-q")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # step 0: the pretrained policy's evaluation, the baseline of the curve


def test_a_step_that_makes_the_weights_non_finite_is_rolled_back(tmp_path, capsys):
    trainer = Trainer(config(tmp_path, "ctrl", updates=1), progress=False)
    before = [p.detach().clone() for p in trainer.params]
    state = json.dumps({k: v for k, v in trainer.optimizer.state_dict()["param_groups"][0].items() if k != "params"})
    trainer.learning_rate = lambda: float("inf")  # as --set algo.lr=.inf would, were it not refused up front
    metrics = trainer.update()
    assert metrics["rolled_back"] > 0 and "rolled back" in capsys.readouterr().err
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before))
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert not trainer.optimizer.state  # Adam's moments were restored to before the step (none yet)
    assert json.loads(state)["lr"] == trainer.algorithm.config.lr
