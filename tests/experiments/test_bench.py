"""`scoreaction bench --quick` end to end, through the library: finetune.md, the plots and finetune.json."""

import dataclasses
import json
import math
import re

import pytest

from scoreaction.experiments.finetune_bench import ALGORITHMS, BenchConfig, BenchResults, run, write_report
from tests.helpers import numbers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]\d+)?")


def shown(value: float, text: str, digits: int) -> bool:
    """Whether `text` shows `value` rounded to `digits` decimals (or in 2-significant-digit scientific notation)."""
    for token in NUMBER.findall(text):
        x = float(token)
        tol = 0.051 * abs(x) if "e" in token else 0.5 * 10.0**-digits + 1e-12
        if abs(x - value) <= tol:
            return True
    return False


def section(text: str, title: str) -> str:
    """The Markdown under the heading `title`, up to the next heading of the same or a higher level."""
    level = title.split(" ")[0]
    body = text.split(title + "\n", 1)[1]
    ends = [body.find("\n" + h + " ") for h in ("#", "##", "###")[: len(level)]]
    ends = [e for e in ends if e >= 0]
    return body[: min(ends)] if ends else body


def row(text: str, name: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert len(lines) == 1, (name, lines)
    return lines[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = f"scoreaction bench --quick --out {out}"
    returned = run(BenchConfig.quick_config(str(out), command=command))

    def reject(token):
        raise ValueError(f"non-finite number {token} in finetune.json")

    results = json.loads((out / "finetune.json").read_text(), parse_constant=reject)
    return out, command, returned, results, (out / "finetune.md").read_text()


@pytest.mark.slow
def test_quick_bench_writes_report_plots_and_json(quick):
    out, command, returned, results, text = quick
    assert text.splitlines()[0].startswith("# ")
    assert f"```\n{command}\n```" in text.split("## Settings")[0]  # the exact command, at the top
    assert "](tuning-notes.md)" in text
    for name in ("optimality_fraction", "optimality_distance", "robustness", "cost"):
        assert (out / f"finetune_{name}.png").read_bytes()[:8] == PNG_MAGIC, name
        assert f"](finetune_{name}.png)" in text

    assert results["command"] == command and results["format"] == returned.format
    assert all(math.isfinite(v) for v in numbers(results))
    assert {r["algorithm"] for r in results["optimality"]} == set(ALGORITHMS)
    assert {r["algorithm"] for r in results["cost"]} == set(ALGORITHMS)
    assert set(results["robustness"]["variants"]) == set(BenchConfig.quick_config("x").variants)
    assert results == returned.to_json()  # the JSON is the returned dataclasses, as they are


@pytest.mark.slow
def test_quick_bench_report_shows_the_measured_figures(quick):
    _, _, _, results, text = quick
    optimality = section(text, "## 1. Optimality")
    for key, ref in results["references"].items():
        part = section(optimality, f"### {key}")
        for value in (ref["reference"]["J_star"], ref["reference"]["E_pre_r"], ref["reference"]["KL_star"],
                      ref["optimal_fraction_plain"]):
            assert shown(value, part.split("\n|")[0], 4), (key, value)
        runs = [r for r in results["optimality"] if r["task"] == key]
        assert len(runs) == len(BenchConfig.quick_config("x").variants)
        for r in runs:
            cells, f = row(part, r["variant"]), r["final"]
            for name in ("fraction", "fraction_se", "fraction_paired", "fraction_paired_se", "regret", "distance",
                         "path_kl", "reward"):
                assert shown(f[name], cells, 4), (key, r["variant"], name, f[name], cells)
            assert shown(1 - f["fraction_paired"], cells, 4)

    robustness = section(text, "## 2. Discretisation and solver robustness")
    rob = results["robustness"]
    for name, gains in [("a* (exact)", rob["optimal"]), *rob["variants"].items()]:
        cells = row(robustness, name)
        assert len(cells.split("|")) == len(rob["solvers"]) + 4  # name, base gain, one cell per solver
        for g in gains:
            assert shown(g["fraction"], cells, 3) and shown(g["fraction_se"], cells, 3), (name, g)

    seconds = section(text, "## 3. Cost").split("Seconds per update (wall):")[1].split("CPU seconds")[0]
    for cell in results["cost"]:
        assert shown(cell["seconds_per_update"], row(seconds, cell["variant"]), 3), cell
    for gone in ("Where it falls short", "Targets", "Not met"):
        assert gone not in text


@pytest.mark.slow
def test_report_regenerates_from_the_json_alone(quick, tmp_path):
    _, _, _, results, text = quick
    write_report(results, tmp_path)
    assert (tmp_path / "finetune.md").read_text() == text

    partial = BenchResults.from_json(results)  # a run of the robustness section alone
    partial = dataclasses.replace(partial, optimality=None, cost=None)
    write_report(partial, tmp_path)
    rendered = (tmp_path / "finetune.md").read_text()
    assert "## 2. Discretisation and solver robustness" in rendered
    assert "## 1. Optimality" not in rendered and "## 3. Cost" not in rendered

    with pytest.raises(ValueError, match="format"):
        BenchResults.from_json({**results, "format": "scoreaction-bench-1"})


@pytest.mark.slow
def test_quick_digits_bench_compares_the_algorithms_on_one_learned_reward(tmp_path, capsys):
    from scoreaction.cli import main
    from scoreaction.experiments import digits_bench as bench_digits

    assert main(["bench", "--task", "digits", "--quick", "--out", str(tmp_path), "-q"]) == 0
    text = (tmp_path / "digits.md").read_text()
    results = json.loads((tmp_path / "digits.json").read_text())
    assert (tmp_path / "digits.png").read_bytes()[:8] == PNG_MAGIC and "](digits.png)" in text
    assert f"```\nscoreaction bench --task digits --quick --out {tmp_path}\n```" in text.split("## Settings")[0]
    assert [r["algorithm"] for r in results["runs"]] == list(bench_digits.ALGORITHMS)
    unit = results["utility_std_pretrained"]
    for r in results["runs"]:
        first, last = r["curve"][0], r["curve"][-1]
        assert [p["update"] for p in r["curve"]] == [0, 1, 2] and last["trajectories"] == 2 * 16
        assert first["utility"] == results["runs"][0]["curve"][0]["utility"]  # the same pretrained start for all
        j_gain = last["reward"] - first["reward"] - results["setup"]["beta_kl"] * last["path_kl"]
        assert f"| {r['algorithm']} | {j_gain:+.3f} | {last['utility'] - first['utility']:+.3f} " \
               f"({(last['utility'] - first['utility']) / unit:+.2f}) |" in text
    assert all(math.isfinite(v) for v in numbers(results))
    assert main(["bench", "--task", "points"]) == 2 and "--task must be one of ['exact', 'efficiency', 'digits', 'diffusers', 't2i'], found 'points'" in capsys.readouterr().err
