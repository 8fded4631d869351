"""`scoreaction quickstart`: the whole loop on a tiny budget, the report's content, the person-in-the-loop
mode through the real web app, and bad input."""

import json
import re
import threading

import httpx
import pytest
import torch

from scoreaction.cli import main
from scoreaction.experiments.quickstart import QuickstartConfig, agreement, collect_human, run
from scoreaction.experiments.report import SECTIONS
from scoreaction.feedback.store import PreferenceStore

TINY = dict(items=40, pairs=50, updates=2, batch_size=8, steps=4, per_class=2, solvers=[["ddim", 4], ["heun", 2]])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    results = run(QuickstartConfig(out=str(out), **TINY), log=lambda _: None, progress=False)
    return out, results


def section(page: str, anchor: str) -> str:
    """The HTML between <h2 id='anchor'> and the next <h2> (or the end)."""
    match = re.search(rf"<h2 id='{anchor}'>(.*?)(?=<h2 |</body>)", page, re.S)
    assert match, f"section {anchor!r} missing"
    return match.group(1)


def test_every_stage_leaves_its_files(quick):
    out, _ = quick
    for name in ("store.sqlite", "reward/model.safetensors", "reward/reward.json", "train/checkpoints/latest",
                 "train/metrics.jsonl", "results.json", "report.html"):
        assert (out / name).is_file(), name
    store = PreferenceStore(out / "store.sqlite")
    assert store.count_comparisons() == 50 and len(store.items(task="digits")) == 40


def test_report_has_every_section_with_its_numbers(quick):
    out, results = quick
    page = (out / "report.html").read_text()
    assert SECTIONS == ("summary", "samples", "training", "hacking", "quality", "solvers", "feedback", "reproduce")
    for anchor in SECTIONS:
        assert len(re.sub(r"<[^>]+>", "", section(page, anchor)).strip()) > 20, anchor
    for image in re.findall(r"<img src='([^']+)'", page):
        assert (out / image).stat().st_size > 1000, image
    assert "samples_em4.png" in section(page, "samples") and "training.png" in section(page, "training")
    summary = section(page, "summary")
    for target in results["summary"]["targets"]:
        assert target["measured"].replace(">", "&gt;") in summary
    assert "exact tilt at the same utility gain" in summary and f"{results['exact_tilt']['frechet']:.2f}" in summary
    acc0, acc1 = results["summary"]["class_accuracy"]
    assert f"{acc0:.3f} -&gt; {acc1:.3f}" in summary
    hacking = section(page, "hacking")
    assert f"{results['summary']['utility_gain_sd']:+.2f}" in hacking and "ranking agreement" in hacking
    solvers = section(page, "solvers")
    assert all(f"{s} {k}" in solvers for s, k in (("em", 4), ("ddim", 4), ("heun", 2)))
    assert "40 / 50" in section(page, "feedback") and "scoreaction quickstart --out" in section(page, "reproduce")


def test_results_are_paired_and_consistent(quick):
    out, results = quick
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert [(r["solver"], r["steps"]) for r in results["settings"]] == [("em", 4), ("ddim", 4), ("heun", 2)]
    for row in results["settings"]:
        # paired gain: the mean of per-sample differences is the difference of the means
        assert row["utility_gain"] == pytest.approx(row["finetuned"]["utility"] - row["pretrained"]["utility"],
                                                    abs=1e-5)
        for who in ("pretrained", "finetuned"):
            assert 0 <= row[who]["agreement"] <= 1 and 0 <= row[who]["class_accuracy"] <= 1
    assert len(results["history"]) == 2 and all("utility_mean" in h for h in results["history"])
    assert results["summary"]["utility_gain_sd"] == pytest.approx(
        results["settings"][0]["utility_gain"] / results["utility_std_pretrained"])


def test_agreement_counts_same_class_pairs_only():
    u = torch.tensor([0.0, 1.0, 2.0, 3.0])
    cond = torch.tensor([0, 0, 1, 1])
    assert agreement(u * 2, u, cond) == 1.0 and agreement(-u, u, cond) == 0.0
    assert agreement(torch.tensor([1.0, 0.0, 2.0, 3.0]), u, cond) == 0.5  # one of the two same-class pairs flipped


def test_a_person_labels_through_the_web_app(tmp_path):
    store = PreferenceStore(tmp_path / "s.sqlite", create=True)
    ids = store.add_items(torch.rand(6, 1, 8, 8) * 2 - 1, task="digits", conditions=[0, 0, 0, 1, 1, 1])
    store.enqueue_pairs([(ids[a], ids[b]) for a, b in ((0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5))])
    answered = []

    def person(url: str, token: str):
        def click():
            base = url.split("/?")[0]
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                assert client.get("/", params={"token": token}).status_code == 200
                while True:
                    nxt = client.get("/api/next").json()
                    if nxt["done"]:
                        break
                    left, right = nxt["left"]["id"], nxt["right"]["id"]
                    assert client.post("/api/answer", json={"left": left, "right": right, "choice": "left"}
                                       ).status_code == 200
                    answered.append((left, right))
        threading.Thread(target=click, daemon=True).start()

    config = QuickstartConfig(out=str(tmp_path), port=0, human=True)
    who = collect_human(store, config, log=lambda _: None, on_ready=person, poll=0.05, min_answers=3)
    assert who == "you" and len(answered) == 6
    assert len(store.dataset(task="digits", labeler="you")) == 6


@pytest.mark.parametrize("argv, message", [
    (["--set", "beta_kl=0"], "beta_kl must be a number > 0, found 0"),
    (["--set", "colour=red"], "unknown option 'colour' for quickstart"),
    (["--pairs", "0"], "pairs must be a positive integer, found 0"),
    (["--set", "utility=beauty"], "utility for task 'digits' must be one of"),
    (["--set", "items=5"], "items must be at least 20"),
    (["--set", "solvers=[[rk4, 10]]"], "solvers must be [solver, steps] pairs with a solver in"),
    (["--set", "grid=log"], "grid must be one of"),
    (["--set", "items=40", "--pairs", "61"], "pairs must be at most 60, the same-class pairs among 40 items"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert main(["quickstart", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_exact_tilt_reaches_the_asked_gain_and_no_more():
    from scoreaction.experiments.quickstart import exact_tilt
    from scoreaction.tasks.digits import DigitsTask, digits_data

    task = DigitsTask()
    x, cond = digits_data("heldout_a")
    u = x.mean((1, 2, 3)) * 10  # any utility: here ink
    config = QuickstartConfig(per_class=5)
    none = exact_tilt(task, x, cond, u, 0.0, config, repeats=1)
    assert none["inverse_beta"] < 1e-9 and abs(none["gain"]) < 1e-12
    smallest = int(torch.bincount(cond).min())
    assert none["items_per_class"] == smallest
    assert none["min_effective_items_per_class"] == pytest.approx(smallest, abs=1e-6)  # uniform weights: every item
    some = exact_tilt(task, x, cond, u, 0.5, config, repeats=1)
    assert some["gain"] == pytest.approx(0.5, abs=1e-6) and some["inverse_beta"] > 0
    assert some["min_effective_items_per_class"] < smallest
    assert 0 <= some["class_accuracy"] <= 1 and some["frechet"] > 0
