"""`scoreaction bench --quick` end to end, through the library: finetune.md, the plots and finetune.json."""

import json
import math

import pytest

from scoreaction.bench import ALGORITHMS, BenchConfig, run

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
