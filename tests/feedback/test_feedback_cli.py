"""`scoreaction feedback ...`: a store's life end to end on the command line, tokens that work against the
app, samples of a checkpoint, simulated labelers, and one-line errors with exit code 2."""

import json
import os
import selectors
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
from helpers import run_cli as run

from scoreaction.cli import main
from scoreaction.evaluation import sample_with
from scoreaction.feedback.store import PreferenceStore
from scoreaction.train.loop import Trainer

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server


def test_a_store_from_init_to_export_and_import(tmp_path, capsys):
    db, copy, dump = tmp_path / "p.db", tmp_path / "copy.db", tmp_path / "p.jsonl"
    code, _, err = run(capsys, "feedback", "stats", "--store", db)
    assert code == 2 and "does not exist" in err and not db.exists()
    assert run(capsys, "feedback", "init", "--store", db)[0] == 0
    code, _, err = run(capsys, "feedback", "init", "--store", db)
    assert code == 2 and "already exists" in err

    code, out, _ = run(capsys, "feedback", "add-items", "--store", db, "--task", "mixture", "--pretrained", "--n", 12,
                       "--steps", 10)
    assert code == 0 and "added 12 items" in out
    store = PreferenceStore(db)
    items = store.items()
    assert len(items) == 12 and {m["model"] for m in items} == {"pretrained:mixture"}
    assert {(m["task"], m["shape"], m["dtype"]) for m in items} == {("mixture", (2,), "<f4")}

    assert run(capsys, "feedback", "enqueue", "--store", db, "--pairs", 10)[0] == 0
    assert len(store.queue()) == 10
    for _ in range(2):
        code, out, _ = run(capsys, "feedback", "simulate", "--store", db, "--labeler", "sim", "--pairs", 25,
                           "--temperature", 0.5, "--error-rate", 0.1, "--seed", 1)
        assert code == 0 and "25 answers" in out
    rows = store.comparisons(labeler="sim")
    assert len(rows) == 50 and {r["choice"] for r in rows} <= {"left", "right"}
    assert len({frozenset((r["left"], r["right"])) for r in rows}) == 50  # the second run asked new pairs

    code, out, _ = run(capsys, "feedback", "export", "--store", db, "--out", dump)
    assert code == 0 and "12 items, 50 comparisons, 10 queued pairs" in out
    code, _, err = run(capsys, "feedback", "import", "--store", copy, "--in", dump)
    assert code == 2 and "does not exist" in err
    assert run(capsys, "feedback", "import", "--store", copy, "--in", dump, "--create")[0] == 0
    code, out, _ = run(capsys, "feedback", "import", "--store", copy, "--in", dump)
    assert code == 0 and "0 new comparisons (50 already stored)" in out
    code, out, _ = run(capsys, "feedback", "stats", "--store", copy, "--json")
    stats = json.loads(out)
    assert stats["comparisons"]["sim"]["answers"] == 50 and stats["queued"] == 10
    assert PreferenceStore(copy).comparisons() == rows
    code, out, _ = run(capsys, "feedback", "stats", "--store", db)
    assert code == 0 and "sim" in out and "pretrained:mixture" in out


def test_the_printed_token_opens_the_app(tmp_path, capsys, live_server):
    db = tmp_path / "p.db"
    code, out, err = run(capsys, "feedback", "add-labeler", "ann", "--store", db, "--create")
    token = out.strip()
    assert code == 0 and len(token) >= 32 and "\n" not in token and f"?token={token}" in err
    server = live_server(PreferenceStore(db))
    r = httpx.get(f"{server.url}/api/progress", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["labeler"] == "ann"
    code, out, _ = run(capsys, "feedback", "add-labeler", "ann", "--store", db, "--replace")
    assert httpx.get(f"{server.url}/api/progress", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.get(f"{server.url}/api/progress", headers={"Authorization": f"Bearer {out.strip()}"}).status_code == 200


def test_items_from_a_checkpoint_are_its_policy_samples(tmp_path, capsys):
    run_dir, db = tmp_path / "run", tmp_path / "p.db"
    code = main(["train", "--task", "gaussian", "--updates", "1", "--out", str(run_dir), "-q", "--set", "batch_size=16",
                 "--set", "steps=4", "--set", "eval_n=64", "--set", "eval_steps=4", "--set", "eval_every=0"])
    assert code == 0
    capsys.readouterr()
    argv = ["feedback", "add-items", "--store", db, "--create", "--checkpoint", run_dir, "--n", 6, "--steps", 8,
            "--solver", "heun", "--seed", 3]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "added 6 items" in out
    trainer = Trainer.from_checkpoint(str(run_dir), progress=False)
    x, _ = sample_with(trainer.policy, trainer.task, "heun", 8, 6, 3, dtype=trainer.dtype)
    store = PreferenceStore(db)
    stored = np.stack(store.item_arrays([m["id"] for m in store.items()]))
    assert np.array_equal(stored, x.float().numpy())
    assert store.items()[0]["model"].startswith("checkpoint:") and "step-000001" in store.items()[0]["model"]
    assert run(capsys, *argv)[0] == 0 and len(store.items()) == 6  # the same samples again: nothing new


def test_simulate_and_enqueue_where_a_reward_ensemble_disagrees(make_store, tmp_path, capsys):
    from scoreaction.rewards.preference import fit_reward_model

    store = make_store(n_items=16)
    db = store.path
    assert run(capsys, "feedback", "simulate", "--store", db, "--labeler", "first", "--pairs", 30)[0] == 0
    fit = fit_reward_model(store.dataset(), ensemble=3, epochs=2, min_steps=10, hidden=16)
    fit.model.save(tmp_path / "rm")
    code, out, _ = run(capsys, "feedback", "simulate", "--store", db, "--labeler", "active", "--pairs", 12,
                       "--strategy", "disagreement", "--reward-model", tmp_path / "rm")
    assert code == 0 and "12 answers" in out and "disagreement" in out
    assert len(store.comparisons(labeler="active")) == 12
    code, out, _ = run(capsys, "feedback", "enqueue", "--store", db, "--pairs", 5, "--strategy", "disagreement",
                       "--reward-model", tmp_path / "rm")
    assert code == 0 and len(store.queue()) == 5


@pytest.mark.parametrize("argv, message", [
    (["stats", "--store", "{garbage}"], "garbage.db"),
    (["add-items", "--store", "{db}", "--n", "3"], "either --checkpoint DIR or --task NAME"),
    (["add-items", "--store", "{db}", "--task", "mixture", "--n", "3"], "add --pretrained"),
    (["add-items", "--store", "{db}", "--task", "nope", "--pretrained", "--n", "3"], "task must be one of"),
    (["add-items", "--store", "{db}", "--checkpoint", "{tmp}/no-run", "--n", "3"], "no-run"),
    (["add-items", "--store", "{db}", "--task", "mixture", "--pretrained", "--n", "0"], "positive integer"),
    (["simulate", "--store", "{db}", "--labeler", "x", "--pairs", "3"], "holds no items"),
    (["simulate", "--store", "{full}", "--labeler", "x", "--pairs", "3", "--strategy", "disagreement"],
     "needs --reward-model"),
    (["simulate", "--store", "{full}", "--labeler", "x", "--pairs", "3", "--utility", "nope"], "utility"),
    (["simulate", "--store", "{full}", "--labeler", "x", "--pairs", "999"], "only 45 are allowed"),
    (["simulate", "--store", "{full}", "--labeler", "two words", "--pairs", "3"], "labeler name"),
    (["import", "--store", "{db}", "--in", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["import", "--store", "{db}", "--in", "{garbage}"], "garbage.db' line 1"),
    (["add-labeler", "bad name", "--store", "{db}"], "labeler name"),
    (["serve", "--store", "{db}", "--port", "{busy_port}"], "cannot listen"),
    (["serve", "--store", "{tmp}/nothing.db"], "does not exist"),
    (["init"], "--store is required"),
    (["export", "--store", "{db}"], "--out is required"),
    (["simulate", "--store", "{full}", "--pairs", "3"], "--labeler is required"),
])
def test_errors_are_one_line_with_exit_code_2(make_store, tmp_path, capsys, argv, message):
    (tmp_path / "garbage.db").write_bytes(b"\x00garbage" * 64)
    PreferenceStore(tmp_path / "empty.db", create=True)
    make_store("full.db", n_items=10)
    busy = socket.create_server(("127.0.0.1", 0))
    names = {"garbage": tmp_path / "garbage.db", "db": tmp_path / "empty.db", "full": tmp_path / "full.db",
             "tmp": tmp_path, "busy_port": busy.getsockname()[1]}
    try:
        code, _, err = run(capsys, "feedback", *[a.format(**names) for a in argv])
    finally:
        busy.close()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scoreaction") and message in lines[0], err


def test_serve_runs_until_stopped(make_store, tmp_path):
    store = make_store(n_items=4, n_queued=2)
    token = store.add_labeler("ann")
    proc = subprocess.Popen([sys.executable, "-m", "scoreaction", "feedback", "serve", "--store", str(store.path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=60), "serve printed nothing"
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        page = httpx.get(url)
        assert page.status_code == 200 and "scoreaction" in page.text
        r = httpx.get(f"{url}api/next", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["progress"]["queued"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in proc.stderr.read()
