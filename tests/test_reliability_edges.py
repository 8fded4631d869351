"""Fault tables at the edges: what the machine cannot hold, paths the file system refuses, a full disk,
damaged pipeline folders, import files and checkpoint JSON. Each case gives exit code 2 and one line on
stderr naming what was expected and what was found, no traceback, and leaves every file as it was (hashed
before and after) with no temporary or half-written file behind.

The world (a tiny training run and a ddpo run, a preference store and its export, a saved tiny-sd pipeline)
is built once; each case damages a copy, or runs in an empty working folder.
"""

import builtins
import errno
import io
import json
import logging
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from test_reliability_cli import ERROR_LINE, quiet_main, snapshot

from scoreaction.cli import preflight
from scoreaction.feedback.database import Database, StoreError
from scoreaction.models import pipeline, pipeline_load

LONG = "n" * 300  # a name longer than any file system allows (255 bytes)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tmp_path_factory.mktemp("edges")
    small = ["--updates", 2, "--batch-size", 8, "--steps", 4, "--hidden", 16, "--eval-n", 16, "--eval-steps", 2,
             "-q", "--threads", 1, "--no-tensorboard"]
    quiet_main("train", *small, "--out", world / "run")
    quiet_main("train", *small, "--algorithm", "ddpo", "--out", world / "ddpo")
    quiet_main("feedback", "init", "--store", world / "store.db")
    quiet_main("feedback", "add-items", "--store", world / "store.db", "--task", "gaussian", "--pretrained", "--n", 4,
               "--steps", 2)
    quiet_main("feedback", "export", "--store", world / "store.db", "--out", world / "export.jsonl")
    quiet_main("reward", "simulate", "--task", "gaussian", "--n", 40, "--items", 20, "--out", world / "cmp.safetensors")
    quiet_main("reward", "fit", "--comparisons", world / "cmp.safetensors", "--out", world / "rm", "--epochs", 1,
               "--ensemble", 1, "--set", "hidden=8", "--min-steps", 1)
    (world / "afile.txt").write_text("a file where a folder is expected\n")
    pipeline.build_tiny("tiny-sd").save_pretrained(world / "sd")
    return world


def check_one_line(code, out, err, fragment):
    assert code == 2, (code, out[-500:], err[-2000:])
    assert err.count("\n") == 1 and ERROR_LINE.match(err), err[-2000:]
    assert "Traceback" not in err
    assert fragment in err, err


def leftovers(root: Path) -> list[str]:
    """Temporaries (.NAME.tmp-PID) and half-written files under root."""
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".creating-" in p.name]


def run_case(world, tmp_path, monkeypatch, capsys, argv, fragment):
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    argv = [str(a).replace("{W}", str(world)) for a in argv]
    before = snapshot(world)
    code, out, err = run_cli(capsys, *argv)
    check_one_line(code, out, err, fragment)
    assert snapshot(world) == before, "a file of the world was created or changed"
    assert not leftovers(cwd), leftovers(cwd)
    return cwd


# --- sizes the machine cannot hold, x commands -----------------------------------------------------
HUGE = str(10**12)
TRAIN = ["train", "--updates", "1", "--batch-size", "8", "--steps", "4", "--hidden", "16", "-q", "--threads", "1",
         "--no-tensorboard", "--out", "out"]
SIZES = [
    (["sample", "--task", "gaussian", "-q", "--n", HUGE, "--out", "s.npz"], "n must be at most"),
    (["sample", "--task", "gaussian", "-q", "--n", str(2**40), "--steps", "2", "--out", "s.npz"], "n must be at most"),
    (["sample", "--task", "digits", "-q", "--n", str(10**10), "--steps", "2", "--out", "s.npz"], "n must be at most"),
    (["evaluate", "--checkpoint", "{W}/run", "--n", HUGE], "n must be at most"),
    (["evaluate", "--checkpoint", "{W}/run", "--n", str(10**10), "--steps", "2"], "n must be at most"),
    (["feedback", "add-items", "--store", "{W}/store.db", "--task", "gaussian", "--pretrained", "--n", HUGE],
     "n must be at most"),
    (["feedback", "add-items", "--store", "{W}/store.db", "--checkpoint", "{W}/run", "--n", str(10**10)],
     "n must be at most"),
    (TRAIN[:3] + ["--batch-size", HUGE] + TRAIN[5:], "batch_size must be at most"),
    (TRAIN[:5] + ["--steps", HUGE] + TRAIN[7:], "steps must be at most"),
    (TRAIN + ["--hidden", HUGE], "hidden must be at most"),
    (TRAIN + ["--hidden", str(10**6)], "hidden must be at most"),
    (TRAIN + ["--eval-n", HUGE], "eval_n must be at most"),
    (TRAIN + ["--set", f"rollout_batch={HUGE}"], "rollout_batch must be at most"),
    (TRAIN + ["--set", "task.dim=100000000"], "must be at most"),
    (TRAIN + ["--timeout", "1e15"], "timeout must be at most"),
    (TRAIN + ["--threads", str(2**40)], "--threads must be a positive integer of at most"),
    (["sample", "--task", "gaussian", "-q", "--n", "4", "--threads", str(2**40), "--out", "s.npz"], "--threads"),
    (TRAIN + ["--task", "diffusers", "--set", "task.lora_rank=10000000"], "lora_rank must be at most"),
    (TRAIN + ["--task", "diffusers", "--set", f"task.lora_rank={HUGE}"], "lora_rank must be at most"),
    (TRAIN + ["--eval-steps", HUGE], "eval_steps must be at most"),
    (TRAIN + ["--set", "algo.value_hidden=1000000000"], "value_hidden must be at most"),
    (["sample", "--task", "gaussian", "-q", "--n", "4", "--steps", HUGE, "--out", "s.npz"], "steps must be at most"),
    (["evaluate", "--checkpoint", "{W}/run", "--n", "4", "--steps", HUGE], "steps must be at most"),
    (["feedback", "add-items", "--store", "{W}/store.db", "--task", "gaussian", "--pretrained", "--n", "2", "--steps",
      HUGE], "steps must be at most"),
    (["reward", "simulate", "--task", "gaussian", "--n", "10", "--items", HUGE, "--out", "c.safetensors"],
     "items must be at most"),
    *[(["reward", "fit", "--comparisons", "{W}/cmp.safetensors", "--out", "rm", "--epochs", "1", *more], fragment)
      for more, fragment in [(["--set", "hidden=1000000000"], "hidden must be at most"),
                             (["--ensemble", HUGE], "ensemble must be at most"),
                             (["--set", "layers=100000000"], "layers must be at most")]],
    (["reward", "evaluate", "--comparisons", "{W}/cmp.safetensors", "--model", "{W}/rm", "--bins", HUGE],
     "bins must be at most 10000"),
    (["quickstart", "--out", "qs", "--items", HUGE, "-q"], "items must be at most"),
]


@pytest.mark.parametrize("argv, fragment", SIZES, ids=[" ".join(a[:1] + a[-3:])[:60] for a, _ in SIZES])
def test_sizes_beyond_the_machine_are_refused_before_allocating(world, tmp_path, monkeypatch, capsys, argv, fragment):
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, fragment)
    assert not any(cwd.iterdir()), "an output was created"


def test_more_minibatches_than_items_are_one_item_each():
    import torch

    from scoreaction.algorithms.base import minibatch_indices

    parts = minibatch_indices(5, 10**12, torch.Generator().manual_seed(0))  # not 10^12 tensors
    assert sorted(int(i) for part in parts for i in part) == list(range(5)) and all(len(p) == 1 for p in parts)


# --- prompt files ---------------------------------------------------------------------------------
PROMPT_FILES = [  # (name, the file's bytes, what the message says after "prompt file 'P'")
    ("a 10 MB line", b"a cat " * (10 * 2**20 // 6) + b"\n", "line 1: a prompt must have at most 10000 characters"),
    ("NUL bytes", b"a cat\n\x00 dog\n", "line 2: a prompt must be text without control characters, found '\\x00'"),
    ("an escape sequence", b"a \x1b[31mred\x1b[0m cat\n",
     "line 1: a prompt must be text without control characters, found '\\x1b'"),
    ("UTF-16", "a cat\n".encode("utf-16"), "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, data, fragment", PROMPT_FILES, ids=[c[0] for c in PROMPT_FILES])
def test_bad_prompt_files_are_one_line_naming_file_and_line(world, tmp_path, monkeypatch, capsys, name, data,
                                                            fragment):
    (tmp_path / "p.txt").write_bytes(data)
    argv = ["sample", "--task", "diffusers", "--set", f"task.prompts={tmp_path / 'p.txt'}", "--n", "2", "--steps",
            "2", "-q", "--out", "s.npz", "--threads", "1"]
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, f"prompt file {str(tmp_path / 'p.txt')!r} {fragment}")
    assert not any(cwd.iterdir())


def test_a_prompt_file_with_a_byte_order_mark_and_a_long_prompt_prints_nothing_with_quiet(world, tmp_path,
                                                                                       monkeypatch, capsys):
    from scoreaction.tasks.diffusers import read_prompts

    (tmp_path / "p.txt").write_bytes("\ufeffa cat\n".encode() + b"a dog " * 80 + b"\n")  # over 77 tokens
    assert read_prompts(str(tmp_path / "p.txt"))[0] == "a cat"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sample", "--task", "diffusers", "--set", f"task.model={world / 'sd'}",
                             "--set", "task.prompts=p.txt", "--n", "2", "--steps", "2", "-q", "--out", "s.npz",
                             "--threads", "1")
    assert code == 0 and err == "", err  # the text encoder's truncation warning is held back


# --- path faults, x commands ----------------------------------------------------------------------
OUTPUTS = {  # command -> argv with {out} for its output path
    "train": TRAIN[:-1] + ["{out}"],
    "sample": ["sample", "--task", "gaussian", "-q", "--n", "4", "--steps", "2", "--out", "{out}.npz"],
    "feedback export": ["feedback", "export", "--store", "{W}/store.db", "--out", "{out}.jsonl"],
    "feedback backup": ["feedback", "backup", "--store", "{W}/store.db", "--out", "{out}.db"],
    "feedback init": ["feedback", "init", "--store", "{out}.db"],
    "reward fit": ["reward", "fit", "--comparisons", "{W}/cmp.safetensors", "--out", "{out}", "--epochs", "1",
                   "--ensemble", "1", "--set", "hidden=8"],
    "reward simulate": ["reward", "simulate", "--task", "gaussian", "--n", "10", "--out", "{out}.safetensors"],
    "export": ["export", "--checkpoint", "{W}/run", "--out", "{out}"],
}
PATH_FAULTS = {  # fault -> (output path, fragment)
    "long name": (LONG, "this file system allows at most"),
    "long folder": (f"{LONG}/x", "this file system allows at most"),
    "under a file": ("{W}/afile.txt/x", "afile.txt"),
    "deep under a file": ("{W}/afile.txt/a/b/x", "afile.txt"),
}


@pytest.mark.parametrize("fault", list(PATH_FAULTS))
@pytest.mark.parametrize("command", list(OUTPUTS))
def test_output_paths_the_file_system_refuses(world, tmp_path, monkeypatch, capsys, command, fault):
    path, fragment = PATH_FAULTS[fault]
    argv = [a.replace("{out}", path) for a in OUTPUTS[command]]
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, fragment)
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("fault, fragment", [("read-only", "is not writable"), ("no space", "bytes free")])
@pytest.mark.parametrize("command", list(OUTPUTS))
def test_read_only_or_full_folder_is_refused_before_anything_is_created(world, tmp_path, monkeypatch, capsys,
                                                                       command, fault, fragment):
    # as root, a read-only mode does not stop writes: the checks' own view of the folder is what is faked
    if fault == "read-only":
        real = preflight.os.access
        monkeypatch.setattr(preflight.os, "access", lambda p, mode, real=real: "cwd" not in str(Path(p).absolute()) and real(p, mode))
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    argv = [a.replace("{out}", "out") for a in OUTPUTS[command]]
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, fragment)
    assert not any(cwd.iterdir())


class FullFile(io.RawIOBase):
    """A file opened for writing on a full disk: opening works, every write fails with ENOSPC."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()

    def writable(self):
        return True


def fill_disk(monkeypatch, root: Path) -> None:
    """Make every write under `root` fail as on a full disk: Python's open() and safetensors' writer."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, Path)) and str(Path(file).resolve()).startswith(str(root)) and set(mode) & set("wax+"):
            return FullFile(handle) if "b" in mode else io.TextIOWrapper(io.BufferedWriter(FullFile(handle)))
        return handle

    def full_serialize(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(safetensors.torch, "serialize_file", full_serialize)


@pytest.mark.parametrize("command", ["train", "sample", "feedback export", "reward fit", "reward simulate", "export"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(world, tmp_path, monkeypatch, capsys, command):
    if command == "export":  # a diffusers run to export
        run = tmp_path / "drun"
        quiet_main(*TRAIN[:-1], str(run), "--task", "diffusers", "--batch-size", "2", "--steps", "2", "--eval-n", "2",
                   "--eval-steps", "2")
        argv = ["export", "--checkpoint", str(run), "--out", "{out}"]
    else:
        argv = OUTPUTS[command]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    fill_disk(monkeypatch, cwd.resolve())
    argv = [a.replace("{out}", "out") for a in argv]
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, "No space left on device")
    written = [p for p in cwd.rglob("*") if p.is_file() and p.name != ".lock"]
    assert all(p.stat().st_size == 0 or p.suffix in (".json", ".jsonl") for p in written), written
    assert not [p for p in written if p.name.startswith("out") and p.is_file()], "a half-written output is left"


def test_a_full_disk_is_not_called_a_corrupt_store(world, tmp_path):
    shutil.copy(world / "store.db", tmp_path / "s.db")
    db = Database(tmp_path / "s.db")
    try:
        for error, fragment in [(sqlite3.OperationalError("database or disk is full"), "the disk is full"),
                                (sqlite3.DatabaseError("database disk image is malformed"), "unreadable or corrupt")]:
            with pytest.raises(StoreError, match=fragment):
                with db.transaction(write=True):
                    raise error
    finally:
        db.close()


# --- errors at the command line's boundary ----------------------------------------------------------
@pytest.mark.parametrize("error, fragment", [
    (MemoryError(), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 16000000000000 bytes"), "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device"), "--out 'x.npz': No space left on device (ENOSPC)"),
    (OSError(errno.EROFS, "Read-only file system", "x.npz"), "--out 'x.npz': Read-only file system (EROFS)"),
    (OSError(errno.EACCES, "Permission denied", "x.npz"), "Permission denied (EACCES)"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "x.npz"), "(ENAMETOOLONG)"),
    (OSError(errno.ENOTDIR, "Not a directory", "x.npz/y"), "--out 'x.npz/y': Not a directory"),
    (sqlite3.OperationalError("disk I/O error"), "sqlite3: disk I/O error"),
    (OverflowError("Python int too large to convert to C long"), "a number is too large"),
    (RuntimeError("std::bad_alloc"), "out of memory"),
])
def test_machine_errors_become_one_line_naming_the_option(tmp_path, monkeypatch, capsys, error, fragment):
    from scoreaction.cli import sample

    def fail(args):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "cmd_sample", fail)
    code, out, err = run_cli(capsys, "sample", "--task", "gaussian", "--out", "x.npz", "--n", "2")
    check_one_line(code, out, err, fragment)


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch, capsys):
    from scoreaction.cli import sample

    def fail(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "cmd_sample", fail)
    with pytest.raises(RuntimeError, match="internal invariant"):
        run_cli(capsys, "sample", "--task", "gaussian", "--out", "x.npz", "--n", "2")


# --- damaged pipeline folders ---------------------------------------------------------------------------
def edit_json(name, fn):
    def change(folder):
        path = folder / name
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return change


def drop_tensor(name):
    def change(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / name))
        tensors.pop(sorted(tensors)[3])
        save_file(tensors, str(folder / name))
    return change


UNET_W = "unet/diffusion_pytorch_model.safetensors"
PIPELINE_DAMAGE = {
    "no unet": (lambda f: shutil.rmtree(f / "unet"), "component 'unet'"),
    "no unet weights": (lambda f: (f / UNET_W).unlink(), "no safetensors weights"),
    "random weights": (lambda f: (f / UNET_W).write_bytes(bytes(range(256)) * 300), "is not a safetensors file"),
    "truncated weights": (lambda f: (f / UNET_W).write_bytes((f / UNET_W).read_bytes()[:5000]), UNET_W),
    "a tensor missing": (drop_tensor(UNET_W), "missing keys"),
    "text encoder tensor missing": (drop_tensor("text_encoder/model.safetensors"), "component 'text_encoder'"),
    "config not JSON": (lambda f: (f / "unet/config.json").write_text("{not json"), "config.json is not valid JSON"),
    "config a list": (lambda f: (f / "unet/config.json").write_text("[1]"), "must hold a JSON object"),
    "config mismatch": (edit_json("unet/config.json", lambda c: {**c, "cross_attention_dim": 48}), "do not fit"),
    "unknown class": (edit_json("model_index.json", lambda c: {**c, "unet": ["diffusers", "NoSuchModel"]}),
                      "'NoSuchModel'"),
    "foreign library": (edit_json("model_index.json", lambda c: {**c, "unet": ["os", "path"]}), "library 'os'"),
    "unknown pipeline": (edit_json("model_index.json", lambda c: {**c, "_class_name": "Nope"}), "_class_name"),
    "index not JSON": (lambda f: (f / "model_index.json").write_text("{"), "model_index.json is not valid JSON"),
    "one timestep": (edit_json("scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": 1}),
                     "num_train_timesteps must be"),
    "unknown beta schedule": (edit_json("scheduler/scheduler_config.json", lambda c: {**c, "beta_schedule": "nosuch"}),
                              "nosuch"),
    "beta_end 2": (edit_json("scheduler/scheduler_config.json", lambda c: {**c, "beta_end": 2}), "beta_end"),
    "negative sample size": (edit_json("unet/config.json", lambda c: {**c, "sample_size": -8}), "sample_size"),
    "vae scale 0": (edit_json("vae/config.json", lambda c: {**c, "scaling_factor": 0}), "scaling_factor"),
    "no scheduler config": (lambda f: (f / "scheduler/scheduler_config.json").unlink(), "scheduler_config.json"),
    "tokenizer not JSON": (lambda f: (f / "tokenizer/tokenizer.json").write_text("{"), "component 'tokenizer'"),
}


@pytest.mark.parametrize("damage", list(PIPELINE_DAMAGE))
def test_damaged_pipeline_folders_are_one_line_naming_the_component(world, tmp_path, monkeypatch, capsys, damage):
    change, fragment = PIPELINE_DAMAGE[damage]
    folder = tmp_path / "model"
    shutil.copytree(world / "sd", folder)
    change(folder)
    before = snapshot(folder)
    argv = ["sample", "--task", "diffusers", "--set", f"task.model={folder}", "--n", "2", "--steps", "2", "-q",
            "--out", "s.npz", "--threads", "1"]
    cwd = run_case(world, tmp_path, monkeypatch, capsys, argv, fragment)
    assert snapshot(folder) == before
    assert not any(cwd.iterdir())


def test_library_output_is_held_back_unless_verbose(capsys, monkeypatch):
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    for shown in (False, True):
        monkeypatch.setattr(pipeline_load, "SHOW_LIBRARY_OUTPUT", shown)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pipeline_load.library_output():
                print("a library print")
                sys.stderr.write("a library progress bar\n")
                warnings.warn("a library warning")
                assert (diffusers_logging.get_verbosity() == logging.ERROR) != shown
        assert bool(caught) == shown
        out, err = capsys.readouterr()
        assert ("a library print" in out) == shown and ("a library progress bar" in err) == shown
    assert diffusers_logging.get_verbosity() == level


def test_a_good_pipeline_folder_prints_nothing_with_quiet(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "sample", "--task", "diffusers", "--set", f"task.model={world / 'sd'}", "--n", "2",
                             "--steps", "2", "-q", "--out", "s.npz", "--threads", "1")
    assert code == 0 and err == "", err


# --- damaged import files ---------------------------------------------------------------------------------
def npy_header(shape: str, descr: str = "<f8", data: bytes = b"\0" * 16) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - 10 - len(text) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + data


def with_npy(data: bytes):
    import base64
    import hashlib

    return lambda item: {**item, "npy": base64.b64encode(data).decode(), "sha256": hashlib.sha256(data).hexdigest()}


IMPORT_DAMAGE = [  # (which line: item, comparison or queue; change of its record, or raw text; fragment)
    ("item", lambda r: {**r, "created": 10**400}, "field 'created' must be Unix time"),
    ("item", "created:Infinity", "field 'created' must be Unix time"),
    ("item", "created:NaN", "field 'created' must be Unix time"),
    ("item", lambda r: {**r, "created": -5}, "field 'created'"),
    ("item", lambda r: {**r, "created": "yesterday"}, "field 'created'"),
    ("item", lambda r: {**r, "id": [1, 2]}, "field 'id' must be an integer"),
    ("item", lambda r: {**r, "id": 2**70}, "field 'id'"),
    ("item", lambda r: {**r, "task": 5}, "field 'task'"),
    ("item", lambda r: {**r, "model": ["a"]}, "field 'model'"),
    ("item", lambda r: {**r, "condition": [1]}, "field 'condition'"),
    ("item", lambda r: {k: v for k, v in r.items() if k != "created"}, "missing field 'created'"),
    ("item", lambda r: {**r, "npy": 5}, "field 'npy'"),
    ("item", lambda r: {**r, "sha256": ["x"]}, "field 'sha256'"),
    ("item", with_npy(npy_header("(1125899906842624,)")), "header describes shape (1125899906842624,)"),
    ("item", with_npy(npy_header("(2, 3)")), "header describes shape (2, 3)"),
    ("item", with_npy(npy_header("(1,)", "|O")), "field 'npy'"),
    ("item", with_npy(b"\x93NUMPY\x01\x00garbage"), "field 'npy'"),
    ("queue", lambda r: {"type": "queue", "left": [1], "right": 2}, "field 'left' must be an integer"),
    ("queue", lambda r: {"type": "queue", "left": 1}, "missing field 'right'"),
    ("queue", lambda r: {"type": "queue", "left": 1.5, "right": 2}, "field 'left'"),
    ("queue", lambda r: {"type": "queue", "left": -3, "right": 2}, "field 'left' must be an integer from 1"),
    ("queue", lambda r: {"type": "queue", "left": 0, "right": 2}, "field 'left' must be an integer from 1"),
    ("queue", lambda r: {"type": "queue", "left": 2, "right": 2}, "a queued pair needs two different items"),
    ("queue", lambda r: {"type": "queue", "left": 1, "right": 99}, "the queue refers to item 99"),
    ("queue", lambda r: '{"type": "queue", "left": 1, "right": 2, "left": 3}', "the key 'left' appears twice"),
    ("item", lambda r: {**r, "shape": [3]}, "field 'shape' must be [2], what its npy holds, found [3]"),
    ("item", lambda r: {**r, "dtype": "<f8"}, "field 'dtype' must be '<f4'"),
]


@pytest.mark.parametrize("kind, change, fragment", IMPORT_DAMAGE, ids=[f"{k}-{f}"[:50] + str(i) for i, (k, _, f)
                                                                       in enumerate(IMPORT_DAMAGE)])
def test_damaged_import_files_name_file_line_and_field(world, tmp_path, monkeypatch, capsys, kind, change, fragment):
    lines = (world / "export.jsonl").read_text().splitlines()
    item = json.loads(lines[1])
    if isinstance(change, str):  # JSON text Python's json cannot write: replace the value of a key
        key, value = change.split(":")
        line = lines[1].replace(f'"{key}": {json.dumps(item[key])}', f'"{key}": {value}')
    else:
        line = change(item)
        line = line if isinstance(line, str) else json.dumps(line)  # a str: the line as it is
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], *lines[1:3], line, *lines[3:]]) + "\n")
    store = tmp_path / "s.db"
    shutil.copy(world / "store.db", store)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "feedback", "import", "--store", store, "--in", bad)
    check_one_line(code, out, err, fragment)
    assert f"import file {str(bad)!r} line 4: " in err, err
    assert snapshot(tmp_path) == before


def test_an_answer_given_twice_with_different_choices_is_refused(world, tmp_path, capsys):
    store = tmp_path / "s.db"
    shutil.copy(world / "store.db", store)
    lines = (world / "export.jsonl").read_text().splitlines()
    answer = {"type": "comparison", "id": 1, "uid": "ab" * 16, "left": 1, "right": 2, "choice": "left",
              "labeler": "ann", "created": 1.7e9, "response_ms": None}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, json.dumps(answer), json.dumps({**answer, "choice": "right"})]) + "\n")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "feedback", "import", "--store", store, "--in", bad)
    check_one_line(code, out, err, f"line {len(lines) + 2}: comparison uid {'ab' * 16} is already stored")
    assert snapshot(tmp_path) == before


# --- damaged reward.json --------------------------------------------------------------------------------
REWARD_JSON_DAMAGE = [
    ("an unknown key", lambda c: {**c, "hiddden": 8}, "unknown key 'hiddden'"),
    ("shape negative", lambda c: {**c, "shape": [-2]}, "shape must be a list of 1 to 4 positive integers, found [-2]"),
    ("shape NaN", lambda c: {**c, "shape": [float("nan")]}, "shape must be a list of 1 to 4 positive integers"),
    ("shape huge", lambda c: {**c, "shape": [10**6, 10**6]}, "shape must be at most"),
    ("hidden huge", lambda c: {**c, "hidden": 10**9}, "hidden must be at most"),
    ("layers huge", lambda c: {**c, "layers": 10**8}, "layers must be at most"),
    ("layers 1", lambda c: {**c, "layers": 1}, "layers must be an integer >= 2"),
    ("ensemble 0", lambda c: {**c, "ensemble": 0}, "ensemble must be a positive integer, found 0"),
    ("num_classes -1", lambda c: {**c, "num_classes": -1}, "num_classes must be an integer >= 0, found -1"),
    ("no hidden", lambda c: {k: v for k, v in c.items() if k != "hidden"}, "it lacks 'hidden'"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in REWARD_JSON_DAMAGE], ids=[c[0] for c in REWARD_JSON_DAMAGE])
def test_a_damaged_reward_json_is_one_line_naming_the_field(world, tmp_path, monkeypatch, capsys, change, fragment):
    model = tmp_path / "rm"
    shutil.copytree(world / "rm", model)
    (model / "reward.json").write_text(json.dumps(change(json.loads((model / "reward.json").read_text()))))
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "reward", "evaluate", "--comparisons", world / "cmp.safetensors", "--model", model)
    check_one_line(code, out, err, fragment)
    assert f"reward model file {str(model / 'reward.json')!r}" in err
    assert snapshot(tmp_path) == before


# --- tampered checkpoint JSON ---------------------------------------------------------------------------
def group(fn):
    return lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": fn(s["optimizer"]["param_groups"])}}


def first(**values):
    return group(lambda groups: [{**groups[0], **values}, *groups[1:]])


def extra(keys):
    return lambda s: {**s, "algorithm_extra": {**s.get("algorithm_extra", {}), "stats_keys": keys}}


CHECKPOINT_DAMAGE = [  # (run, change of state.json, fragment)
    ("run", first(lr="abc"), "param_groups[0].lr must be a finite number"),
    ("run", first(lr=-1), "param_groups[0].lr must be a finite number >= 0"),
    ("run", first(lr=[1]), "param_groups[0].lr"),
    ("run", first(betas=[0.9]), "param_groups[0].betas must be a list of 2 values"),
    ("run", first(betas=["a", 0.9]), "param_groups[0].betas[0]"),
    ("run", first(eps=None), "param_groups[0].eps"),
    ("run", first(amsgrad=3), "param_groups[0].amsgrad must be true or false"),
    ("run", first(params=[0, 99]), "parameter indices"),
    ("run", first(params="all"), "parameter indices"),
    ("run", first(momentum=0.9), "unknown key 'momentum'"),
    ("run", group(lambda g: [{k: v for k, v in g[0].items() if k != "lr"}]), "lacks the key 'lr'"),
    ("run", group(lambda g: g + g), "param_groups must be a list of 1 group"),
    ("run", group(lambda g: []), "param_groups must be a list of 1 group"),
    ("run", group(lambda g: ["x"]), "param_groups[0] must be a JSON object"),
    ("run", lambda s: {**s, "optimizer": {**s["optimizer"], "scalars": {"0.step": "x"}}}, "scalars.0.step"),
    ("run", lambda s: {**s, "optimizer": {**s["optimizer"], "scalars": {"99.step": 1}}}, "parameter 99"),
    ("ddpo", extra([{"a": 1}]), "stats_keys must be a list of null or lists of numbers"),
    ("ddpo", extra(5), "stats_keys must be a list"),
    ("ddpo", extra([None, None]), "'stats.1' is missing"),
    ("ddpo", extra([]), "'stats.0' is extra"),
    ("ddpo", extra([["a"]]), "stats_keys"),
]


@pytest.mark.parametrize("run, change, fragment", CHECKPOINT_DAMAGE,
                         ids=[f"{r}-{f}"[:50] + str(i) for i, (r, _, f) in enumerate(CHECKPOINT_DAMAGE)])
def test_tampered_checkpoint_json_is_refused_before_the_run_is_written(world, tmp_path, monkeypatch, capsys, run,
                                                                       change, fragment):
    copy = tmp_path / "run"
    shutil.copytree(world / run, copy)
    state = copy / "checkpoints" / "step-000002" / "state.json"
    state.write_text(json.dumps(change(json.loads(state.read_text()))))
    before = snapshot(copy)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--resume", copy, "--updates", "3", "-q", "--threads", "1")
    check_one_line(code, out, err, fragment)
    assert snapshot(copy) == before, "the run was written before its checkpoint was refused"
