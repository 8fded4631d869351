"""`scoreaction reward bench --quick` through the library: typed per-seed results, their summary and its table."""

import dataclasses
import json
import math

import pytest

from scoreaction.experiments.feedback_bench import (
    QUICK,
    STRATEGIES,
    BudgetResult,
    Metrics,
    markdown_table,
    run_benchmark,
    run_one,
    schedule,
    write,
)


def test_schedule_refits_between_the_budgets():
    assert schedule((50, 100, 400), 2) == [50, 71, 100, 141, 200, 283, 400]  # 2 refits per doubling
    assert schedule((50, 100), 1) == [50, 100]


def test_bad_seeds_and_workers_are_refused():
    with pytest.raises(ValueError, match="seeds"):
        run_benchmark(quick=True, seeds=0)
    with pytest.raises(ValueError, match="workers"):
        run_benchmark(quick=True, workers=True)


@pytest.mark.slow
def test_quick_benchmark_summarises_its_runs(tmp_path):
    results = run_benchmark(quick=True, workers=1, log=None)
    metrics = [f.name for f in dataclasses.fields(Metrics)]
    assert results["plan"]["budgets"] == list(QUICK.budgets)
    assert [r["domain"] for r in results["runs"]] == ["points", "digits"]
    table = markdown_table(results)
    for run in results["runs"]:
        summary = results["summary"][run["domain"]]
        for strategy in STRATEGIES:
            assert [row["n"] for row in run[strategy]] == list(QUICK.budgets)
            for row, mean in zip(run[strategy], summary[strategy]):
                assert set(row) == {f.name for f in dataclasses.fields(BudgetResult)}
                for key in metrics:  # one seed: the mean is the run's figure, the spread 0
                    assert mean[key] == row[key] and mean[key + "_std"] == 0.0
                assert 0.5 <= row["accuracy"] <= row["ceiling"] + 1e-9 and -1 <= row["rank"] <= 1
        for b, gain in enumerate(summary["gain"]):
            assert math.isclose(gain["accuracy"], run["disagreement"][b]["accuracy"] - run["random"][b]["accuracy"],
                                abs_tol=1e-12)
            line = next(x for x in table.splitlines() if x.startswith(f"| {run['domain']} | {gain['n']} |"))
            assert f"{run['random'][b]['accuracy']:.3f}" in line and f"{gain['accuracy']:+.3f}" in line

    paths = write(results, tmp_path)
    with open(paths["json"]) as f:
        assert json.load(f)["runs"] == results["runs"]


@pytest.mark.slow
def test_run_one_is_reproducible():
    plan = dataclasses.replace(QUICK, budgets=(20, 40), pool={"points": 100, "digits": 100}, test_items=100,
                               test_pairs=100)
    a, b = run_one("points", 0, plan), run_one("points", 0, plan)
    assert [dataclasses.replace(r, fit_seconds=0) for r in a.random] == \
           [dataclasses.replace(r, fit_seconds=0) for r in b.random]
    assert [r.n for r in a.disagreement] == [20, 40]
