"""The command line: outputs, config precedence, and one-line errors with exit code 2."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_cli as run

from scoreaction.cli import main
from scoreaction.tasks import make_task


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("tasks", "sample", "reference"):
        assert command in out


def test_tasks_lists_builtin_tasks(capsys):
    code, out, _ = run(capsys, "tasks", "-v")
    assert code == 0
    assert "gaussian" in out and "mixture" in out and "defaults" in out


def test_reference_json_matches_library(capsys):
    code, out, _ = run(capsys, "reference", "--task", "gaussian", "--json", "--set", "task.dim=3",
                       "--set", "task.beta_kl=0.5")
    assert code == 0
    ref = json.loads(out)
    exact = make_task("gaussian", {"dim": 3, "beta_kl": 0.5}).reference()
    assert ref["dim"] == 3 and ref["J_star"] == pytest.approx(exact["J_star"], rel=1e-12)
    assert ref["E_pre_r"] < ref["J_star"]


def test_sample_writes_npz_without_pickle(capsys, tmp_path):
    out_file = tmp_path / "s.npz"
    code, out, _ = run(capsys, "sample", "--task", "gaussian", "--solver", "heun", "--steps", "10", "--n", "500",
                       "--policy", "optimal", "--out", str(out_file), "-q")
    assert code == 0, out
    data = np.load(out_file, allow_pickle=False)
    assert data["samples"].shape == (500, 2) and data["rewards"].shape == (500,)
    assert data["times"].shape == (11,)
    config = json.loads(str(data["config"]))
    assert config["sample"]["solver"] == "heun" and config["sample"]["eta"] == 0.0
    assert "Gaussian-fit KL to p_star" in out


def test_config_file_then_flags_then_set(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task:\n  name: gaussian\n  dim: 3\nsolver: ddim\nsteps: 7\nn: 50\n")
    out_file = tmp_path / "s.npz"
    code, _, err = run(capsys, "sample", "--config", str(cfg), "--steps", "5", "--set", "task.dim=4",
                       "--out", str(out_file), "-q")
    assert code == 0, err
    data = np.load(out_file, allow_pickle=False)
    config = json.loads(str(data["config"]))
    assert data["samples"].shape == (50, 4)          # --set beats the file
    assert config["sample"]["steps"] == 5           # a flag beats the file
    assert config["sample"]["solver"] == "ddim"     # the file beats the defaults


@pytest.mark.parametrize("argv, expected", [
    (["sample", "--task", "nope"], "task must be one of"),
    (["sample", "--solver", "rk9"], "solver must be one of"),
    (["sample", "--steps", "-3"], "steps must be a positive integer, found -3"),
    (["sample", "--steps", "0"], "steps must be a positive integer, found 0"),
    (["sample", "--grid", "zig"], "grid must be one of"),
    (["sample", "--set", "task.cov=[[1,2],[2,1]]"], "positive definite"),
    (["sample", "--set", "task.mean=[1,2,3]"], "found shape (3,)"),
    (["sample", "--policy", "optimal", "--set", "task.beta_kl=0"], "needs beta_kl > 0, found 0"),
    (["reference", "--set", "task.beta_kl=0"], "needs beta_kl > 0, found 0"),
    (["sample", "--set", "task.beta_kl=-1"], "beta_kl must be a number >= 0, found -1"),
    (["reference", "--set", "task.dimm=3"], "unknown option 'dimm'"),
    (["reference", "--task", "mixture", "--set", "task.covs=[[[1,0],[0,-1]]]"], "covs must list 3"),
    (["sample", "--solver", "heun", "--eta", "1"], "needs eta = 0"),
    (["sample", "--config", "/nonexistent/c.yaml"], "does not exist"),
    (["sample", "--set", "novalue"], "section.key=value"),
    (["sample", "--set", "solverr=em"], "unknown option 'solverr' for sample"),
    (["sample", "--policy", "finetuned"], "policy 'finetuned' needs --checkpoint RUN"),
    (["sample", "--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
    (["sample", "--policy", "optimal", "--task", "digits"], "needs a task with an exact optimum"),
    (["reference", "--task", "digits"], "has no exact reference"),
    (["train", "--set", "algo.lr=.inf", "--set", "task.dimm=2"], "unknown option 'dimm' for task 'gaussian'"),
    (["train", "--algorithm", "grpo", "--batch-size", "20"], "batch_size must be a multiple of grpo's group_size=16"),
    (["evaluate"], "expected --checkpoint (a checkpoint folder or a run folder) or --pretrained"),
    (["bench", "--task", "nope"], "--task must be one of"),
    (["bench", "--task", "digits", "--only", "cost"], "--only applies to --task exact and efficiency"),
    (["bench", "--task", "efficiency", "--methods", "foo"], "methods must be a non-empty subset of ['ctrl', "),
    (["bench", "--task", "digits", "--methods", "ctrl"], "--methods applies to --task efficiency"),
    (["bench", "--task", "efficiency", "--seeds", "1"], "--seeds must be at least 2 for an interval over seeds"),
    (["bench", "--task", "efficiency", "--only", "speed"], "--only takes a comma-separated subset of methods,"),
    (["pretrain", "--steps", "0"], "steps must be a positive integer, found 0"),
    (["quickstart", "--set", "updates=-1"], "updates must be a positive integer"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, expected):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "x.npz"), "-q") if argv[0] in ("sample", "train") \
        else run(capsys, *argv)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


def test_usage_errors_from_a_real_process(tmp_path):
    for argv in (["sample", "--steps", "abc"], ["bogus"], ["sample", "--task", "nope", "-q"]):
        proc = subprocess.run([sys.executable, "-m", "scoreaction", *argv], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_sample_a_conditional_image_task(capsys, tmp_path):
    out_file = tmp_path / "digits.npz"
    code, out, err = run(capsys, "sample", "--task", "digits", "--solver", "ddim", "--steps", "3", "--n", "6",
                         "--out", str(out_file), "-q")
    assert code == 0, err
    data = np.load(out_file, allow_pickle=False)
    assert data["samples"].shape == (6, 1, 8, 8) and data["conditions"].shape == (6,)
    assert "exact E[r]" not in out  # no closed form for images


def test_every_command_takes_config_and_set():
    from scoreaction.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*prefix, name))
                return
        yield prefix, parser

    found = list(commands(build_parser()))
    assert len(found) >= 20  # train, evaluate, sample, ..., feedback and reward subcommands
    for name, parser in found:
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {"--config", "--set"} <= flags, " ".join(name)


def test_sample_a_checkpoint_reproduces_the_policy(capsys, tmp_path):
    """`sample --checkpoint RUN` draws from the fine-tuned score: the same samples as the library's policy."""
    import torch

    from scoreaction.samplers import get_solver, make_grid
    from scoreaction.train import Trainer

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--updates", "2", "--batch-size", "32", "--eval-every", "0",
                       "--set", "eval_n=64", "--set", "algo.lr=1e-2", "--out", str(run_dir), "-q")
    assert code == 0, err
    out_file = tmp_path / "ft.npz"
    code, out, err = run(capsys, "sample", "--checkpoint", str(run_dir), "--solver", "heun", "--steps", "8",
                         "--n", "64", "--seed", "3", "--out", str(out_file), "-q")
    assert code == 0, err
    samples = np.load(out_file, allow_pickle=False)["samples"]

    trainer = Trainer.from_checkpoint(str(run_dir), progress=False)
    gen = torch.Generator().manual_seed(3)
    x0, _ = trainer.task.start(64, generator=gen, dtype=trainer.dtype)
    ts = make_grid("uniform", trainer.task.path, 8, generator=gen)
    with torch.no_grad():
        expected = get_solver("heun").sample(trainer.task.path, trainer.policy.score, x0, ts, eta=0.0)
        pretrained = get_solver("heun").sample(trainer.task.path, trainer.task.pretrained, x0, ts, eta=0.0)
    np.testing.assert_allclose(samples, expected.numpy(), rtol=0, atol=1e-6)
    assert np.abs(samples - pretrained.numpy()).max() > 1e-3  # the fine-tuned score is not the pretrained one


def test_sample_a_digits_checkpoint_writes_a_png_grid(capsys, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "d"
    code, _, err = run(capsys, "train", "--task", "digits", "--updates", "1", "--batch-size", "4", "--steps", "2",
                       "--set", "eval_n=4", "--set", "eval_steps=2", "--out", str(run_dir), "-q")
    assert code == 0, err
    out_file = tmp_path / "d.npz"
    code, out, err = run(capsys, "sample", "--checkpoint", str(run_dir), "--solver", "dpm2", "--grid", "logsnr",
                         "--steps", "4", "--n", "20", "--out", str(out_file), "-q")
    assert code == 0, err
    data = np.load(out_file, allow_pickle=False)
    assert data["samples"].shape == (20, 1, 8, 8) and data["conditions"].shape == (20,)
    image = Image.open(tmp_path / "d.png")
    assert image.size == (4 * (10 * 9 + 1), 4 * (2 * 9 + 1))  # 10 per row, 8 px + 1 px padding, scaled 4x
    assert "d.png" in out
