"""`scoreaction reward ...`: simulate -> fit -> evaluate end to end, from a file and from a store;
user errors are one line with exit code 2."""

import json

import pytest
import torch
from helpers import one_line_error
from helpers import run_cli as run

from scoreaction.feedback.labelers import SimulatedLabeler, make_utility
from scoreaction.rewards.preference import Comparisons, load_comparisons, load_reward_model, save_comparisons

FAST = ["--ensemble", "2", "--epochs", "2", "--min-steps", "60"]


@pytest.fixture
def comparisons_file(tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    code, out, _ = run(capsys, "reward", "simulate", "--task", "mixture", "--n", "300", "--items", "300",
                       "--out", path, "--temperature", "0.3", "--seed", "1")
    assert code == 0 and "300 comparisons" in out and "ceiling accuracy" in out
    return path


def test_fit_then_evaluate_from_a_file(comparisons_file, tmp_path, capsys):
    out_dir = tmp_path / "rm"
    code, out, err = run(capsys, "reward", "fit", "--comparisons", comparisons_file, "--out", out_dir, *FAST,
                         "--val-fraction", "0.25", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n_train"] == 225 and summary["n_val"] == 75
    assert summary["config"]["ensemble"] == 2 and summary["config"]["architecture"] == "mlp"
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "reward.json").is_file()
    model = load_reward_model(out_dir)
    assert model(torch.zeros(4, 2)).shape == (4,)

    code, out, _ = run(capsys, "reward", "evaluate", "--model", out_dir, "--comparisons", comparisons_file, "--json")
    assert code == 0
    metrics = json.loads(out)
    assert metrics["n"] == 300 and 0.6 < metrics["accuracy"] <= 1.0
    assert metrics["log_likelihood"] < 0 and 0 <= metrics["ece"] < 0.5
    assert sum(row["count"] for row in metrics["reliability"]) == 300

    code, out, _ = run(capsys, "reward", "evaluate", "--model", out_dir, "--comparisons", comparisons_file)
    assert code == 0 and "accuracy" in out and "reliability" in out


def test_fit_from_a_preference_store(tmp_path, capsys):
    from scoreaction.feedback.store import PreferenceStore

    store = PreferenceStore(tmp_path / "prefs.db", create=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(30, 1, 8, 8, generator=gen) * 2 - 1
    cond = torch.arange(30) % 3
    ids = store.add_items(x, task="digits", conditions=cond.tolist())
    labeler = SimulatedLabeler(make_utility("digits"), temperature=0.5, seed=0)
    rows = []
    for a in range(30):
        for b in range(a + 3, 30, 3):  # same class
            choice = labeler.choose(x[a:a + 1], x[b:b + 1])[0]
            rows.append({"left": ids[a], "right": ids[b], "choice": choice, "labeler": "sim"})
    store.add_comparisons(rows)
    out_dir = tmp_path / "rm"
    code, out, err = run(capsys, "reward", "fit", "--store", tmp_path / "prefs.db", "--task", "digits",
                         "--out", out_dir, "--ensemble", "2", "--epochs", "1", "--min-steps", "10")
    assert code == 0, err
    assert "cnn" in out and "classes 3" in out and "validation" in out
    model = load_reward_model(out_dir)
    assert model.num_classes == 3 and model(x[:5], cond[:5]).shape == (5,)
    code, out, _ = run(capsys, "reward", "evaluate", "--model", out_dir, "--store", tmp_path / "prefs.db", "--json")
    assert code == 0 and json.loads(out)["n"] == len(rows)


def test_user_errors_are_one_line(comparisons_file, tmp_path, capsys):
    code, _, err = run(capsys, "reward", "fit", "--comparisons", tmp_path / "missing.safetensors",
                       "--out", tmp_path / "x")
    one_line_error(code, err, "missing.safetensors", "does not exist")

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"left": torch.zeros(5, 2), "right": torch.zeros(4, 2), "choice": torch.ones(5)}, str(bad))
    code, _, err = run(capsys, "reward", "fit", "--comparisons", bad, "--out", tmp_path / "x")
    one_line_error(code, err, "bad.safetensors", "same shape")

    save_file({"left": torch.zeros(5, 2), "choice": torch.ones(5)}, str(bad))
    code, _, err = run(capsys, "reward", "fit", "--comparisons", bad, "--out", tmp_path / "x")
    one_line_error(code, err, "lacks tensor 'right'")

    code, _, err = run(capsys, "reward", "fit", "--store", tmp_path / "nostore.db", "--out", tmp_path / "x")
    one_line_error(code, err, "nostore.db")

    code, _, err = run(capsys, "reward", "fit", "--comparisons", comparisons_file, "--out", tmp_path / "x",
                       "--ensemble", "0")
    one_line_error(code, err, "ensemble must be a positive integer")

    code, _, err = run(capsys, "reward", "evaluate", "--model", tmp_path / "nomodel", "--comparisons", comparisons_file)
    one_line_error(code, err, "nomodel", "is not a folder")

    images = tmp_path / "images.safetensors"
    x = torch.zeros(6, 1, 8, 8)
    save_comparisons(images, Comparisons(x, x, torch.ones(6)))
    run(capsys, "reward", "fit", "--comparisons", comparisons_file, "--out", tmp_path / "rm", *FAST)
    code, _, err = run(capsys, "reward", "evaluate", "--model", tmp_path / "rm", "--comparisons", images)
    one_line_error(code, err, "shape (1, 8, 8)", "expects (2,)")

    code, _, err = run(capsys, "reward", "fit", "--out", tmp_path / "x")
    one_line_error(code, err, "--store DB or --comparisons FILE is required")
    code, _, err = run(capsys, "reward", "fit", "--store", tmp_path / "a.db", "--comparisons", comparisons_file,
                       "--out", tmp_path / "x")
    one_line_error(code, err, "not both")
    code, _, err = run(capsys, "reward", "fit", "--comparisons", comparisons_file)
    one_line_error(code, err, "--out is required")
    code, _, err = run(capsys, "reward", "simulate", "--out", tmp_path / "s.safetensors")
    one_line_error(code, err, "--task is required")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s.safetensors").exists()


def test_simulate_digits_file(tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    code, out, _ = run(capsys, "reward", "simulate", "--task", "digits", "--n", "50", "--items", "200",
                       "--out", path, "--tie-margin", "0.2")
    assert code == 0 and "ties" in out
    comps = load_comparisons(path)
    assert comps.shape == (1, 8, 8) and comps.cond is not None and len(comps) == 50
    assert float(comps.left.min()) >= -1 and float(comps.left.max()) <= 1


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path, capsys):
    code, out, err = run(capsys, "reward", "bench", "--quick", "--out", tmp_path, "--workers", "1", "-q")
    assert code == 0, err
    results = json.loads((tmp_path / "feedback-quick.json").read_text())
    assert (tmp_path / "feedback-quick.png").stat().st_size > 1000
    for domain in ("points", "digits"):
        for strategy in ("random", "disagreement"):
            table = results["summary"][domain][strategy]
            assert [row["n"] for row in table] == results["plan"]["budgets"]
            assert all(0.5 < row["accuracy"] <= row["ceiling"] + 0.02 for row in table)
    assert "| points |" in out and "wall time" in out
