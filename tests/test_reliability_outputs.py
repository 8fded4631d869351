"""Fault tables of outputs: nothing is ever replaced that the command did not make.

(a) every command refuses an output that exists and is another kind of thing, is one of its inputs, or is
    a symbolic link: exit 2, one line, every file unchanged; (b) `--overwrite` replaces an output of the
    same kind and nothing else; (c) a run folder is locked while a process writes it; (d) a resume writes
    where it is pointed, never where the checkpoint says it once was; (e) a diffusers run refuses other base
    weights; (f) concurrent labelers of one name never answer a pair twice; (g) temporaries that killed
    writers left are removed by the next writer of the same name.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from test_reliability_cli import ERROR_LINE, build_world

from scoreaction.feedback.store import PreferenceStore
from scoreaction.io import LOCK
from scoreaction.outputs import RUN, FolderLock, claim_folder

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_TRAIN = ["--updates", "2", "--batch-size", "8", "--steps", "4", "--hidden", "16", "--eval-n", "64",
              "--eval-steps", "4", "-q", "--threads", "1", "--set", "task.dim=2"]
RM_FIT = ["--epochs", "1", "--ensemble", "1", "--set", "hidden=8", "--min-steps", "1"]


def snapshot(*roots) -> dict:
    """path -> (size, mtime, inode, bytes) of every file, the target of every link, "dir" for folders."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = "dir"
            else:
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino, path.read_bytes())
    return out


def one_line(code, err, fragment=""):
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and ERROR_LINE.match(err) and "Traceback" not in err, err[-2000:]
    assert fragment in err, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tmp_path_factory.mktemp("outputs")
    build_world(world)
    (world / "notes").mkdir()
    (world / "notes" / "notes.txt").write_text("the user's own file\n")
    shutil.copytree(world / "run", world / "run_with_notes")
    (world / "run_with_notes" / "notes.txt").write_text("the user's own file\n")
    shutil.copytree(world / "rm", world / "rm_with_notes")
    (world / "rm_with_notes" / "notes.txt").write_text("the user's own file\n")
    (world / "text.npz").write_text("not samples\n")
    shutil.copy(world / "store.db", world / "inuse.db")
    (world / "inuse.db-wal").write_bytes(b"")  # a store open elsewhere, or not closed
    (world / "points.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    os.link(world / "store.db", world / "hardlink.db")  # the store under a second name
    shutil.copytree(world / "run", world / "run_deep_notes")
    (world / "run_deep_notes" / "checkpoints" / "step-000002" / "notes.txt").write_text("the user's own file\n")
    (world / "run_deep_notes" / "checkpoints" / "best").mkdir()
    for name, target in [("link_new", "nowhere"), ("link_run", "run"), ("link_rm", "rm"),
                         ("link.jsonl", "export.jsonl"), ("link.db", "store.db"),
                         ("link.safetensors", "cmp.safetensors"), ("link.npz", "text.npz")]:
        (world / name).symlink_to(world / target)
    return world


W, CWD = "{world}", "{cwd}"
S = f"{W}/store.db"
TRAIN = ["train", *TINY_TRAIN]
FIT = ["reward", "fit", "--comparisons", f"{W}/cmp.safetensors", *RM_FIT]
SIM = ["reward", "simulate", "--task", "gaussian", "--n", "20", "--items", "10"]
SAMPLE = ["sample", "--task", "gaussian", "--n", "8", "--steps", "2", "-q"]
EXPORT = ["export", "--checkpoint", f"{W}/run"]
PRETRAIN = ["pretrain", "--steps", "1", "--classifier-epochs", "1", "--no-evaluate", "-q"]
QUICK = ["quickstart", "--updates", "1", "--pairs", "10", "--items", "20", "-q"]

OTHER_KIND = "never replaced"
CASES = [
    # --- an existing output of another kind, with and without --overwrite ----------------------------
    *[(argv + ["--out", out] + more, fragment) for argv in (TRAIN,) for out, fragment in [
        (f"{W}/rm", OTHER_KIND), (f"{W}/notes", OTHER_KIND), (f"{W}/run_with_notes", "'notes.txt'"),
        (f"{W}/emptydir/../store.db", "is a file"), (f"{W}/run", "pass --overwrite")] for more in ([], ["--overwrite"])
      if not (more and fragment == "pass --overwrite")],
    *[(FIT + ["--out", out] + more, fragment) for out, fragment in [
        (f"{W}/run", "a training run folder, not a reward model folder"), (f"{W}/notes", OTHER_KIND),
        (f"{W}/rm_with_notes", "'notes.txt'"), (f"{W}/rm", "pass --overwrite")] for more in ([], ["--overwrite"])
      if not (more and fragment == "pass --overwrite")],
    *[(SIM + ["--out", out] + more, fragment) for out, fragment in [
        (S, "a preference store, not a comparisons file"), (f"{W}/export.jsonl", OTHER_KIND),
        (f"{W}/afile.txt", OTHER_KIND), (f"{W}/cmp.safetensors", "pass --overwrite")] for more in ([], ["--overwrite"])
      if not (more and fragment == "pass --overwrite")],
    *[(SAMPLE + ["--out", out] + more, fragment) for out, fragment in [
        (f"{W}/text.npz", OTHER_KIND)] for more in ([], ["--overwrite"])],
    *[(["feedback", "export", "--store", S, "--out", out] + more, fragment) for out, fragment in [
        (f"{W}/cmp.safetensors", OTHER_KIND), (f"{W}/afile.txt", OTHER_KIND), (f"{W}/foreign.db", OTHER_KIND),
        (f"{W}/export.jsonl", "pass --overwrite")] for more in ([], ["--overwrite"])
      if not (more and fragment == "pass --overwrite")],
    *[(["feedback", "backup", "--store", S, "--out", out] + more, fragment) for out, fragment in [
        (f"{W}/export.jsonl", "already exists"), (f"{W}/afile.txt", "already exists"),
        (f"{W}/notsqlite.db", "already exists")] for more in ([], ["--overwrite"])],
    *[(EXPORT + ["--out", out] + more, fragment) for out, fragment in [
        (f"{W}/rm", OTHER_KIND), (f"{W}/notes", OTHER_KIND)] for more in ([], ["--overwrite"])],
    *[(PRETRAIN + ["--out", out] + more, fragment) for out, fragment in [
        (f"{W}/run", OTHER_KIND), (f"{W}/rm", OTHER_KIND), (f"{W}/notes", OTHER_KIND)]
      for more in ([], ["--overwrite"])],
    *[(QUICK + ["--out", out], OTHER_KIND) for out in (f"{W}/run", f"{W}/notes", f"{W}/rm")],
    # --- an output that is an input of the same command ----------------------------------------------
    (["feedback", "export", "--store", S, "--out", S], "is an input"),
    (["feedback", "export", "--store", S, "--out", S, "--overwrite"], "is an input"),
    (["feedback", "export", "--store", S, "--out", f"{W}/emptydir/../store.db", "--overwrite"], "is an input"),
    (["feedback", "backup", "--store", S, "--out", S, "--overwrite"], "is an input"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/inuse.db", "--overwrite"], "is in use or was not closed"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/link.db", "--overwrite"], "symbolic link"),
    (["reward", "fit", "--store", S, "--out", S, "--overwrite"], "is an input"),
    (["reward", "fit", "--comparisons", f"{W}/cmp.safetensors", "--out", W, "--overwrite"], "holds an input"),
    (EXPORT + ["--out", f"{W}/run", "--overwrite"], "is an input"),
    (["sample", "--checkpoint", f"{W}/run/checkpoints/step-000002", "-q", "--n", "4", "--out",
      f"{W}/run/checkpoints/step-000002", "--overwrite"], "npz"),
    (["feedback", "export", "--store", S, "--out", f"{W}/hardlink.db", "--overwrite"], "is an input"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/hardlink.db", "--overwrite"], "is an input"),
    (["reward", "fit", "--comparisons", f"{W}/cmp.safetensors", "--out", f"{W}/emptydir/..", "--overwrite"],
     "holds an input"),
    # --- an output inside an input folder, or named as a store's journal -------------------------------
    (SAMPLE[:1] + ["--checkpoint", f"{W}/run", "-q", "--n", "4", "--out", f"{W}/run/checkpoints/step-000002/s.npz"],
     "lies inside an input"),
    (EXPORT + ["--out", f"{W}/run/lora"], "lies inside an input"),
    (["feedback", "export", "--store", S, "--out", f"{S}-journal"], "the name SQLite gives a journal"),
    (["feedback", "backup", "--store", S, "--out", f"{S}-wal"], "the name SQLite gives a journal"),
    (SIM + ["--out", f"{S}-shm"], "the name SQLite gives a journal"),
    # --- files of the user's deep inside a folder of our kind ------------------------------------------
    (TRAIN + ["--out", f"{W}/run_deep_notes", "--overwrite"], "'checkpoints/best', 'checkpoints/step-000002/notes.txt'"),
    # --- symbolic links as outputs ---------------------------------------------------------------------
    (TRAIN + ["--out", f"{W}/link_new"], "symbolic link"),
    (TRAIN + ["--out", f"{W}/link_run", "--overwrite"], "symbolic link"),
    (FIT + ["--out", f"{W}/link_rm", "--overwrite"], "symbolic link"),
    (FIT + ["--out", f"{W}/link_new"], "symbolic link"),
    (SIM + ["--out", f"{W}/link.safetensors", "--overwrite"], "symbolic link"),
    (SAMPLE + ["--out", f"{W}/link.npz", "--overwrite"], "symbolic link"),
    (["feedback", "export", "--store", S, "--out", f"{W}/link.jsonl", "--overwrite"], "symbolic link"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/link_new"], "symbolic link"),
    (EXPORT + ["--out", f"{W}/link_new"], "symbolic link"),
    (PRETRAIN + ["--out", f"{W}/link_new"], "symbolic link"),
    (QUICK + ["--out", f"{W}/link_new"], "symbolic link"),
]


def case_id(case) -> str:
    return " ".join(case[0]).replace(W + "/", "").replace(" ".join(TINY_TRAIN), "..")[:90]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[case_id(c) for c in CASES])
def test_an_output_that_is_not_ours_is_refused_and_nothing_changes(world, tmp_path, monkeypatch, capsys, argv,
                                                                   fragment):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace(W, str(world)).replace(CWD, str(tmp_path)) for a in argv]
    before = snapshot(world, tmp_path)
    code, _, err = run_cli(capsys, *argv)
    one_line(code, err, fragment)
    assert snapshot(world, tmp_path) == before, "a file was created or changed"


@pytest.mark.parametrize("inside, argv", [
    ("run", TRAIN + ["--out", ".", "--overwrite"]),
    ("run/checkpoints", TRAIN + ["--out", "..", "--overwrite"]),
    ("rm", FIT + ["--out", "../rm", "--overwrite"]),
], ids=["train --out .", "train --out ..", "reward fit --out ../rm"])
def test_a_folder_is_never_replaced_from_inside_it(world, tmp_path, monkeypatch, capsys, inside, argv):
    for name in ("run", "rm"):
        shutil.copytree(world / name, tmp_path / name)
    monkeypatch.chdir(tmp_path / inside)
    before = snapshot(world, tmp_path)
    code, _, err = run_cli(capsys, *[a.replace(W, str(world)) for a in argv])
    one_line(code, err, "holds the current folder")
    assert snapshot(world, tmp_path) == before


def test_an_output_named_dot_in_an_empty_folder_is_written_there(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *[a.replace(W, str(world)) for a in FIT], "--out", ".")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "reward.json"]


# --- (b) --overwrite replaces an output of the same kind, and nothing else ----------------------------
OVERWRITE = [
    ("train", TRAIN + ["--out", "{out}"], "run"),
    ("sample", SAMPLE + ["--out", "{out}"], "s.npz"),
    ("reward simulate", SIM + ["--out", "{out}"], "c.safetensors"),
    ("reward fit", FIT + ["--out", "{out}"], "rm"),
    ("feedback export", ["feedback", "export", "--store", S, "--out", "{out}"], "e.jsonl"),
    ("feedback backup", ["feedback", "backup", "--store", S, "--out", "{out}"], "b.db"),
]


@pytest.mark.parametrize("name, argv, out", OVERWRITE, ids=[c[0] for c in OVERWRITE])
def test_overwrite_replaces_the_same_kind_and_nothing_else(world, tmp_path, monkeypatch, capsys, name, argv, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a neighbour\n")
    argv = [a.replace(W, str(world)).replace("{out}", str(tmp_path / out)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    first = (tmp_path / out).stat().st_ino
    before = snapshot(world, tmp_path)
    code, _, err = run_cli(capsys, *argv)  # without --overwrite: refused
    one_line(code, err, "pass --overwrite to replace it")
    assert snapshot(world, tmp_path) == before
    neighbours = {k: v for k, v in before.items() if not k.startswith(str(tmp_path / out))}
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    after = snapshot(world, tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(tmp_path / out))} == neighbours
    assert (tmp_path / out).stat().st_ino != first  # a new file or folder was renamed in
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_rerun_of_quickstart_replaces_its_own_folder_only(tmp_path):
    from scoreaction.experiments.quickstart import OUTPUT, WRITES

    folder = tmp_path / "qs"
    folder.mkdir()
    for name in WRITES[:2] + ("results.json", "samples_em.png"):
        (folder / name).write_text("x")
    (folder / "train").mkdir()
    assert OUTPUT.recognises(folder)
    lock = claim_folder(folder, OUTPUT, fresh=True, overwrite=True)
    lock.release()
    assert [p.name for p in folder.iterdir()] == [LOCK] and sorted(p.name for p in tmp_path.iterdir()) == ["qs"]
    (folder / "store.sqlite").write_text("x")
    (folder / "mine.txt").write_text("the user's")
    assert not OUTPUT.recognises(folder)


# --- (c) a run folder is locked while a process writes it --------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--resume", "{copy}", "--updates", "3", "-q"],
    ["train", "--resume", "{copy}/checkpoints/step-000001", "--updates", "3", "-q"],
    TRAIN + ["--out", "{copy}", "--overwrite"],
], ids=["resume", "resume a checkpoint", "overwrite"])
def test_a_second_writer_of_a_run_folder_is_refused(world, tmp_path, capsys, argv):
    copy = tmp_path / "run"
    shutil.copytree(world / "run", copy)
    fd = os.open(copy / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer, as a lock on its own open file
    os.write(fd, b"4242\n")
    try:
        before = snapshot(tmp_path)
        code, _, err = run_cli(capsys, *[a.replace("{copy}", str(copy)) for a in argv])
        one_line(code, err, f"run folder {str(copy)!r} is in use by process 4242")
        assert snapshot(tmp_path) == before
        with pytest.raises(ValueError, match="in use by process 4242"):
            claim_folder(copy, RUN, fresh=False)
    finally:
        os.close(fd)
    claim_folder(copy, RUN, fresh=False).release()  # free again once the writer has gone


def test_the_lock_of_a_killed_writer_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid}"):
            FolderLock(tmp_path, "run folder")
        FolderLock.check(tmp_path / "missing")  # nobody holds a folder without a lock file
    finally:
        holder.kill()  # SIGKILL
        holder.wait(timeout=30)
    with FolderLock(tmp_path, "run folder"):
        assert (tmp_path / LOCK).read_text().strip() == str(os.getpid())


def test_two_fresh_runs_cannot_both_take_one_new_folder(tmp_path):
    first = claim_folder(tmp_path / "run", RUN, fresh=True)
    try:
        with pytest.raises(ValueError, match="in use by process"):
            claim_folder(tmp_path / "run", RUN, fresh=True)
    finally:
        first.release()
    (tmp_path / "run" / "config.json").write_text("{}")  # what the first run wrote meanwhile
    with pytest.raises(ValueError, match="already exists"):
        claim_folder(tmp_path / "run", RUN, fresh=True)


# --- (d) a resume writes where it is pointed ------------------------------------------------------------
def elsewhere(copy: Path, original: Path) -> None:
    """Make the copy's checkpoints record the original's folder as their `out`."""
    for state in copy.glob("checkpoints/step-*/state.json"):
        data = json.loads(state.read_text())
        data["config"]["out"] = str(original)
        state.write_text(json.dumps(data))


@pytest.mark.parametrize("target, change", [
    ("copy", None), ("copy/checkpoints", None), ("copy/checkpoints/step-000001", None), ("copy", elsewhere),
    ("copy/checkpoints/step-000002", elsewhere),
], ids=["run", "checkpoints", "checkpoint", "recorded out elsewhere", "checkpoint, recorded out elsewhere"])
def test_a_resumed_copy_writes_into_the_copy_only(world, tmp_path, monkeypatch, capsys, target, change):
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(world / "run", original)
    shutil.copytree(original, copy)
    if change is not None:
        change(copy, original)
    monkeypatch.chdir(tmp_path / "copy" / "checkpoints")  # a relative out recorded as "run" resolves nowhere here
    before = snapshot(original)
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / target), "--updates", "3", "-q")
    assert code == 0, err
    assert snapshot(original) == before, "the original run changed"
    assert (copy / "checkpoints" / "step-000003").is_dir() and (copy / "checkpoints" / "latest").read_text() == \
        "step-000003\n"
    assert not (tmp_path / "copy" / "checkpoints" / "run").exists()


DAMAGED_NEWEST = [
    ("step -5", lambda s: {**s, "step": -5}, "step must be an integer >= 0, found -5"),
    ("trajectories a string", lambda s: {**s, "trajectories": "16"}, "trajectories must be an integer >= 0"),
    ("step true", lambda s: {**s, "step": True}, "step must be an integer >= 0, found True"),
    ("another format", lambda s: {**s, "format": "scoreaction-checkpoint-9"}, "format must be 'scoreaction-checkpoint-1'"),
    ("metrics a list", lambda s: {**s, "metrics": [1, 2]}, "metrics must be a JSON object, found a JSON list"),
]


@pytest.mark.parametrize("damage, fragment", [c[1:] for c in DAMAGED_NEWEST], ids=[c[0] for c in DAMAGED_NEWEST])
def test_a_resume_keeps_a_damaged_newer_checkpoint_aside(world, tmp_path, monkeypatch, capsys, damage, fragment):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    state = run / "checkpoints" / "step-000002" / "state.json"
    state.write_text(json.dumps(damage(json.loads(state.read_text()))))
    damaged = state.read_bytes()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(run), "--n", "4", "--steps", "2", "-q",
                           "--out", str(tmp_path / "s.npz"))  # reading passes over it, with a warning
    assert code == 0 and "using" in err and "step-000001" in err, err
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--updates", "3", "-q")
    assert code == 0, err
    assert fragment in err and "step-000001" in err and ".damaged" in err, err
    assert (run / "checkpoints" / ".step-000002.damaged" / "state.json").read_bytes() == damaged
    assert (run / "checkpoints" / "latest").read_text() == "step-000003\n"


def test_a_lone_checkpoint_resumes_only_where_out_says(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world / "run" / "checkpoints" / "step-000001", tmp_path / "lone")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "lone"), "--updates", "2", "-q")
    one_line(code, err, "lies in no run folder")
    assert snapshot(tmp_path) == before
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "lone"), "--updates", "2", "-q",
                           "--out", str(tmp_path / "branch"))
    assert code == 0, err
    assert (tmp_path / "branch" / "checkpoints" / "step-000002").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branch", "lone"]


# --- (e) a diffusers run refuses other base weights ---------------------------------------------------
def test_a_diffusers_run_refuses_other_base_weights(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from scoreaction.models.pipeline import build_tiny

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    build_tiny("tiny-sd").save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--set", "task.name=diffusers", "--set", f"task.model={tmp_path / 'base'}",
                           "--set", "task.eval_n=2", "--kernel", "ddim", "--grid", "scheduler", "--steps", "2",
                           "--batch-size", "2", "--updates", "1", "--eval-steps", "2", "--device", "cpu",
                           "--no-tensorboard", "-q", "--out", str(run))
    assert code == 0, err
    recorded = json.loads((run / "checkpoints" / "step-000001" / "state.json").read_text())["base_weights"]
    assert recorded.startswith("sha256:") and len(recorded) == 7 + 64
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(run), "--out", str(tmp_path / "lora"))
    assert code == 0, err

    weights = tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3  # one weight of the base model changed
    save_file(tensors, str(weights))
    before = snapshot(tmp_path)
    for argv in (["train", "--resume", str(run), "--updates", "2", "-q"],
                 ["sample", "--checkpoint", str(run), "--n", "2", "--steps", "2", "-q", "--out", "s.png"],
                 ["evaluate", "--checkpoint", str(run), "--n", "2", "--steps", "2"],
                 ["export", "--checkpoint", str(run), "--out", str(tmp_path / "lora"), "--overwrite"]):
        code, _, err = run_cli(capsys, *argv)
        one_line(code, err, recorded)
        assert "now has sha256:" in err and err.count("sha256:") == 2
        assert snapshot(tmp_path) == before


# --- (f) concurrent labelers of one name never answer a pair twice ------------------------------------
@pytest.fixture
def points_store(tmp_path):
    with PreferenceStore(tmp_path / "s.db", create=True) as store:
        ids = store.add_items(np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32), task="gaussian")
    return tmp_path / "s.db", ids


def answered_pairs(path, labeler):
    with PreferenceStore(path) as store:
        return [tuple(sorted((c["left"], c["right"]))) for c in store.comparisons(labeler=labeler)]


def test_threads_answering_for_one_labeler_never_answer_a_pair_twice(points_store):
    path, ids = points_store
    for round_ in range(6):
        rows = [{"left": ids[i], "right": ids[i + 1 + round_], "choice": "left", "labeler": f"sim{round_}"}
                for i in range(20)]
        rows += [{**rows[0], "left": rows[0]["right"], "right": rows[0]["left"]}]  # the same pair, swapped
        store = PreferenceStore(path)
        barrier = threading.Barrier(3)
        results = []

        def answer():
            barrier.wait()
            results.append(store.add_comparisons(rows, skip_answered=True))

        threads = [threading.Thread(target=answer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        store.close()
        pairs = answered_pairs(path, f"sim{round_}")
        assert len(pairs) == len(set(pairs)) == 20
        assert sum(i is not None for r in results for i in r) == 20


def test_two_simulate_processes_for_one_labeler_never_answer_a_pair_twice(points_store):
    path, _ = points_store
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scoreaction", "feedback", "simulate", "--store", str(path), "--pairs", "40",
               "--labeler", "sim", "--seed", "0"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    pairs = answered_pairs(path, "sim")
    assert len(pairs) == len(set(pairs)) and 40 <= len(pairs) <= 80


# --- (g) temporaries that killed writers left are removed by the next writer of the same name ---------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


STALE = [
    ("feedback export", ["feedback", "export", "--store", S, "--out", "{out}"], "e.jsonl", False),
    ("feedback backup", ["feedback", "backup", "--store", S, "--out", "{out}"], "b.db", False),
    ("reward simulate", SIM + ["--out", "{out}"], "c.safetensors", False),
    ("reward fit", FIT + ["--out", "{out}"], "rm", True),
    ("sample", SAMPLE + ["--out", "{out}"], "s.npz", False),
]


@pytest.mark.parametrize("name, argv, out, folder", STALE, ids=[c[0] for c in STALE])
def test_stale_temporaries_are_removed_by_the_next_run(world, tmp_path, monkeypatch, capsys, name, argv, out, folder):
    monkeypatch.chdir(tmp_path)
    dead = dead_pid()
    mine = tmp_path / f".{out}.tmp-{dead}"
    mine.mkdir() if folder else mine.write_text("half an output")
    kept = [tmp_path / f".{out}.tmp-{os.getppid()}", tmp_path / f".other.tmp-{dead}"]  # a live writer's; another name's
    for path in kept:
        path.write_text("x")
    code, _, err = run_cli(capsys, *[a.replace(W, str(world)).replace("{out}", str(tmp_path / out)) for a in argv])
    assert code == 0, err
    assert not mine.exists() and all(path.exists() for path in kept)
