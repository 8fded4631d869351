"""`scoreaction bench --task t2i --quick` end to end (TRL's cell too when trl is installed), the report regenerated
from the JSON alone, the skipped-TRL path, the interval helpers, and bad options as one-line errors."""

import importlib.util
import json
import math
import time

import pytest

from scoreaction.cli import main
from scoreaction.experiments import t2i
from scoreaction.experiments.common import first_reach, interval, t_975
from scoreaction.experiments.t2i_report import CURVES, write_report
from tests.helpers import numbers

HAS_TRL = importlib.util.find_spec("trl") is not None
METHODS = ["ctrl", "ddpo", "grpo"] + (["trl"] if HAS_TRL else [])
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    start = time.perf_counter()
    assert main(["bench", "--task", "t2i", "--quick", "--out", str(out), "-q"]) == 0
    seconds = time.perf_counter() - start

    def reject(token):
        raise ValueError(f"non-finite number {token} in t2i.json")

    results = json.loads((out / t2i.RESULTS).read_text(), parse_constant=reject)
    return out, results, (out / t2i.REPORT).read_text(), seconds


@pytest.mark.slow
def test_quick_study_runs_every_method_and_seed(quick):
    out, results, text, seconds = quick
    command = f"scoreaction bench --task t2i --quick --out {out}"
    assert results["command"] == command and f"```\n{command}\n```" in text.split("## Cells")[0]
    assert results["format"] == t2i.FORMAT and results["versions"]["torch"] and results["git"]
    assert len(results["machine"]["load_average_start"]) == 3 == len(results["machine"]["load_average_end"])
    assert all(math.isfinite(v) for v in numbers(results))
    cfg = results["config"]
    assert [(c["method"], c["seed"]) for c in results["cells"]] == [(m, s) for s in cfg["seeds"] for m in METHODS]
    assert len({c["weights_digest"] for c in results["cells"]}) == 1  # one copy of the weights for every cell
    for c in results["cells"]:
        assert c["error"] is None, c
        curve = c["curve"]
        assert [p["update"] for p in curve] == [0, 1, 2] and [p["trajectories"] for p in curve] == [0, 4, 8]
        assert curve[0]["cpu_seconds"] == 0.0 < curve[1]["cpu_seconds"] <= curve[2]["cpu_seconds"]
        for name, texts in results["prompts"].items():
            if name == "grid":
                continue
            start = curve[0][name]
            assert start["n"] == len(texts) * cfg["per_prompt"]
            # update 0: the policy is the pretrained model (LoRA B = 0), on the same noise
            assert start["accuracy"] == start["accuracy_pretrained"] and start["gain"] == 0.0
            assert all(0.0 <= p[name]["accuracy"]["overall"] <= 1.0 for p in curve)
        assert [(s["solver"], s["steps"]) for s in c["solvers"]] == [tuple(p) for p in cfg["solvers"]]
        assert c["path_kl"] >= 0.0 and set(c["diversity"]) == {"policy", "pretrained"}
        assert (c["grid"] is not None) == (c["seed"] == cfg["seeds"][0])
        if c["method"] == "trl":  # TRL's weights, copied into a scoreaction policy, give TRL's UNet exactly
            assert c["trl_copy_max_diff"] == 0.0
    assert results["trl_skipped"] is None if HAS_TRL else results["trl_skipped"] == t2i.TRL_MISSING
    for name in [CURVES] + [f"{t2i.PREFIX}grid_{m}.png" for m in METHODS]:
        assert (out / name).read_bytes()[:8] == PNG and f"]({name})" in text
    for heading in ("## Cells", "## Settings", "## Final accuracy", "## Final accuracy per category",
                    "## To reach ddpo's final accuracy", "## Accuracy gain under other solvers",
                    "## Path KL and diversity", "## Figures"):
        assert heading in text
    for m in METHODS:
        assert f"\n| {m} | " in text.split("## Final accuracy")[1]
    print(f"quick study: {seconds:.1f} s")  # under a minute on one thread per cell, two cells at once


@pytest.mark.slow
def test_the_report_regenerates_from_the_json_alone(quick, tmp_path):
    out, results, text, _ = quick
    assert write_report(results, tmp_path) == tmp_path / t2i.REPORT
    assert (tmp_path / t2i.REPORT).read_text() == text
    assert (tmp_path / CURVES).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_a_failed_cell_is_reported_as_failed_and_left_out_of_the_figures(quick, tmp_path):
    out, results, text, _ = quick
    failed = {**results, "cells": [dict(c) for c in results["cells"]]}
    cell = failed["cells"][0]
    cell.update(error="exit code 1: RuntimeError: boom", curve=[], solvers=[], path_kl=None, diversity={}, grid=None)
    write_report(failed, tmp_path)
    report = (tmp_path / t2i.REPORT).read_text()
    assert f"| {cell['method']} | {cell['seed']} | failed: exit code 1: RuntimeError: boom |" in report
    assert f"![{cell['method']}, seed" not in report and "(one seed)" in report


def test_a_cell_that_fails_or_runs_out_of_time_is_an_error_in_one_line(tmp_path):
    from scoreaction.experiments.common import run_forked

    result, error = run_forked("scoreaction.experiments.t2i_cell", {"method": "ctrl"}, tmp_path / "a.json", 300, [])
    assert result is None and error == "exit code 1: KeyError: 'threads'"
    result, error = run_forked("scoreaction.experiments.t2i_cell", {"method": "ctrl"}, tmp_path / "b.json", 0.01, [])
    assert result is None and error == "timed out after 0 s"


def test_without_trl_the_study_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(t2i, "trl_installed", lambda: False)
    assert main(["bench", "--task", "t2i", "--quick", "--methods", "trl", "--out", str(tmp_path / "o"), "-q"]) == 0
    assert capsys.readouterr().err.strip() == f"scoreaction: {t2i.TRL_MISSING}"
    results = json.loads((tmp_path / "o" / t2i.RESULTS).read_text())
    assert results["trl_skipped"] == t2i.TRL_MISSING and results["cells"] == []
    assert t2i.TRL_MISSING in (tmp_path / "o" / t2i.REPORT).read_text()


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "1"], "--seeds must be at least 2 for an interval over seeds, found 1"),
    (["--methods", "ctrl,dpok"], "methods must be a non-empty subset of ['ctrl', 'ddpo', 'grpo', 'trl'], found "
                                 "['ctrl', 'dpok']"),
    (["--preset", "sd15"], "--device and --preset apply to --task diffusers, not to --task t2i"),
    (["--only", "methods"], "--only applies to --task exact and efficiency, not to --task t2i"),
    (["--set", "steps=3"], "unknown option 'steps'"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, argv, expected):
    assert main(["bench", "--task", "t2i", *argv, "--out", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scoreaction: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_seeds_belong_to_efficiency_and_t2i(capsys):
    assert main(["bench", "--task", "digits", "--seeds", "3"]) == 2
    assert "--seeds applies to --task efficiency and t2i, not to --task digits" in capsys.readouterr().err


def test_config_checks_its_options():
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        t2i.T2IConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match="multiple of 2 minibatches"):
        t2i.T2IConfig(batch_size=3)
    with pytest.raises(ValueError, match="fixes the LoRA rank at 4"):
        t2i.T2IConfig(lora_rank=8)
    assert t2i.T2IConfig(lora_rank=8, methods=["ctrl"]).lora_rank == 8


def test_prompt_sets_spread_over_the_categories():
    from scoreaction.shapes.grammar import category, parse

    sets = t2i.prompt_sets(t2i.T2IConfig(train_prompts=6, heldout_prompts=6, grid_prompts=4))
    assert len(sets["train"]) == 6 and len(sets["heldout"]) == 6 and len(sets["grid"]) == 4
    assert len({category(parse(p)) for p in sets["train"]}) >= 4
    assert set(sets["grid"]) <= set(sets["train"]) | set(sets["heldout"])
    full = t2i.prompt_sets(t2i.T2IConfig())
    assert len(full["train"]) == len(set(full["train"])) and not set(full["train"]) & set(full["heldout"])


def test_t_quantiles_and_intervals_match_scipy():
    from scipy.stats import t

    assert all(t_975(df) == pytest.approx(t.ppf(0.975, df), rel=2e-6) for df in range(1, 300))
    mean, half = interval([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == pytest.approx(7 / 3) and half == pytest.approx(t.ppf(0.975, 2) * sd / math.sqrt(3), rel=1e-6)
    assert interval([3.0]) == (3.0, math.inf)


def test_first_reach_interpolates_and_counts_a_start_above_the_level():
    assert first_reach([0, 10, 20], [0.1, 0.3, 0.5], 0.4) == pytest.approx(15.0)
    assert first_reach([0, 10, 20], [0.6, 0.3, 0.5], 0.4) == 0  # already there at the first evaluation
    assert first_reach([0, 10, 20], [0.1, 0.3, 0.2], 0.4) is None


def test_training_never_draws_prompts_added_for_evaluation():
    """Evaluations add held-out prompts to the task (add_prompts); training conditions stay in the training list."""
    import torch

    from scoreaction.tasks import make_task

    task = make_task("diffusers", {"prompts": ["a cat", "a dog"]})
    task.add_prompts(["a fox", "an owl", "a fish"])
    drawn = task.sample_conditions(2000, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
