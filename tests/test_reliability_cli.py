"""Fault table of the command line: bad input to every command gives exit code 2, one line on stderr
("scoreaction[ COMMAND]: error: ...", naming what is wrong), and creates or changes no file.

Each case runs `scoreaction ARGV` in this process, in an empty working folder, against a shared set of
good and damaged files (`world`): a tiny training run and damaged copies of its checkpoint, a
preference store and files that are not one, comparisons, a reward model, export files and configs.
Every file of the world and of the working folder is hashed before and after each case.
"""

import contextlib
import hashlib
import io
import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from scoreaction.cli import main
from scoreaction.feedback.store import PreferenceStore

ERROR_LINE = re.compile(r"^scoreaction( [a-z-]+)*: error: \S")


def quiet_main(*argv) -> None:
    """Run a command that must succeed (building the world), its output swallowed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main([str(a) for a in argv])
    assert code == 0, err.getvalue()


def damaged_checkpoint(world: Path, name: str, good: Path, change) -> None:
    """A copy of the checkpoint folder `good` at world/name, then `change(folder)`."""
    folder = world / name
    shutil.copytree(good, folder)
    change(folder)


def edit_state(fn):
    def change(folder):
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(fn(state)))
    return change


def write(name, data):
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name, keep=0.5):
    def change(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return change


def without(name):
    return lambda folder: (folder / name).unlink()


def edit_tensors(name, fn):
    def change(folder):
        save_file(fn(load_file(str(folder / name))), str(folder / name))
    return change


def build_world(world: Path) -> None:
    # a tiny training run: checkpoints step-000001 and step-000002; its out is relative ("run"), so that a
    # copy resumed in another working folder writes there
    with contextlib.chdir(world):
        quiet_main("train", "--updates", 2, "--batch-size", 8, "--steps", 4, "--hidden", 16, "--checkpoint-every", 1,
                   "--eval-n", 64, "--eval-steps", 4, "--set", "task.dim=2", "-q", "--threads", 1, "--out", "run")
    good = world / "run" / "checkpoints" / "step-000002"
    cases = {
        "ck_state_list": write("state.json", b"[1, 2, 3]"),
        "ck_state_null": write("state.json", b"null"),
        "ck_state_number": write("state.json", b"42"),
        "ck_state_not_json": write("state.json", b"{\"config\": "),
        "ck_state_empty": write("state.json", b""),
        "ck_state_binary": write("state.json", b"\xff\xfe\x00\x01"),
        "ck_state_deep": write("state.json", b"[" * 100_000 + b"]" * 100_000),
        "ck_state_bigint": write("state.json", b'{"step": ' + b"9" * 5000 + b"}"),
        "ck_state_truncated": truncate("state.json"),
        "ck_no_config": edit_state(lambda s: {k: v for k, v in s.items() if k != "config"}),
        "ck_no_optimizer": edit_state(lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
        "ck_no_step": edit_state(lambda s: {k: v for k, v in s.items() if k != "step"}),
        "ck_no_trajectories": edit_state(lambda s: {k: v for k, v in s.items() if k != "trajectories"}),
        "ck_step_text": edit_state(lambda s: {**s, "step": "two"}),
        "ck_step_negative": edit_state(lambda s: {**s, "step": -3}),
        "ck_config_list": edit_state(lambda s: {**s, "config": [1, 2]}),
        "ck_config_unknown_key": edit_state(lambda s: {**s, "config": {**s["config"], "learning_rate": 1}}),
        "ck_config_nan_lr": edit_state(lambda s: {**s, "config": {**s["config"], "algo": {"lr": float("nan")}}}),
        "ck_config_bad_task": edit_state(lambda s: {**s, "config": {**s["config"], "task": {"name": "nope"}}}),
        "ck_optimizer_empty": edit_state(lambda s: {**s, "optimizer": {}}),
        "ck_no_rng": edit_tensors("train.safetensors", lambda t: {k: v for k, v in t.items() if k != "rng"}),
        "ck_rng_float": edit_tensors("train.safetensors", lambda t: {**t, "rng": torch.zeros(3)}),
        "ck_model_truncated": truncate("model.safetensors"),
        "ck_model_empty": write("model.safetensors", b""),
        "ck_model_garbage": write("model.safetensors", bytes(range(256)) * 8),
        "ck_model_header_only": truncate("model.safetensors", keep=0.05),
        "ck_train_truncated": truncate("train.safetensors", keep=0.9),
        "ck_missing_model": without("model.safetensors"),
        "ck_missing_train": without("train.safetensors"),
        "ck_missing_state": without("state.json"),
        "ck_model_missing_tensor": edit_tensors("model.safetensors", lambda t: dict(list(t.items())[1:])),
        "ck_model_wrong_shape": edit_tensors("model.safetensors",
                                             lambda t: {k: torch.zeros(3, 3) if i == 0 else v
                                                        for i, (k, v) in enumerate(t.items())}),
    }
    for name, change in cases.items():
        damaged_checkpoint(world, name, good, change)
    # runs whose every checkpoint is damaged, and one with none
    shutil.copytree(world / "run", world / "run_all_bad")
    for folder in (world / "run_all_bad" / "checkpoints").glob("step-*"):
        (folder / "state.json").write_text("[]")
    shutil.copytree(world / "run", world / "run_no_checkpoint")
    for folder in (world / "run_no_checkpoint" / "checkpoints").glob("step-*"):
        shutil.rmtree(folder)
    (world / "run_bad_pointer").mkdir()
    (world / "run_bad_pointer" / "checkpoints").mkdir()
    (world / "run_bad_pointer" / "checkpoints" / "latest").write_text("../../etc\n")

    # a preference store of 2-D points (task gaussian) with answers, and files that are not one
    with PreferenceStore(world / "store.db", create=True) as store:
        points = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)
        ids = store.add_items(points, task="gaussian", model="test")
        store.add_comparisons([{"left": ids[i], "right": ids[i + 1], "choice": ["left", "right", "tie"][i % 3],
                                "labeler": "ann"} for i in range(10)])
        store.add_labeler("ann")
    data = (world / "store.db").read_bytes()
    (world / "truncated.db").write_bytes(data[:len(data) // 3])
    (world / "garbage.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)
    (world / "notsqlite.db").write_text("just text, not a database\n")
    (world / "empty.db").write_bytes(b"")
    con = sqlite3.connect(world / "foreign.db")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    (world / "afile.txt").write_text("a file, where a folder or a store is expected\n")
    (world / "emptydir").mkdir()

    # comparisons, a reward model, an export of the store
    quiet_main("reward", "simulate", "--task", "gaussian", "--n", 60, "--items", 30, "--out", world / "cmp.safetensors")
    data = (world / "cmp.safetensors").read_bytes()
    (world / "cmp_truncated.safetensors").write_bytes(data[:len(data) // 2])
    (world / "cmp_garbage.safetensors").write_bytes(b"\x08" + bytes(300))
    save_file({"left": torch.zeros(3, 2)}, str(world / "cmp_no_choice.safetensors"))
    quiet_main("reward", "fit", "--comparisons", world / "cmp.safetensors", "--out", world / "rm", "--epochs", 1,
               "--ensemble", 2, "--set", "hidden=8", "--min-steps", 1)
    shutil.copytree(world / "rm", world / "rm_bad_json")
    (world / "rm_bad_json" / "reward.json").write_text("{")
    shutil.copytree(world / "rm", world / "rm_truncated")
    model = world / "rm_truncated" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    quiet_main("feedback", "export", "--store", world / "store.db", "--out", world / "export.jsonl")
    lines = (world / "export.jsonl").read_text().splitlines()
    jsonl = {
        "jsonl_not_json": "{not json\n",
        "jsonl_no_header": "\n".join(lines[1:]) + "\n",
        "jsonl_list": "[1, 2]\n",
        "jsonl_empty": "",
        "jsonl_deep": lines[0] + "\n" + "[" * 100_000 + "]" * 100_000 + "\n",
        "jsonl_bigint": lines[0] + "\n" + '{"type": "queue", "left": ' + "9" * 5000 + ', "right": 1}\n',
        "jsonl_bad_type": lines[0] + '\n{"type": "answer"}\n',
        "jsonl_bad_sha": lines[0] + "\n" + lines[1].replace('"sha256": "', '"sha256": "00') + "\n",
        "jsonl_dangling": lines[0] + '\n{"type": "queue", "left": 1, "right": 2}\n',
        "jsonl_bad_choice": lines[0] + "\n" + next(x for x in lines if '"comparison"' in x).replace(
            '"choice": "', '"choice": "both') + "\n",
    }
    for name, text in jsonl.items():
        (world / f"{name}.jsonl").write_text(text)
    (world / "jsonl_binary.jsonl").write_bytes(lines[0].encode() + b"\n\xff\xfe\xfd\n")

    # config files
    configs = {
        "bad.yaml": "task: [unclosed\n",
        "list.yaml": "- 1\n- 2\n",
        "scalar.yaml": "42\n",
        "nan.yaml": "algo:\n  lr: .nan\n",
        "inf_task.yaml": "task:\n  name: gaussian\n  beta_kl: .inf\n",
        "matrix_text.yaml": "task:\n  name: gaussian\n  reward_matrix: [['1e308', 0], [0, 1]]\n",
        "matrix_huge.yaml": "task:\n  name: gaussian\n  reward_matrix: [[1e400, 0], [0, 1]]\n",
        "deep.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "bigint.yaml": "seed: " + "9" * 5000 + "\n",
        "unknown.yaml": "learning_rate: 1\n",
        "section_list.yaml": "algo: [1, 2]\n",
    }
    for name, text in configs.items():
        (world / name).write_text(text)
    (world / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tmp_path_factory.mktemp("world")
    build_world(world)
    return world


def snapshot(*roots) -> dict:
    """path -> (size, mtime, sha256) of every file (and "dir" for every folder) under the roots."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_dir():
                out[str(path)] = "dir"
            else:
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


W = "{world}"   # the shared world folder
CWD = "{cwd}"   # this case's empty working folder
RUN_COPY = "{run_copy}"  # a fresh copy of the good run in the working folder (for resumes)
TRAIN = ["train", "--updates", "2", "--batch-size", "8", "--steps", "4", "--hidden", "16", "--eval-n", "64",
         "--eval-steps", "4", "-q", "--threads", "1", "--out", f"{CWD}/out"]
CK = f"{W}/run/checkpoints/step-000002"
S = f"{W}/store.db"

BAD_STORES = [("notsqlite.db", "not an SQLite database"), ("empty.db", "not an SQLite database"),
              ("garbage.db", "store"), ("truncated.db", "store"), ("foreign.db", "not a preference store"),
              ("missing.db", "does not exist"), ("emptydir", "is not a file"), ("afile.txt", "not an SQLite")]
DAMAGED = ["ck_state_list", "ck_state_null", "ck_state_number", "ck_state_not_json", "ck_state_empty",
           "ck_state_binary", "ck_state_deep", "ck_state_bigint", "ck_state_truncated", "ck_no_config",
           "ck_no_optimizer", "ck_no_step", "ck_no_trajectories", "ck_step_text", "ck_step_negative",
           "ck_config_list", "ck_config_unknown_key", "ck_config_nan_lr", "ck_config_bad_task",
           "ck_optimizer_empty", "ck_no_rng", "ck_rng_float", "ck_model_truncated", "ck_model_empty",
           "ck_model_garbage", "ck_model_header_only", "ck_train_truncated", "ck_missing_model",
           "ck_missing_train", "ck_missing_state", "ck_model_missing_tensor", "ck_model_wrong_shape"]
# what the error names for each damaged checkpoint
DAMAGE_NAMED = {"ck_no_config": "'config'", "ck_no_optimizer": "'optimizer'", "ck_no_step": "'step'",
                "ck_no_trajectories": "'trajectories'", "ck_state_list": "JSON list", "ck_no_rng": "'rng'",
                "ck_missing_model": "model.safetensors", "ck_model_truncated": "model.safetensors",
                "ck_config_unknown_key": "learning_rate", "ck_config_nan_lr": "lr must be finite",
                "ck_config_bad_task": "task must be one of"}
BAD_RUNS = [("run_all_bad", "no intact checkpoint"), ("run_no_checkpoint", "no checkpoint"),
            ("run_bad_pointer", "no checkpoint"), ("emptydir", "neither a checkpoint nor a run folder"),
            ("afile.txt", "is a file"), ("missing_run", "does not exist")]

CASES = [
    # --- train: non-finite, out-of-range and mistyped hyper-parameters --------------------------------
    *[(TRAIN + ["--set", item], fragment) for item, fragment in [
        ("algo.lr=.inf", "lr must be finite, found inf"), ("algo.lr=.nan", "lr must be finite, found nan"),
        ("algo.lr=-.inf", "lr must be finite"), ("algo.lr=1e400", "lr must be finite"),
        ("algo.lr=-1", "lr must be a number > 0"), ("algo.lr=abc", "lr must be a number"),
        ("algo.lr=true", "lr must be a number"), ("algo.lr=[1,2]", "lr must be a number"),
        ("algo.clip=.nan", "clip must be finite"), ("algo.epochs=0", "epochs"),
        ("task.beta_kl=.inf", "beta_kl must be finite, found inf"), ("task.beta_kl=.nan", "beta_kl must be finite"),
        ("task.beta_kl=-1", "beta_kl must be a number >= 0"), ("task.eta=.nan", "eta must be finite"),
        ("task.mean=[.nan,0]", "mean[0] must be finite, found nan"), ("task.mean=[0,.inf]", "mean[1] must be finite"),
        ("task.mean=.nan", "mean must be finite"), ("task.mean=abc", "mean must be a number"),
        ("task.mean=[1,2,3]", "mean must be a number or a list of 2 numbers"),
        ("task.cov=.nan", "cov must be finite"), ("task.cov=[[1,.nan],[.nan,1]]", "cov[0][1] must be finite"),
        ("task.target=-.inf", "target must be finite"),
        ("task.reward_matrix=[[1e400,0],[0,1]]", "reward_matrix[0][0] must be finite"),
        ("task.reward_matrix=[['1e308',0],[0,1]]", "reward_matrix[0][0] must be a number, found '1e308'"),
        ("task.reward_matrix=[[1,2],[0,1]]", "reward_matrix must be symmetric"),
        ("task.reward_matrix=[[1,0],[0,-1]]", "positive semi-definite"),
        ("task.path_options.beta_max=.nan", "beta_max must be finite"),
        ("task.dim=0", "dim must be a positive integer"), ("task.dim=2.5", "dim must be a positive integer"),
        ("task.dim=true", "dim must be a positive integer"), ("task.dimm=2", "unknown option 'dimm'"),
        ("task.name=nope", "task must be one of"), ("task=3", "task must be a mapping"),
        ("algo=3", "algo must be"), ("action_noise=.inf", "action_noise must be finite, found inf"),
        ("action_noise=.nan", "action_noise must be finite"), ("action_noise=-1", "action_noise must be a number >= 0"),
        ("seed=100000000000000000000000000000", "seed must fit in 64 bits"),
        ("seed=" + "9" * 5000, "cannot be read"), ("learning_rate=1", "unknown option 'learning_rate'"),
        ("noequals", "override must look like section.key=value"), ("a..b=1", "override must look like"),
        ("updates.x=1", "is a value, not a section"), ("task.path=nope", "path"),
        ("deep=" + "[" * 3000 + "]" * 3000, "nested too deeply"),
    ]],
    *[(TRAIN + flags, fragment) for flags, fragment in [
        (["--action-noise", "inf"], "action_noise must be finite, found inf"),
        (["--action-noise", "nan"], "action_noise must be finite, found nan"),
        (["--action-noise", "x"], "invalid float value"), (["--updates", "0"], "updates must be a positive integer"),
        (["--updates", "-1"], "updates must be a positive integer"), (["--updates", "1.5"], "invalid int value"),
        (["--updates", "1e3"], "invalid int value"), (["--batch-size", "0"], "batch_size must be a positive"),
        (["--steps", "0"], "steps must be a positive integer"), (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--hidden", "0"], "hidden must be a positive integer"), (["--dtype", "float16"], "dtype must be one of"),
        (["--grid", "nope"], "grid must be one of"), (["--lr-schedule", "cosine"], "lr_schedule must be one of"),
        (["--eval-every", "-1"], "eval_every must be an integer >= 0"), (["--eval-n", "0"], "eval_n must be"),
        (["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0"),
        (["--max-skipped", "0"], "max_skipped must be a positive integer"), (["--algorithm", "ppo"], "algorithm"),
        (["--task", "nope"], "nope"), (["--threads", "0"], "threads must be a positive integer"),
        (["--algorithm", "grpo", "--batch-size", "20"], "multiple of"),
        (["--no-such-flag"], "unrecognized arguments"),
    ]],
    *[(TRAIN + ["--config", f"{W}/{name}"], fragment) for name, fragment in [
        ("missing.yaml", "does not exist"), ("bad.yaml", "is not valid YAML"), ("list.yaml", "must hold a mapping"),
        ("scalar.yaml", "must hold a mapping"), ("binary.yaml", "config file"), ("nan.yaml", "lr must be finite"),
        ("inf_task.yaml", "beta_kl must be finite"), ("matrix_text.yaml", "must be a number, found '1e308'"),
        ("matrix_huge.yaml", "must be finite, found inf"), ("deep.yaml", "nested too deeply"),
        ("bigint.yaml", "cannot be read"), ("unknown.yaml", "unknown option 'learning_rate'"),
        ("section_list.yaml", "algo"), ("emptydir", "is not a file"),
    ]],
    # --- train --resume: missing, damaged and incompatible checkpoints ---------------------------------
    *[(["train", "--resume", f"{W}/{name}", "-q"], DAMAGE_NAMED.get(name, name)) for name in DAMAGED],
    *[(["train", "--resume", f"{W}/{name}", "-q"], fragment) for name, fragment in BAD_RUNS],
    *[(["train", "--resume", RUN_COPY, "-q"] + flags, fragment) for flags, fragment in [
        (["--algorithm", "ddpo"], "algorithm"), (["--set", "task.name=mixture"], "task"),
        (["--hidden", "32"], "hidden"), (["--set", "algo.lr=.inf"], "lr"), (["--set", "task.dim=3"], "dim"),
    ]],
    (["train", "--resume", RUN_COPY, "-q", "--updates", "1"], "updates"),
    (["train", "--resume", RUN_COPY, "-q", "--updates", "3", "--seed", "5"], "seed"),
    (TRAIN[:-1] + [f"{W}/afile.txt"], "afile.txt"),
    (TRAIN[:-1] + [f"{W}/afile.txt/run"], "afile.txt"),
    # --- sample, evaluate, reference -------------------------------------------------------------------
    *[(["sample", "--checkpoint", f"{W}/{name}", "--n", "10", "--steps", "2", "-q", "--out", f"{CWD}/s.npz"],
       DAMAGE_NAMED.get(name, name)) for name in DAMAGED[::3]],
    *[(["sample", "--checkpoint", f"{W}/{name}", "--n", "10", "-q", "--out", f"{CWD}/s.npz"], fragment)
      for name, fragment in BAD_RUNS],
    *[(["sample", "--task", "gaussian", "-q", "--out", f"{CWD}/s.npz"] + flags, fragment) for flags, fragment in [
        (["--n", "0"], "n must be a positive integer"), (["--steps", "0"], "steps must be a positive integer"),
        (["--solver", "nope"], "solver"), (["--grid", "nope"], "grid"), (["--eta", "nan"], "eta must be finite"),
        (["--eta", "inf"], "eta must be finite"), (["--eta", "-1"], "eta"), (["--dtype", "float16"], "dtype"),
        (["--policy", "nope"], "policy"), (["--policy", "optimal", "--set", "task.beta_kl=0"], "beta_kl > 0"),
        (["--set", "task.mean=[.nan,0]"], "mean[0] must be finite"), (["--set", "n=.inf"], "n must be"),
        (["--set", "steps=1e400"], "steps must be"),
        (["--set", "task.beta_kl=.inf"], "beta_kl must be finite"), (["--config", f"{W}/bad.yaml"], "YAML"),
    ]],
    (["sample", "--task", "gaussian", "-q", "--n", "10", "--out", f"{W}/emptydir"], "emptydir"),
    (["evaluate"], "expected --checkpoint (a checkpoint folder or a run folder) or --pretrained"),
    *[(["evaluate", "--checkpoint", f"{W}/{name}", "--n", "16", "--steps", "2"], DAMAGE_NAMED.get(name, name))
      for name in DAMAGED[1::3]],
    *[(["evaluate", "--checkpoint", f"{W}/{name}"], fragment) for name, fragment in BAD_RUNS[:4]],
    *[(["evaluate", "--checkpoint", CK] + flags, fragment) for flags, fragment in [
        (["--n", "0"], "n must be"), (["--steps", "0"], "steps must be"), (["--solver", "nope"], "solver"),
        (["--eta", "nan"], "eta must be finite"), (["--set", "n=.inf"], "n must be"),
    ]],
    *[(["reference", "--task", "gaussian"] + flags, fragment) for flags, fragment in [
        (["--set", "task.beta_kl=0"], "needs beta_kl > 0"), (["--set", "task.beta_kl=.inf"], "beta_kl must be finite"),
        (["--set", "task.mean=[.nan,0]"], "mean[0] must be finite"), (["--set", "task.cov=[[1,0],[0,-1]]"], "cov"),
        (["--set", "task.dim=-2"], "dim must be a positive integer"), (["--config", f"{W}/list.yaml"], "mapping"),
    ]],
    (["reference", "--task", "nope"], "nope"),
    # --- pretrain, bench, quickstart: refused before any work ------------------------------------------
    *[(["pretrain"] + flags, fragment) for flags, fragment in [
        (["--steps", "0"], "steps must be a positive integer"), (["--task", "gaussian"], "digits"),
        (["--seed", "-1"], "seed"), (["--classifier-epochs", "-1"], "classifier_epochs"),
        (["--set", "steps=.inf"], "steps must be finite"), (["--set", "nope=1"], "unknown option 'nope'"),
        (["--config", f"{W}/binary.yaml"], "config file"),
    ]],
    *[(["bench"] + flags, fragment) for flags, fragment in [
        (["--task", "nope"], "--task must be one of"), (["--only", "nope"], "nope"), (["--workers", "0"], "workers"),
        (["--seed", "-1"], "seed"), (["--set", "nope=1"], "unknown option 'nope'"),
    ]],
    (["bench", "--quick", "--out", f"{W}/afile.txt"], "afile.txt"),
    *[(["quickstart", "--out", f"{CWD}/qs"] + flags, fragment) for flags, fragment in [
        (["--updates", "0"], "updates must be a positive integer"), (["--pairs", "0"], "pairs"),
        (["--items", "1"], "items"), (["--temperature", "inf"], "temperature must be finite"),
        (["--temperature", "-1"], "temperature"), (["--beta-kl", "nan"], "beta_kl must be finite"),
        (["--beta-kl", "-1"], "beta_kl"), (["--port", "99999"], "port"), (["--grid", "nope"], "grid"),
        (["--steps", "0"], "steps"), (["--per-class", "0"], "per_class"), (["--batch-size", "0"], "batch_size"),
        (["--set", "updates=.inf"], "updates"), (["--set", "nope=1"], "unknown option 'nope'"),
    ]],
    # --- feedback --------------------------------------------------------------------------------------
    *[(["feedback", "stats", "--store", f"{W}/{name}"], fragment) for name, fragment in BAD_STORES],
    *[(["feedback", "add-labeler", "--store", f"{W}/{name}", "bob"], fragment) for name, fragment in BAD_STORES[:5]],
    *[(["feedback", "export", "--store", f"{W}/{name}", "--out", f"{CWD}/e.jsonl"], fragment)
      for name, fragment in BAD_STORES[:5]],
    *[(["feedback", "backup", "--store", f"{W}/{name}", "--out", f"{CWD}/b.db"], fragment)
      for name, fragment in BAD_STORES],
    *[(["feedback", "enqueue", "--store", f"{W}/{name}", "--pairs", "2"], fragment)
      for name, fragment in BAD_STORES[:4]],
    (["feedback", "init", "--store", S], "already exists"),
    (["feedback", "init", "--store", f"{W}/afile.txt/x.db"], "afile.txt"),
    (["feedback", "init", "--store", f"{W}/missing_dir/x.db"], "does not exist"),
    (["feedback", "init"], "--store is required"),
    (["feedback", "add-labeler", "--store", S], "NAME is required"),
    (["feedback", "add-labeler", "--store", S, "bad name!"], "labeler name must be"),
    (["feedback", "add-labeler", "--store", S, "ann"], "already exists"),
    (["feedback", "add-labeler", "--store", f"{W}/missing.db", "bob"], "does not exist"),
    *[(["feedback", "add-items", "--store", S] + flags, fragment) for flags, fragment in [
        (["--n", "4"], "give either --checkpoint DIR or --task NAME --pretrained"),
        (["--task", "gaussian", "--n", "4"], "add --pretrained"),
        (["--task", "gaussian", "--pretrained", "--checkpoint", CK, "--n", "4"], "either"),
        (["--task", "gaussian", "--pretrained"], "--n is required"),
        (["--task", "gaussian", "--pretrained", "--n", "0"], "n must be a positive integer"),
        (["--task", "gaussian", "--pretrained", "--n", "4", "--steps", "0"], "steps must be"),
        (["--task", "gaussian", "--pretrained", "--n", "4", "--seed", "-1"], "seed"),
        (["--task", "gaussian", "--pretrained", "--n", "4", "--solver", "nope"], "solver"),
        (["--task", "nope", "--pretrained", "--n", "4"], "nope"),
        (["--task", "gaussian", "--pretrained", "--n", "4", "--set", "n=.inf"], "n must be"),
        *[(["--checkpoint", f"{W}/{name}", "--n", "4"], DAMAGE_NAMED.get(name, name)) for name in DAMAGED[2::3]],
        *[(["--checkpoint", f"{W}/{name}", "--n", "4"], fragment) for name, fragment in BAD_RUNS[:4]],
    ]],
    *[(["feedback", "enqueue", "--store", S] + flags, fragment) for flags, fragment in [
        ([], "--pairs is required"), (["--pairs", "0"], "pairs must be a positive integer"),
        (["--pairs", "2", "--strategy", "nope"], "strategy must be one of"),
        (["--pairs", "2", "--strategy", "disagreement"], "needs --reward-model"),
        (["--pairs", "2", "--reward-model", f"{W}/rm"], "only with --strategy disagreement"),
        (["--pairs", "2", "--task", "nope"], "no items of task 'nope'"),
        (["--pairs", "100000"], "distinct pairs"),
        (["--pairs", "2", "--strategy", "disagreement", "--reward-model", f"{W}/emptydir"], "emptydir"),
        (["--pairs", "2", "--strategy", "disagreement", "--reward-model", f"{W}/rm_bad_json"], "rm_bad_json"),
        (["--pairs", "2", "--seed", "-1"], "seed"),
    ]],
    *[(["feedback", "simulate", "--store", S, "--pairs", "2"] + flags, fragment) for flags, fragment in [
        ([], "--labeler is required"), (["--labeler", "bad name!"], "labeler name must be"),
        (["--labeler", "sim", "--temperature", "inf"], "temperature must be finite"),
        (["--labeler", "sim", "--temperature", "nan"], "temperature must be finite"),
        (["--labeler", "sim", "--temperature", "-1"], "temperature must be a number >= 0"),
        (["--labeler", "sim", "--error-rate", "2"], "error_rate must be in [0, 1]"),
        (["--labeler", "sim", "--error-rate", "nan"], "error_rate must be finite"),
        (["--labeler", "sim", "--tie-margin", "inf"], "tie_margin must be finite"),
        (["--labeler", "sim", "--tie-margin", "-1"], "tie_margin"),
        (["--labeler", "sim", "--utility", "nope"], "nope"),
        (["--labeler", "sim", "--set", "error_rate=.nan"], "error_rate must be finite"),
    ]],
    *[(["feedback", "serve", "--store", S] + flags, fragment) for flags, fragment in [
        (["--port", "99999"], "port must be at most 65535, found 99999"), (["--port", "-1"], "port must be"),
        (["--port", "1e3"], "invalid int value"), (["--set", "port=.inf"], "port must be"),
        (["--host", "no.such.host.invalid"], "cannot listen"), (["--question", ""], "question"),
        (["--min-response-ms", "-1"], "min_response_ms must be in [0, 60000], found -1"),
        (["--min-response-ms", "nan"], "min_response_ms must be finite"),
        (["--header-timeout", "0"], "header_timeout must be in [0.01, 86400], found 0"),
        (["--body-timeout", "1e15"], "body_timeout must be in [0.01, 86400]"),
        (["--max-connections", "0"], "max_connections must be a positive integer, found 0"),
        (["--max-connections", "1000000"], "max_connections must be at most 100000, found 1000000"),
    ]],
    (["feedback", "serve", "--store", f"{W}/notsqlite.db", "--port", "0"], "not an SQLite database"),
    (["feedback", "export", "--store", S], "--out is required"),
    (["feedback", "export", "--store", S, "--out", f"{W}/emptydir"], "is a folder"),
    (["feedback", "export", "--store", S, "--out", f"{W}/afile.txt/e.jsonl"], "afile.txt"),
    *[(["feedback", "import", "--store", S, "--in", f"{W}/{name}"], fragment) for name, fragment in [
        ("missing.jsonl", "does not exist"), ("emptydir", "is not a file"), ("jsonl_not_json.jsonl", "line 1"),
        ("jsonl_no_header.jsonl", "expected the header"), ("jsonl_list.jsonl", "expected a JSON object"),
        ("jsonl_empty.jsonl", "is empty"), ("jsonl_deep.jsonl", "line 2"), ("jsonl_bigint.jsonl", "line 2"),
        ("jsonl_bad_type.jsonl", "type must be"), ("jsonl_bad_sha.jsonl", "sha256"),
        ("jsonl_dangling.jsonl", "refers to item"), ("jsonl_bad_choice.jsonl", "choice must be one of"),
        ("jsonl_binary.jsonl", "not UTF-8"), ("store.db", "line 1"),
    ]],
    (["feedback", "import", "--store", S], "--in is required"),
    (["feedback", "import", "--store", f"{CWD}/new.db", "--in", f"{W}/export.jsonl"], "does not exist"),
    (["feedback", "backup", "--store", S], "--out is required"),
    (["feedback", "backup", "--store", S, "--out", S], "is an input"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/afile.txt"], "already exists"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/emptydir"], "is a folder"),
    (["feedback", "backup", "--store", S, "--out", f"{W}/afile.txt/b.db"], "afile.txt"),
    (["feedback", "nope"], "invalid choice"),
    # --- reward ----------------------------------------------------------------------------------------
    *[(["reward", "fit", "--out", f"{CWD}/rm"] + flags, fragment) for flags, fragment in [
        ([], "--store DB or --comparisons FILE is required"),
        (["--store", S, "--comparisons", f"{W}/cmp.safetensors"], "not both"),
        (["--comparisons", f"{W}/missing.safetensors"], "does not exist"),
        (["--comparisons", f"{W}/cmp_truncated.safetensors"], "cmp_truncated"),
        (["--comparisons", f"{W}/cmp_garbage.safetensors"], "cmp_garbage"),
        (["--comparisons", f"{W}/cmp_no_choice.safetensors"], "lacks tensor 'right'"),
        (["--comparisons", f"{W}/afile.txt"], "afile.txt"), (["--comparisons", f"{W}/emptydir"], "emptydir"),
        (["--store", f"{W}/notsqlite.db"], "not an SQLite database"),
        (["--store", f"{W}/foreign.db"], "not a preference store"),
        (["--store", S, "--task", "nope"], "holds no answered comparisons"),
        (["--store", S, "--labeler", "nobody"], "holds no answered comparisons"),
        *[(["--comparisons", f"{W}/cmp.safetensors"] + more, fragment) for more, fragment in [
            (["--ensemble", "0"], "ensemble"), (["--epochs", "0"], "epochs"), (["--lr", "inf"], "lr must be finite"),
            (["--lr", "nan"], "lr must be finite"), (["--lr", "-1"], "lr"), (["--val-fraction", "1.5"], "val_fraction"),
            (["--val-fraction", "nan"], "val_fraction must be finite"), (["--arch", "nope"], "arch must be one of"),
            (["--set", "weight_decay=.nan"], "weight_decay must be finite"), (["--set", "batch_size=0"], "batch_size"),
            (["--set", "hidden=0"], "hidden"), (["--min-steps", "-1"], "min_steps"), (["--seed", "-1"], "seed"),
            (["--set", "bootstrap=2"], "bootstrap"), (["--set", "nope=1"], "unknown option 'nope'"),
        ]],
    ]],
    (["reward", "fit", "--comparisons", f"{W}/cmp.safetensors"], "--out is required"),
    (["reward", "fit", "--comparisons", f"{W}/cmp.safetensors", "--out", f"{W}/afile.txt"], "is a file"),
    (["reward", "fit", "--comparisons", f"{W}/cmp.safetensors", "--out", f"{W}/afile.txt/rm"], "afile.txt"),
    *[(["reward", "evaluate", "--comparisons", f"{W}/cmp.safetensors"] + flags, fragment) for flags, fragment in [
        ([], "--model is required"), (["--model", f"{W}/missing_rm"], "missing_rm"),
        (["--model", f"{W}/emptydir"], "emptydir"), (["--model", f"{W}/afile.txt"], "afile.txt"),
        (["--model", f"{W}/rm_bad_json"], "rm_bad_json"), (["--model", f"{W}/rm_truncated"], "rm_truncated"),
        (["--model", f"{W}/rm", "--bins", "0"], "bins must be a positive integer"),
        (["--model", f"{W}/run"], "run"),
    ]],
    (["reward", "evaluate", "--model", f"{W}/rm", "--comparisons", f"{W}/cmp_truncated.safetensors"], "cmp_truncated"),
    (["reward", "evaluate", "--model", f"{W}/rm", "--store", f"{W}/empty.db"], "not an SQLite database"),
    *[(["reward", "simulate", "--out", f"{CWD}/c.safetensors"] + flags, fragment) for flags, fragment in [
        ([], "--task is required"), (["--task", "nope"], "task must be one of"),
        (["--task", "gaussian", "--n", "0"], "n must be"), (["--task", "gaussian", "--items", "1"], "items"),
        (["--task", "gaussian", "--temperature", "inf"], "temperature must be finite"),
        (["--task", "gaussian", "--error-rate", "1.5"], "error_rate"),
        (["--task", "gaussian", "--tie-margin", "nan"], "tie_margin must be finite"),
        (["--task", "gaussian", "--utility", "nope"], "nope"), (["--task", "gaussian", "--seed", "-1"], "seed"),
    ]],
    (["reward", "simulate", "--task", "gaussian"], "--out is required"),
    (["reward", "simulate", "--task", "gaussian", "--out", f"{W}/emptydir"], "is a folder"),
    (["reward", "simulate", "--task", "gaussian", "--out", f"{W}/afile.txt/c.safetensors"], "afile.txt"),
    *[(["reward", "bench"] + flags, fragment) for flags, fragment in [
        (["--workers", "0"], "workers"), (["--seeds", "0"], "seeds"), (["--out", f"{W}/afile.txt"], "is a file"),
        (["--set", "quick=2"], "quick must be true or false"),
    ]],
    (["nope"], "invalid choice"),
]


def case_id(case) -> str:
    argv = case[0]
    if argv[:len(TRAIN) - 2] == TRAIN[:-2]:  # the common training flags left out
        rest = argv[len(TRAIN) - 2:]
        argv = ["train", *(rest[2:] if rest[:2] == TRAIN[-2:] else rest)]
    text = " ".join(argv).replace(W + "/", "").replace(CWD + "/", "")
    text = re.sub(r"(\[{3,}|\]{3,}|9{20,})", lambda m: m.group(0)[0] + "...", text)
    return text[:90]


def test_the_table_is_large():
    assert len(CASES) >= 150


@pytest.mark.parametrize("argv, fragment", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, monkeypatch, capsys, argv, fragment):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if any(RUN_COPY in a for a in argv):
        shutil.copytree(world / "run", cwd / "run")
    argv = [a.replace(RUN_COPY, str(cwd / "run")).replace(W, str(world)).replace(CWD, str(cwd)) for a in argv]
    monkeypatch.chdir(cwd)
    before = snapshot(world, cwd)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out[-500:], err[-2000:])
    assert err.count("\n") == 1 and ERROR_LINE.match(err), err[-2000:]
    assert "Traceback" not in err
    assert fragment.replace(W, str(world)) in err, err
    assert snapshot(world, cwd) == before, "a file was created or changed"
