"""`scoreaction bench --quick` end to end, through the library: finetune.md, the plots and finetune.json."""

import json
import math

import pytest

from scoreaction.experiments.finetune_bench import ALGORITHMS, BenchConfig, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def numbers(value):
    """Every number in a parsed JSON document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_quick_bench_writes_report_plots_and_json(tmp_path):
    command = f"scoreaction bench --quick --out {tmp_path}"
    run(BenchConfig.quick_config(str(tmp_path), command=command))

    text = (tmp_path / "finetune.md").read_text()
    assert text.splitlines()[0].startswith("# ")
    assert f"```\n{command}\n```" in text.split("## Settings")[0]  # the exact command, at the top
    for name in ALGORITHMS:
        assert f"| {name} |" in text
    for section in ("## 1. Optimality", "## 2. Discretisation and solver robustness", "## 3. Cost",
                    "## Where it falls short and why"):
        assert section in text
    for task in ("gaussian-d2", "gaussian-d16", "mixture"):
        assert f"### {task}" in text

    for name in ("optimality_fraction", "optimality_distance", "robustness", "cost"):
        png = tmp_path / f"finetune_{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"](finetune_{name}.png)" in text

    def reject(token):
        raise ValueError(f"non-finite number {token} in finetune.json")

    results = json.loads((tmp_path / "finetune.json").read_text(), parse_constant=reject)
    assert results["command"] == command
    values = list(numbers(results))
    assert values and all(math.isfinite(v) for v in values)
    assert {r["algorithm"] for r in results["optimality"]} == set(ALGORITHMS)
    assert {r["algorithm"] for r in results["cost"]} == set(ALGORITHMS)
    assert set(results["robustness"]["variants"]) >= set(ALGORITHMS)


@pytest.mark.slow
def test_quick_digits_bench_compares_the_algorithms_on_one_learned_reward(tmp_path, capsys):
    from scoreaction.cli import main
    from scoreaction.experiments import digits_bench as bench_digits

    assert main(["bench", "--task", "digits", "--quick", "--out", str(tmp_path), "-q"]) == 0
    text = (tmp_path / "digits.md").read_text()
    results = json.loads((tmp_path / "digits.json").read_text())
    assert (tmp_path / "digits.png").read_bytes()[:8] == PNG_MAGIC and "](digits.png)" in text
    assert f"```\nscoreaction bench --task digits --out {tmp_path} --quick\n```" in text.split("## Settings")[0]
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
    assert main(["bench", "--task", "points"]) == 2 and "--task must be 'digits'" in capsys.readouterr().err
