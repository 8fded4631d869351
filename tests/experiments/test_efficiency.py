"""`scoreaction bench --task efficiency`: its statistics, its paired evaluation against closed forms, and the report."""

import json
import math

import pytest
import torch

from scoreaction.experiments import efficiency as eff
from scoreaction.experiments.efficiency_report import compare
from scoreaction.experiments.finetune_jobs import optimal_policy
from scoreaction.policy import ScoreAsAction
from scoreaction.tasks import make_task
from tests.helpers import Z


def _run(trajectories, fraction, seed=1, final=0.9):
    return eff.Run("methods", "gaussian-d2", "ctrl", seed, list(trajectories), list(fraction), final, 0.001, 0.3, 1.0,
                   1.0)


def section_of(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_interval_is_the_student_t_interval():
    mean, half = eff.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} = 4.3027
    mean, half = eff.interval([5.0] * 5)
    assert (mean, half) == (5.0, 0.0)


def test_trajectories_to_a_level_interpolates_at_the_first_crossing():
    run = _run([0, 100, 200, 300], [0.0, 0.5, 0.9, 0.7])
    assert eff.trajectories_to(run, 0.8) == pytest.approx(175.0)  # 100 + (0.8 - 0.5) / 0.4 * 100
    assert eff.trajectories_to(run, 0.5) == pytest.approx(100.0)
    assert eff.trajectories_to(run, 0.95) is None  # never reached, whatever comes after a dip


def test_cell_stats_counts_seeds_that_never_reach_a_level():
    runs = [_run([0, 100, 200], [0.0, 0.85, 0.96], seed=1), _run([0, 100, 200], [0.0, 0.9, 0.93], seed=2)]
    s = eff.cell_stats(runs)
    assert s.reached == {"0.8": 2, "0.9": 2, "0.95": 1}
    assert s.to_level["0.95"] is None
    assert s.to_level["0.8"][0] == pytest.approx((100 * 0.8 / 0.85 + 100 * 0.8 / 0.9) / 2)


def test_compare_calls_a_difference_only_where_the_intervals_separate():
    fast = [_run([0, 100, 200], [0.0, 0.96, 0.99], seed=s) for s in range(5)]
    slow = [_run([0, 100, 200, 300, 400], [0.0, 0.5, 0.7, 0.9, 0.96], seed=s) for s in range(5)]
    a, b = eff.cell_stats(fast), eff.cell_stats(slow)
    assert "ctrl needs fewer" in compare(a, b, "ddpo") and "0.26x" in compare(a, b, "ddpo")
    noisy = [_run([0, 100, 200], [0.0, f, 0.99], seed=s) for s, f in enumerate((0.96, 0.5, 0.97, 0.4, 0.95))]
    assert "intervals overlap" in compare(eff.cell_stats(noisy), a, "ddpo")
    never = [_run([0, 100], [0.0, 0.5], seed=s) for s in range(5)]
    assert "ctrl is better" in compare(a, eff.cell_stats(never), "ddpo")


@pytest.mark.parametrize(("changes", "message"), [
    ({"seeds": (1,)}, "seeds must be at least two"),
    ({"seeds": (1, 1)}, "seeds must be at least two distinct"),
    ({"sections": ("methods", "speed")}, "sections must be"),
    ({"methods": ("ppo",)}, "methods must be"),
    ({"dense": 0}, "dense must be a positive integer"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        eff.EfficiencyConfig(**changes)


def test_paired_fraction_is_one_for_the_optimum_and_zero_for_the_pretrained_model():
    """Closed forms (E21): a* closes exactly 1 paired with itself; the pretrained policy closes (E_pre[r] - J*) /
    (J* - E_pre[r]) + 1 = 0 up to Monte-Carlo and the 200-step discretisation."""
    job = eff.ReferenceJob("gaussian-d2", eff.TASKS["gaussian-d2"], 4096, 4096, 200, None)
    ref = eff.reference_job(job)
    task = make_task("gaussian", {"dim": 2, "beta_kl": 1.0})
    task.use_reference(ref.reference)
    j_opt, _ = eff.per_sample_objective(optimal_policy(task), task, 200, 4096, eff.EVAL_SEED)
    assert eff.paired_fraction(j_opt, ref) == (1.0, 0.0)
    j_pre, kl = eff.per_sample_objective(ScoreAsAction(task.path, task.pretrained), task, 200, 4096, eff.EVAL_SEED)
    assert float(kl.abs().max()) == 0.0
    fraction, se = eff.paired_fraction(j_pre, ref)
    assert abs(fraction) < Z * se + 0.01, (fraction, se)  # 0.01: the 200-step scheme's bias in the reward
    assert 0 < se < 0.02


def test_chunked_evaluation_pairs_sample_by_sample_whatever_the_dimension():
    task = make_task("gaussian", {"dim": 2048, "beta_kl": 1.0})  # chunks of 256 samples: 3 chunks for 600
    policy = ScoreAsAction(task.path, task.pretrained)
    j, _ = eff.per_sample_objective(policy, task, 5, 600, 7)
    again, _ = eff.per_sample_objective(policy, task, 5, 600, 7)
    assert j.shape == (600,) and torch.equal(j, again)
    assert not torch.equal(j[:256], j[256:512])  # each chunk draws its own starts


@pytest.mark.slow
def test_quick_run_writes_both_sections_and_a_section_run_again_keeps_the_other(tmp_path):
    cfg = eff.EfficiencyConfig.quick_config(str(tmp_path))
    eff.run(eff.EfficiencyConfig.from_dict({**cfg.to_dict(), "quick": False, "sections": ("methods",)}))
    eff.run(eff.EfficiencyConfig.from_dict({**cfg.to_dict(), "quick": False, "sections": ("solvers", "settings")}))
    results = eff.EfficiencyResults.from_json(json.loads((tmp_path / "efficiency.json").read_text()))
    assert set(results.headers) == {"methods (ctrl, ddpo)", "solvers", "settings"}  # some methods, named
    assert set(results.references["solvers"]) == {f"{s} {k}" for s, k in eff.ROBUSTNESS_SOLVERS}
    assert results.references["solvers"]["em 20"] == 1.0
    for runs in results.cells("solvers").values():
        assert all(r.solvers["em 20"] == 1.0 and len(r.solvers) == len(eff.ROBUSTNESS_SOLVERS) for r in runs)
    assert len(results.cells("methods")) == 2 and len(results.cells("settings")) == 4
    for runs in (*results.cells("methods").values(), *results.cells("settings").values()):
        assert sorted(r.seed for r in runs) == [1, 2]
        assert all(r.trajectories == [0, 32, 64, 96][: len(r.trajectories)] for r in runs)
    ctrl_runs = [r for r in results.runs if r.section == "methods" and r.method == "ctrl"]
    eff.run(eff.EfficiencyConfig.from_dict({**cfg.to_dict(), "quick": False, "sections": ("methods",),
                                            "methods": ("ddpo",), "seeds": (7, 8)}))
    again = eff.EfficiencyResults.from_json(json.loads((tmp_path / "efficiency.json").read_text()))
    assert [r for r in again.runs if r.section == "methods" and r.method == "ctrl"] == ctrl_runs  # kept
    assert sorted(r.seed for r in again.cells("methods")[("gaussian-d2", "ddpo")]) == [7, 8]  # replaced
    assert "methods (ddpo)" in again.headers and len(again.cells("settings")) == 4
    text = (tmp_path / "efficiency.md").read_text()
    assert text.count("--task efficiency") >= 2  # both commands of the methods section are shown
    assert "## 1. Methods" in text and "## 2. Solver consistency" in text and "## 3. Settings" in text
    assert "| ctrl-x0 |" in section_of(text, "## 2. Solver consistency")
    assert (tmp_path / "efficiency_methods.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "efficiency_settings.png").exists()
    for (cell, method), runs in again.cells("methods").items():
        mean, half = eff.interval([r.final for r in runs])
        assert f"| {method} | {mean:.4f} ± {half:.4f} |" in text


@pytest.mark.parametrize("task", ["gaussian", "mixture"])
@pytest.mark.parametrize("method", [m for m in eff.METHODS if m != "ctrl-x0"])
def test_shipped_configs_are_the_benchmarked_settings(method, task):
    """configs/<method>-<task>.yaml is what efficiency.md measures: the same algorithm, grid, options, schedule and
    budget, so a user running it gets the benchmarked figure."""
    from pathlib import Path

    from scoreaction.config import load_yaml
    from scoreaction.train import TrainConfig

    root = Path(__file__).resolve().parents[2]
    shipped = TrainConfig.from_dict(load_yaml(root / "configs" / f"{method}-{task}.yaml"))
    v = eff.METHODS["ctrl-x0" if method == "ctrl" else method]  # the shipped ctrl is ctrl-x0
    benchmarked = TrainConfig.from_dict(v.train_config(eff.TASKS["mixture" if task == "mixture" else "gaussian-d2"],
                                                       updates=eff.EfficiencyConfig().updates))
    for name in ("algorithm", "algo", "grid", "lr_schedule", "steps", "batch_size", "updates"):
        assert getattr(shipped, name) == getattr(benchmarked, name), name
    assert shipped.task.to_dict() == benchmarked.task.to_dict()
