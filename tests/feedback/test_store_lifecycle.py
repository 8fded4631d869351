"""A store at rest is one file: every feedback command closes it (folding the WAL back), on errors too,
and so does `serve` when it stops; `feedback backup` copies it consistently while others write."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import one_line_error, run_cli

from scoreaction.errors import OutputError
from scoreaction.feedback.store import PreferenceStore

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server, answer_next


def wal_of(path) -> Path:
    return Path(f"{path}-wal")


def answers_in_file_alone(path, tmp_path) -> int:
    """Copy the store's main file alone (what a user who forgets the -wal file moves) and count answers."""
    copy = tmp_path / f"alone-{uuid.uuid4().hex}.db"
    shutil.copyfile(path, copy)
    con = sqlite3.connect(copy)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT count(*) FROM comparisons").fetchone()[0]
    finally:
        con.close()


def test_every_command_leaves_one_file(tmp_path, capsys):
    db = tmp_path / "s.db"
    commands = [
        (["feedback", "init", "--store", db], 0),
        (["feedback", "add-labeler", "--store", db, "ann"], 0),
        (["feedback", "add-items", "--store", db, "--task", "gaussian", "--pretrained", "--n", "12",
          "--steps", "5"], 0),
        (["feedback", "enqueue", "--store", db, "--pairs", "4"], 0),
        (["feedback", "simulate", "--store", db, "--pairs", "6", "--labeler", "sim"], 0),
        (["feedback", "stats", "--store", db, "--json"], 0),
        (["feedback", "export", "--store", db, "--out", tmp_path / "e.jsonl"], 0),
        (["feedback", "import", "--store", db, "--in", tmp_path / "e.jsonl"], 0),
        (["feedback", "backup", "--store", db, "--out", tmp_path / "b.db"], 0),
        (["reward", "fit", "--store", db, "--out", tmp_path / "rm", "--epochs", "1", "--ensemble", "1"], 0),
        (["feedback", "enqueue", "--store", db, "--pairs", "2", "--task", "nope"], 2),  # fails after opening
        (["feedback", "simulate", "--store", db, "--pairs", "2", "--labeler", "sim", "--utility", "nope"], 2),
        (["feedback", "import", "--store", db, "--in", db], 2),
    ]
    for argv, expected in commands:
        code, out, err = run_cli(capsys, *argv)
        assert code == expected, (argv, out, err)
        assert not wal_of(db).exists(), argv
        assert not Path(f"{db}-shm").exists(), argv
    assert answers_in_file_alone(db, tmp_path) == 6


def test_backup_is_consistent_while_another_connection_writes(make_store, tmp_path):
    store = make_store(n_items=40)
    pairs = [(a, b) for a in range(1, 41) for b in range(a + 1, 41)]
    committed, stop = [], threading.Event()

    def writer():
        other = PreferenceStore(store.path)  # its own connections
        for k, (a, b) in enumerate(pairs):
            if stop.is_set():
                break
            uid = uuid.uuid4().hex
            other.add_comparisons([{"left": a, "right": b, "choice": "left", "labeler": "w", "uid": uid}])
            committed.append(uid)
        other.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(committed) < 50:
            time.sleep(0.001)
        before = set(committed)  # committed before the backup began
        counts = store.backup(tmp_path / "copy.db")
        after = set(committed)
    finally:
        stop.set()
        thread.join()
    store.close()
    con = sqlite3.connect(tmp_path / "copy.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copied = {row[0] for row in con.execute("SELECT uid FROM comparisons")}
    con.close()
    assert before <= copied <= after and counts["comparisons"] == len(copied) and counts["items"] == 40
    with PreferenceStore(tmp_path / "copy.db") as copy:  # a working store
        assert copy.count_comparisons() == len(copied)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]


def test_backup_never_overwrites(store, tmp_path, capsys):
    (tmp_path / "taken.db").write_text("mine")
    with pytest.raises(OutputError, match="already exists; pass --overwrite to replace it"):
        store.backup(tmp_path / "taken.db")
    assert (tmp_path / "taken.db").read_text() == "mine"
    code, _, err = run_cli(capsys, "feedback", "backup", "--store", store.path, "--out", tmp_path / "taken.db")
    one_line_error(code, err, "already exists")
    code, out, err = run_cli(capsys, "feedback", "backup", "--store", store.path, "--out", tmp_path / "new.db")
    assert code == 0 and "integrity ok" in out and "10 items" in out, err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("prefs")) == ["new.db", "taken.db"]


def test_serve_stopped_by_ctrl_c_leaves_every_answer_in_the_file(store, tmp_path, answer_next):
    token = store.add_labeler("ann")
    store.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scoreaction", "feedback", "serve", "--store", str(store.path),
                             "--port", "0", "--min-response-ms", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ", 1)[1].split()[0]
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(4):
                r = answer_next(client, headers)
                assert r.status_code == 200, r.text
        assert wal_of(store.path).exists()  # the answers are in the WAL while the server runs
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # the command line's exit code for Ctrl-C
        assert proc.stderr.read() == "scoreaction: interrupted\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not wal_of(store.path).exists()
    assert answers_in_file_alone(store.path, tmp_path) == 4


def test_serve_that_cannot_listen_still_closes_the_store(store, capsys):
    store.close()
    code, _, err = run_cli(capsys, "feedback", "serve", "--store", store.path, "--host", "no.such.host.invalid")
    one_line_error(code, err, "cannot listen on no.such.host.invalid")
    assert not wal_of(store.path).exists()


def test_export_refuses_a_folder_and_writes_nothing(store, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        store.export_jsonl(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    counts = store.export_jsonl(tmp_path / "e.jsonl")
    assert counts["items"] == 10 and json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])["version"] == 1


def test_kill_9_of_the_server_under_concurrent_writes_loses_no_acknowledged_answer(make_store, tmp_path):
    store = make_store(n_items=30)
    tokens = {f"l{k}": store.add_labeler(f"l{k}") for k in range(4)}
    store.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scoreaction", "feedback", "serve", "--store", str(store.path),
                             "--port", "0", "--min-response-ms", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    url = proc.stdout.readline().split(" at ", 1)[1].split()[0]
    acknowledged, lock = [], threading.Lock()

    def labeler(name):
        with httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {tokens[name]}"}) as client:
            for _ in range(435):  # 30 items: 435 pairs, served at random
                try:
                    pair = client.get("/api/next").json()
                    if pair["done"]:
                        return
                    a, b = pair["left"]["id"], pair["right"]["id"]
                    r = client.post("/api/answer", json={"left": a, "right": b, "choice": "left"})
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code == 200, r.text
                with lock:
                    acknowledged.append((name, a, b))

    threads = [threading.Thread(target=labeler, args=(name,)) for name in tokens]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()  # SIGKILL, while four labelers are writing
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        for thread in threads:
            thread.join()
    assert len(acknowledged) >= 60
    with PreferenceStore(store.path) as after:  # opens (recovering the WAL) and checks the file
        stored = {(c["labeler"], c["left"], c["right"]) for c in after.comparisons()}
    assert set(acknowledged) <= stored and len(stored) <= len(acknowledged) + len(tokens)
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
