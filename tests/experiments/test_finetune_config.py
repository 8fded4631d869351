"""BenchConfig: validation, the help text the command line derives its flags from, and the cost grid."""

import dataclasses

import pytest

from scoreaction.experiments.finetune_config import ROBUSTNESS_TASK, VARIANTS, BenchConfig


def test_every_field_carries_its_help_text():
    for f in dataclasses.fields(BenchConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(("changes", "message"), [
    ({"sections": ("optimality", "speed")}, "sections must be"),
    ({"sections": ()}, "sections must be"),
    ({"tasks": ("gaussian-d3",)}, "tasks must be among"),
    ({"variants": ("ctrl", "ppo")}, "variants must be among"),
    ({"updates": 0}, "updates must be a positive integer"),
    ({"eval_n": True}, "eval_n must be a positive integer"),
    ({"robust_solvers": (("em", 5), ("heun", 10))}, "robust_solvers must include"),
    ({"seed": -1}, "seed must be"),
])
def test_bad_settings_are_refused_with_the_field_named(changes, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**changes)


def test_robustness_adds_its_task_and_the_json_form_reads_back():
    config = BenchConfig(tasks=["mixture"], variants=["ctrl"], robust_solvers=[["em", 20], ["em", 5]])
    assert config.tasks == ("mixture", ROBUSTNESS_TASK)
    assert config.robust_solvers == (("em", 20), ("em", 5))
    assert BenchConfig(tasks=["mixture"], sections=["cost"]).tasks == ("mixture",)
    assert BenchConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown option 'speed'"):
        BenchConfig.from_dict({"speed": 1})


def test_cost_cells_vary_d_at_the_training_k_then_k_at_the_smallest_d():
    config = BenchConfig(steps=20, cost_dims=(64, 2), cost_steps=(10, 20, 50))
    assert config.cost_cells == [(64, 20), (2, 20), (2, 10), (2, 50)]


def test_variant_train_config_sets_the_schedule_of_the_decay_variants():
    plain = VARIANTS["ctrl"].train_config({"name": "gaussian"}, updates=3)
    decay = VARIANTS["ctrl+lr-decay"].train_config({"name": "gaussian"}, updates=3)
    assert plain["lr_schedule"] == "constant" and decay["lr_schedule"] == "linear"
    assert plain["grid"] == "random" and plain["updates"] == 3 and plain["algorithm"] == "ctrl"
