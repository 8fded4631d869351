"""`scoreaction feedback ...` and `scoreaction reward ...` read their options from dataclasses: every action
takes `--config FILE` and `--set key=value`, with defaults < file < flags < --set; the old flags still parse;
unknown keys are one line with exit code 2 and nothing written."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import yaml
from helpers import one_line_error
from helpers import run_cli as run

from scoreaction.cli import build_parser
from scoreaction.cli.reward import FitOptions
from scoreaction.feedback.store import PreferenceStore
from scoreaction.rewards.preference import FitConfig, load_comparisons

OLD_FLAGS = {
    ("feedback", "init"): ["--store"],
    ("feedback", "add-labeler"): ["--store", "--create", "--replace"],
    ("feedback", "add-items"): ["--store", "--create", "--checkpoint", "--task", "--pretrained", "--n", "--solver",
                                "--steps", "--seed", "--model"],
    ("feedback", "enqueue"): ["--store", "--pairs", "--strategy", "--reward-model", "--task", "--seed", "--clear"],
    ("feedback", "simulate"): ["--store", "--labeler", "--utility", "--temperature", "--error-rate", "--tie-margin",
                               "--pairs", "--strategy", "--reward-model", "--task", "--seed"],
    ("feedback", "export"): ["--store", "--out"],
    ("feedback", "import"): ["--store", "--create", "--in"],
    ("feedback", "serve"): ["--store", "--host", "--port", "--question"],
    ("feedback", "stats"): ["--store", "--json"],
    ("reward", "fit"): ["--store", "--comparisons", "--task", "--labeler", "--out", "--ensemble", "--epochs",
                        "--min-steps", "--lr", "--val-fraction", "--arch", "--seed", "--json"],
    ("reward", "evaluate"): ["--model", "--store", "--comparisons", "--task", "--labeler", "--bins", "--json"],
    ("reward", "simulate"): ["--task", "--out", "--n", "--items", "--utility", "--temperature", "--error-rate",
                             "--tie-margin", "--seed"],
    ("reward", "bench"): ["--out", "--quick", "--seeds", "--workers", "-q", "--quiet"],
}


def subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def write_yaml(path, mapping) -> str:
    path.write_text(yaml.safe_dump({k: str(v) if hasattr(v, "__fspath__") else v for k, v in mapping.items()}))
    return str(path)


@pytest.fixture
def points_db(tmp_path):
    """A store of 10 two-dimensional points of task mixture (45 possible pairs)."""
    store = PreferenceStore(tmp_path / "p.db", create=True)
    store.add_items(np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32), task="mixture", model="test")
    return store


@pytest.mark.parametrize("command, action", sorted(OLD_FLAGS))
def test_every_action_takes_config_set_and_its_old_flags(command, action):
    parser = subparsers(subparsers(build_parser())[command])[action]
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--config", "--set"} <= flags
    assert set(OLD_FLAGS[command, action]) <= flags, set(OLD_FLAGS[command, action]) - flags


def test_feedback_simulate_file_then_flags_then_set(points_db, tmp_path, capsys):
    db = points_db.path
    config = write_yaml(tmp_path / "sim.yaml", {"store": db, "labeler": "filed", "pairs": 4, "tie_margin": 100.0})
    code, _, err = run(capsys, "feedback", "simulate", "--config", config)
    assert code == 0, err
    rows = points_db.comparisons(labeler="filed")
    assert len(rows) == 4 and {r["choice"] for r in rows} == {"tie"}  # the file's tie_margin reached the labeler

    # a flag overrides the file
    code, _, err = run(capsys, "feedback", "simulate", "--config", config, "--labeler", "flagged", "--pairs", 6,
                       "--tie-margin", 0)
    assert code == 0, err
    rows = points_db.comparisons(labeler="flagged")
    assert len(rows) == 6 and "tie" not in {r["choice"] for r in rows}

    # --set overrides the flag
    code, _, err = run(capsys, "feedback", "simulate", "--config", config, "--labeler", "set", "--pairs", 6,
                       "--set", "pairs=3", "--tie-margin", 0, "--set", "tie_margin=100")
    assert code == 0, err
    rows = points_db.comparisons(labeler="set")
    assert len(rows) == 3 and {r["choice"] for r in rows} == {"tie"}


def test_feedback_required_option_from_a_config_file(points_db, tmp_path, capsys):
    config = write_yaml(tmp_path / "export.yaml", {"store": points_db.path, "out": tmp_path / "dump.jsonl"})
    code, out, err = run(capsys, "feedback", "export", "--config", config)
    assert code == 0 and "wrote 10 items" in out, err
    assert (tmp_path / "dump.jsonl").is_file()
    code, _, err = run(capsys, "feedback", "import", "--store", tmp_path / "copy.db", "--set", "create=true",
                       "--set", f"input={tmp_path / 'dump.jsonl'}")
    assert code == 0, err
    assert len(PreferenceStore(tmp_path / "copy.db").items()) == 10


def test_feedback_unknown_or_bad_keys_are_one_line_and_write_nothing(points_db, tmp_path, capsys):
    code, _, err = run(capsys, "feedback", "init", "--store", tmp_path / "new.db", "--set", "bogus=1")
    one_line_error(code, err, "unknown option 'bogus'", "feedback init")
    assert not (tmp_path / "new.db").exists()

    argv = ["feedback", "simulate", "--store", points_db.path, "--labeler", "x", "--pairs", 3]
    code, _, err = run(capsys, *argv, "--set", "temprature=0.5")
    one_line_error(code, err, "unknown option 'temprature'", "temperature")
    code, _, err = run(capsys, *argv, "--set", "pairs=many")
    one_line_error(code, err, "pairs must be a positive integer", "'many'")
    code, _, err = run(capsys, *argv, "--set", "error_rate=2")
    one_line_error(code, err, "error_rate must be in [0, 1]")
    code, _, err = run(capsys, *argv, "--config", tmp_path / "missing.yaml")
    one_line_error(code, err, "missing.yaml", "does not exist")
    code, _, err = run(capsys, "feedback", "add-labeler", "--store", points_db.path)
    one_line_error(code, err, "NAME is required")
    assert points_db.comparisons() == [] and points_db.labelers() == []


def test_reward_simulate_file_then_flags_then_set(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    config = write_yaml(tmp_path / "sim.yaml", {"task": "mixture", "n": 40, "items": 100, "tie_margin": 100.0,
                                                "out": out})
    code, text, err = run(capsys, "reward", "simulate", "--config", config)
    assert code == 0 and "40 comparisons" in text, err
    comps = load_comparisons(out)
    assert len(comps) == 40 and bool(comps.tied.all())  # the file's tie_margin reached the labeler

    code, _, err = run(capsys, "reward", "simulate", "--config", config, "--n", 30, "--tie-margin", 0, "--overwrite")
    assert code == 0, err
    comps = load_comparisons(out)
    assert len(comps) == 30 and not bool(comps.tied.any())  # flags override the file

    code, _, err = run(capsys, "reward", "simulate", "--config", config, "--n", 30, "--set", "n=20", "--overwrite")
    assert code == 0, err
    assert len(load_comparisons(out)) == 20  # --set overrides the flag


def test_reward_unknown_set_key_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code, _, err = run(capsys, "reward", "simulate", "--task", "mixture", "--out", out, "--set", "nn=3")
    one_line_error(code, err, "unknown option 'nn'", "reward simulate")
    code, _, err = run(capsys, "reward", "simulate", "--task", "mixture", "--out", out, "--set", "task=nope")
    one_line_error(code, err, "task must be one of")
    assert not out.exists()
    code, _, err = run(capsys, "reward", "fit", "--comparisons", out, "--out", tmp_path / "rm", "--set", "hiden=3")
    one_line_error(code, err, "unknown option 'hiden'", "hidden")
    code, _, err = run(capsys, "reward", "fit", "--comparisons", out, "--out", tmp_path / "rm", "--set", "layers=1")
    one_line_error(code, err, "layers must be an integer >= 2")
    code, _, err = run(capsys, "reward", "fit", "--comparisons", out, "--out", tmp_path / "rm", "--arch", "rnn")
    one_line_error(code, err, "arch must be one of")
    assert not (tmp_path / "rm").exists()


def test_reward_fit_options_reach_fit_config(tmp_path, capsys):
    data = tmp_path / "c.safetensors"
    assert run(capsys, "reward", "simulate", "--task", "mixture", "--n", 60, "--items", 60, "--out", data)[0] == 0
    config = write_yaml(tmp_path / "fit.yaml", {"comparisons": data, "ensemble": 3, "epochs": 1, "min_steps": 5,
                                                "hidden": 8})
    code, out, err = run(capsys, "reward", "fit", "--config", config, "--out", tmp_path / "rm", "--ensemble", 2,
                         "--set", "hidden=16", "--set", "bootstrap=false", "--json")
    assert code == 0, err
    fitted = json.loads(out)["config"]
    assert fitted["ensemble"] == 2 and fitted["epochs"] == 1 and fitted["min_steps"] == 5
    assert fitted["hidden"] == 16 and fitted["bootstrap"] is False


def test_fit_options_mirror_fit_config():
    """Every FitConfig field is a FitOptions field (architecture as `arch`) with the same default."""
    names = {f.name for f in dataclasses.fields(FitOptions)}
    for f in dataclasses.fields(FitConfig):
        assert (f.name if f.name != "architecture" else "arch") in names, f.name
    assert FitOptions(comparisons="c.safetensors", out="rm").fit_config() == FitConfig()
