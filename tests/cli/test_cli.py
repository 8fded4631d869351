"""The command line: outputs, config precedence, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from scoreaction.cli import main
from scoreaction.tasks import make_task


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


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
    cfg.write_text("task:\n  name: gaussian\n  dim: 3\nsample:\n  solver: ddim\n  steps: 7\n  n: 50\n")
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
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, expected):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "x.npz"), "-q") if argv[0] == "sample" \
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
