"""`scoreaction quickstart`: the whole loop on a tiny budget, the report's content (parsed, not matched as
strings), escaping of hostile strings, the person-in-the-loop mode through the real web app, and bad input."""

import dataclasses
import json
import threading
import time
from html.parser import HTMLParser

import httpx
import pytest
import torch

from scoreaction.cli import main
from scoreaction.experiments.quickstart import (
    ExactTilt,
    QuickstartConfig,
    QuickstartResults,
    SolverRow,
    agreement,
    collect_human,
    run,
)
from scoreaction.experiments.report import SECTIONS, render
from scoreaction.feedback.store import PreferenceStore

TINY = {"items": 40, "pairs": 50, "updates": 2, "batch_size": 8, "steps": 4, "per_class": 2,
        "solvers": [["ddim", 4], ["heun", 2]]}
PLOTS = {"samples": ["samples_em4.png"], "training": "training.png", "hacking": "hacking.png", "solvers": "solvers.png"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    results = run(QuickstartConfig(out=str(out), **TINY), log=lambda _: None, progress=False)
    return out, results


class Page(HTMLParser):
    """The report as its reader sees it: per section (<h2 id=...> up to the next), the text, the table
    cells and the images; and every element with its attributes."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.order, self.text, self.cells, self.images, self.elements = [], {}, {}, {}, []
        self.current, self._cell = "top", None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "h2":
            self.current = attrs.get("id")
            self.order.append(self.current)
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.setdefault(self.current, []).append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.setdefault(self.current, []).append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text[self.current] = self.text.get(self.current, "") + data
        if self._cell is not None:
            self._cell.append(data)

    def words(self, section: str) -> str:
        return " ".join(self.text.get(section, "").split())


@pytest.fixture(scope="module")
def page(quick):
    out, _ = quick
    return Page((out / "report.html").read_text())


def test_every_stage_leaves_its_files(quick):
    out, _ = quick
    for name in ("store.sqlite", "reward/model.safetensors", "reward/reward.json", "train/checkpoints/latest",
                 "train/metrics.jsonl", "results.json", "report.html"):
        assert (out / name).is_file(), name
    store = PreferenceStore(out / "store.sqlite")
    assert store.count_comparisons() == 50 and len(store.items(task="digits")) == 40


def test_a_rerun_replaces_the_folder_and_refuses_others(quick, tmp_path):
    from scoreaction.experiments.quickstart import OUTPUT
    from scoreaction.outputs import check_output

    out, _ = quick
    assert OUTPUT.recognises(out)  # what `make run` run twice replaces
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="never replaced"):
        check_output(tmp_path, OUTPUT, overwrite=True)


def test_report_has_every_section_in_order_with_its_figures(quick, page):
    out, _ = quick
    assert page.order == list(SECTIONS)
    for anchor in SECTIONS:
        assert len(page.words(anchor)) > 20, anchor
    for images in page.images.values():
        for image in images:
            assert (out / image).stat().st_size > 1000, image
    assert page.images["samples"] == ["samples_em4.png"] and page.images["training"] == ["training.png"]
    assert page.images["hacking"] == ["hacking.png"] and page.images["solvers"] == ["solvers.png"]
    assert "met" not in page.cells["summary"] and "target" not in page.words("summary")  # no pass/fail rows


def test_report_states_the_numbers_of_results_json(quick, page):
    out, _ = quick
    r = json.loads((out / "results.json").read_text())
    s, tilt, train = r["summary"], r["exact_tilt"], r["settings"][0]
    summary = page.cells["summary"]
    assert f"{s['utility_gain_sd']:+.2f} ± {s['utility_gain_sd_se']:.2f}" in summary
    assert f"{s['reward_gain_sd']:+.2f}" in summary and f"{s['tilt_gain_sd']:+.2f}" in summary
    for who in ("pretrained", "finetuned"):
        assert f"{train[who]['class_accuracy']:.3f}" in summary and f"{train[who]['frechet']:.2f}" in summary
    assert f"{tilt['class_accuracy']:.3f}" in summary and f"{tilt['frechet']:.2f}" in summary
    assert f"{s['path_kl']:.3f}" in summary and f"{tilt['kl']:.3f}" in summary
    assert f"{tilt['inverse_beta']:.3g}" in page.words("summary")

    hacking = page.cells["hacking"]
    assert f"{train['pretrained']['utility']:.3f} ± {train['pretrained']['utility_se']:.3f}" in hacking
    assert f"{train['finetuned']['agreement']:.3f}" in hacking and "ranking agreement (same-class pairs)" in hacking

    quality, solvers = page.cells["quality"], page.cells["solvers"]
    for row in r["settings"]:
        label = f"{row['solver']} {row['steps']}"
        assert label in quality and label in solvers
        assert f"{row['utility_gain']:.3f} ± {row['utility_gain_se']:.3f}" in solvers
        assert f"{row['finetuned']['frechet']:.2f}" in quality
    assert [c for c in solvers if c in ("em 4", "ddim 4", "heun 2")] == ["em 4", "ddim 4", "heun 2"]

    feedback = page.cells["feedback"]
    assert "40 / 50" in feedback and f"{r['reward_model']['validation']['accuracy']:.3f} on 10 pairs" in feedback
    assert f"{r['reward_model']['ceiling']:.3f}" in feedback
    assert f"scoreaction quickstart --out {r['config']['out']} --seed 0" in page.words("reproduce")
    assert "beta_kl" in page.cells["reproduce"] and "total" in page.cells["reproduce"]


def test_results_json_is_the_results_dataclass(quick):
    out, results = quick
    assert isinstance(results, QuickstartResults) and isinstance(results.exact_tilt, ExactTilt)
    assert all(isinstance(row, SolverRow) for row in results.settings)
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(dataclasses.asdict(results), default=float))
    assert written["format"] == "scoreaction-quickstart-3" and written["config"]["per_class"] == 2


def test_results_are_paired_and_consistent(quick):
    _, results = quick
    assert [(r.solver, r.steps) for r in results.settings] == [("em", 4), ("ddim", 4), ("heun", 2)]
    for row in results.settings:
        # paired gain: the mean of per-sample differences is the difference of the means
        assert row.utility_gain == pytest.approx(row.finetuned.utility - row.pretrained.utility, abs=1e-5)
        for scores in (row.pretrained, row.finetuned):
            assert 0 <= scores.agreement <= 1 and 0 <= scores.class_accuracy <= 1
    assert len(results.history) == 2 and all(h.utility_mean is not None for h in results.history)
    assert "eval_path_kl" in results.history[-1].diagnostics
    s = results.summary
    assert s.utility_gain_sd == pytest.approx(results.settings[0].utility_gain / results.utility_std_pretrained)
    assert s.path_kl == results.history[-1].diagnostics["eval_path_kl"] and (s.solver, s.steps) == ("em", 4)
    assert results.timings.total >= results.timings.train > 0


def test_every_sampler_has_its_own_exact_tilt_at_its_own_gain(quick, page):
    _, results = quick
    train = results.settings[0]
    assert train.tilt == results.exact_tilt and train.gain_vs_training == pytest.approx(1.0)
    for row in results.settings:
        # the tilt of the sampler's own pretrained samples, at the fine-tuned model's gain under that sampler
        # (the bisection reaches any gain below the items' best per class; the tiny run's gains are small)
        assert isinstance(row.tilt, ExactTilt) and row.tilt.items_per_class == results.config.items // 10
        assert row.tilt.gain == pytest.approx(max(row.utility_gain, 0.0), abs=1e-6)
        assert row.gain_vs_training == pytest.approx(row.utility_gain / train.utility_gain)
        assert row.frechet_vs_tilt == pytest.approx(row.finetuned.frechet / row.tilt.frechet)
        cells = page.cells["solvers"]
        assert f"{row.gain_vs_training:.2f}" in cells and f"{row.tilt.frechet:.2f}" in cells
        assert f"{row.frechet_vs_tilt:.2f}" in cells
    assert len({row.tilt.frechet for row in results.settings}) == len(results.settings)  # different items


def test_hostile_strings_are_escaped(quick):
    _, results = quick
    script, span = "<script>alert(1)</script>", "<span onclick=alert(1)>x</span>"
    hostile = dataclasses.replace(  # a person labeled (no temperature, no ceiling) under a hostile name
        results, config=dataclasses.replace(results.config, out=script), torch=script,
        feedback=dataclasses.replace(results.feedback, labeler=span, temperature=None),
        reward_model=dataclasses.replace(results.reward_model, ceiling=None))
    html = render(hostile, PLOTS)
    assert script not in html and span not in html
    parsed = Page(html)
    assert all(tag not in ("script", "span") for tag, _ in parsed.elements)
    assert not any(name.startswith("on") for _, attrs in parsed.elements for name in attrs)
    assert span in " ".join(parsed.cells["feedback"]) and span in parsed.words("top")  # shown as text
    assert f"--out {script}" in parsed.words("reproduce")
    assert "(a person, in the web app)" in " ".join(parsed.cells["feedback"]) and "n/a" in parsed.cells["feedback"]


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
                    time.sleep(0.25)  # a person looks before answering; the app refuses answers under 200 ms
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


def test_every_config_field_has_help():
    for field in dataclasses.fields(QuickstartConfig):
        assert field.metadata.get("help"), field.name


def test_exact_tilt_reaches_the_asked_gain_and_no_more():
    from scoreaction.experiments.quickstart import exact_tilt
    from scoreaction.tasks.digits import DigitsTask, digits_data

    task = DigitsTask()
    x, cond = digits_data("heldout_a")
    u = x.mean((1, 2, 3)) * 10  # any utility: here ink
    config = QuickstartConfig(per_class=5)
    none = exact_tilt(task, x, cond, u, 0.0, config, repeats=1)
    assert none.inverse_beta < 1e-9 and abs(none.gain) < 1e-12 and abs(none.kl) < 1e-9
    smallest = int(torch.bincount(cond).min())
    assert none.items_per_class == smallest
    assert none.min_effective_items_per_class == pytest.approx(smallest, abs=1e-6)  # uniform weights: every item
    some = exact_tilt(task, x, cond, u, 0.5, config, repeats=1)
    assert some.gain == pytest.approx(0.5, abs=1e-6) and some.inverse_beta > 0 and some.kl > 0
    assert some.min_effective_items_per_class < smallest
    assert 0 <= some.class_accuracy <= 1 and some.frechet > 0
