"""The loop the quickstart and the digits benchmark share (digits_loop.py), and the benchmark's config."""

import ast
import dataclasses
import inspect

import pytest

from scoreaction.experiments import digits_bench
from scoreaction.experiments.digits_loop import DigitsLoopConfig, FitScores, ReliabilityBin, digits_train_config
from scoreaction.experiments.quickstart import QuickstartConfig


def test_the_bench_does_not_reach_into_the_quickstart():
    tree = ast.parse(inspect.getsource(digits_bench))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any("quickstart" in name or name.endswith(".report") for name in imported), imported


def test_train_config_fine_tunes_on_the_learned_reward(tmp_path):
    loop = DigitsLoopConfig(updates=3, batch_size=8, steps=5, per_class=2, beta_kl=0.7, seed=4)
    config = digits_train_config(loop, tmp_path / "reward", tmp_path / "train", "ddpo", {"lr": 3e-4}).to_dict()
    assert config["task"]["name"] == "digits" and config["task"]["reward"] == f"learned:{tmp_path / 'reward'}"
    assert config["task"]["beta_kl"] == 0.7 and config["algorithm"] == "ddpo" and config["algo"]["lr"] == 3e-4
    assert (config["steps"], config["batch_size"], config["updates"], config["seed"]) == (5, 8, 3, 4)
    assert (config["eval_every"], config["eval_n"], config["eval_steps"], config["out"]) == (0, 20, 5,
                                                                                          str(tmp_path / "train"))
    assert digits_train_config(loop, "r", "o").to_dict()["algo"]["lr"] == 1e-3  # the loop's own algo options


def test_quickstart_config_is_the_loop_plus_its_own_fields():
    loop = {f.name for f in dataclasses.fields(DigitsLoopConfig)}
    own = {f.name for f in dataclasses.fields(QuickstartConfig)} - loop
    assert own == {"out", "human", "host", "port", "solvers"}
    assert QuickstartConfig.from_dict({"beta_kl": 1.0}).to_dict()["beta_kl"] == 1.0


def test_fit_scores_keep_the_reliability_table():
    scores = FitScores.from_metrics({"n": 4, "n_non_tied": 3, "accuracy": 0.5, "log_likelihood": -0.7, "ece": 0.1,
                                     "reliability": [{"lo": 0.0, "hi": 0.1, "count": 2, "predicted": 0.05,
                                                      "observed": 0.0}]})
    assert scores.reliability == [ReliabilityBin(0.0, 0.1, 2, 0.05, 0.0)]


def test_bench_config_types_its_setup_and_checks_it():
    config = digits_bench.DigitsBenchConfig.quick_config("/tmp/x", seed=3)
    assert isinstance(config.setup, DigitsLoopConfig) and config.setup.seed == 3 and config.setup.items == 40
    assert digits_bench.DigitsBenchConfig.from_dict(config.to_dict()) == config
    for field in dataclasses.fields(digits_bench.DigitsBenchConfig):
        assert field.metadata.get("help"), field.name
    with pytest.raises(ValueError, match="unknown option 'human' in the digits benchmark's setup"):
        digits_bench.DigitsBenchConfig(setup={"human": True})
    with pytest.raises(ValueError, match="algorithms must be a non-empty subset"):
        digits_bench.DigitsBenchConfig(algorithms=["ppo"])
    with pytest.raises(ValueError, match="pairs must be at most"):
        digits_bench.DigitsBenchConfig(setup={"items": 20, "pairs": 100})
