"""Checkpoints: written under new names and switched atomically; a kill between the two renames of a
same-step rewrite, stale temporaries, and a damaged latest checkpoint all leave a run that resumes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scoreaction.errors import CheckpointError
from scoreaction.train import TrainConfig, Trainer, checkpoint

SMALL = dict(batch_size=8, steps=4, hidden=16, eval_n=64, eval_steps=4, eval_every=0, dtype="float64")


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_state(step: int) -> dict:
    return {"format": "scoreaction-checkpoint-1", "config": {}, "step": step, "trajectories": 8 * step,
            "optimizer": {"param_groups": []}, "algorithm_optimizers": {}}


def write_checkpoint(run, step: int):
    """A small but complete checkpoint RUN/checkpoints/step-N, marked latest."""
    name = f"step-{step:06d}"
    folder = checkpoint.save(run / "checkpoints" / name, model={"w": torch.full((3,), float(step))},
                             train={"rng": torch.Generator().get_state()}, state=fake_state(step))
    checkpoint.mark_latest(run, name)
    return folder


@pytest.fixture
def run(tmp_path):
    """A run folder with checkpoints step-1 and step-2 (latest)."""
    run = tmp_path / "run"
    write_checkpoint(run, 1)
    write_checkpoint(run, 2)
    return run


def test_layout_and_round_trip(run):
    assert (run / "checkpoints" / "latest").read_text() == "step-000002\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]
    model, train, state = checkpoint.load(run)
    assert model["w"].tolist() == [2.0, 2.0, 2.0] and state["step"] == 2 and train["rng"].dtype == torch.uint8
    assert checkpoint.resolve(run) == run / "checkpoints" / "step-000002"
    assert checkpoint.resolve(run / "checkpoints") == run / "checkpoints" / "step-000002"
    assert checkpoint.resolve(run / "checkpoints" / "step-000001") == run / "checkpoints" / "step-000001"


def damage_missing(folder):
    (folder / "model.safetensors").unlink()


def damage_truncated(folder):
    data = (folder / "train.safetensors").read_bytes()
    (folder / "train.safetensors").write_bytes(data[:len(data) - 7])


def damage_bad_json(folder):
    (folder / "state.json").write_text('{"config": ')


def damage_list(folder):
    (folder / "state.json").write_text("[]")


def damage_no_optimizer(folder):
    state = json.loads((folder / "state.json").read_text())
    del state["optimizer"]
    (folder / "state.json").write_text(json.dumps(state))


def damage_gone(folder):
    shutil.rmtree(folder)


@pytest.mark.parametrize("damage, named", [
    (damage_missing, "model.safetensors"), (damage_truncated, "train.safetensors"), (damage_bad_json, "state.json"),
    (damage_list, "JSON list"), (damage_no_optimizer, "'optimizer'"), (damage_gone, "is missing"),
])
def test_a_damaged_latest_falls_back_to_the_previous_good_one(run, capsys, damage, named):
    damage(run / "checkpoints" / "step-000002")
    assert checkpoint.resolve(run) == run / "checkpoints" / "step-000001"
    _, _, state = checkpoint.load(run)
    assert state["step"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scoreaction: warning: ") and named in err
    assert "using" in err and "step-000001" in err


def test_a_damaged_checkpoint_named_explicitly_is_an_error(run):
    damage_truncated(run / "checkpoints" / "step-000002")
    with pytest.raises(CheckpointError, match="train.safetensors' is truncated or corrupt"):
        checkpoint.load(run / "checkpoints" / "step-000002")


def test_no_intact_checkpoint_is_an_error_naming_the_latest(run):
    for name in ("step-000001", "step-000002"):
        damage_bad_json(run / "checkpoints" / name)
    with pytest.raises(CheckpointError, match=r"has no intact checkpoint: .*step-000002/state.json' is not valid JSON"):
        checkpoint.resolve(run)


def test_a_missing_or_bad_pointer_takes_the_newest_intact_checkpoint(run, capsys):
    (run / "checkpoints" / "latest").unlink()
    assert checkpoint.resolve(run).name == "step-000002"
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    assert checkpoint.resolve(run).name == "step-000002"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "is missing" in err[0] and "does not name a checkpoint" in err[1]


def test_a_kill_between_the_renames_of_a_rewrite_leaves_the_old_version(run, monkeypatch, capsys):
    """Rewriting step-2 (the trainer's final save at a checkpointed step) is: new folder built as a
    temporary, old renamed to .old-PID, new renamed in. Interrupt it between the two renames."""
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moved the old folder away; the kill comes before the second
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run / "checkpoints" / "step-000002", model={"w": torch.zeros(3)},
                        train={"rng": torch.Generator().get_state()}, state=fake_state(2))
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-000002" not in names and f".step-000002.old-{os.getpid()}" in names
    folder = checkpoint.resolve(run)  # the intact previous version of step-2, with a warning
    assert folder.name == f".step-000002.old-{os.getpid()}"
    model, _, state = checkpoint.load(run)
    assert state["step"] == 2 and model["w"].tolist() == [2.0, 2.0, 2.0]
    assert "that latest names is missing" in capsys.readouterr().err
    # the next save cleans up: the old version is put back, the half-finished temporary removed
    assert sorted(checkpoint.clean_stale(run)) == [f".step-000002.old-{os.getpid()}", f".step-000002.tmp-{os.getpid()}"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]
    assert checkpoint.load(run)[0]["w"].tolist() == [2.0, 2.0, 2.0]


def test_a_rewrite_replaces_the_folder_and_leaves_nothing_behind(run):
    checkpoint.save(run / "checkpoints" / "step-000002", model={"w": torch.zeros(3)},
                    train={"rng": torch.Generator().get_state()}, state=fake_state(2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]
    assert checkpoint.load(run)[0]["w"].tolist() == [0.0, 0.0, 0.0]


def test_stale_temporaries_are_removed_at_the_start_of_a_save(run):
    pid = dead_pid()
    ckpts = run / "checkpoints"
    (ckpts / f".step-000003.tmp-{pid}").mkdir()
    (ckpts / f".step-000003.tmp-{pid}" / "model.safetensors").write_bytes(b"x" * 1000)
    (ckpts / f".latest.tmp-{pid}").write_text("step-000003\n")
    (ckpts / f".step-000001.old-{pid}").mkdir()  # step-000001 exists: a leftover
    (run / f".config.json.tmp-{pid}").write_text("{")
    alive = ckpts / f".step-000009.tmp-{os.getppid()}"  # a writer still at work: kept
    alive.mkdir()
    (run / f".notes.txt.tmp-{pid}").write_text("not ours")  # not a file the trainer writes: kept
    write_checkpoint(run, 3)
    assert sorted(p.name for p in ckpts.iterdir()) == [alive.name, "latest", "step-000001", "step-000002",
                                                       "step-000003"]
    assert sorted(p.name for p in run.iterdir()) == [f".notes.txt.tmp-{pid}", "checkpoints"]


def test_mark_latest_names_an_existing_folder_only(run):
    with pytest.raises(CheckpointError, match="latest must name a checkpoint folder"):
        checkpoint.mark_latest(run, "step-000042")
    with pytest.raises(CheckpointError, match="latest must name a checkpoint folder"):
        checkpoint.mark_latest(run, "../run")
    assert (run / "checkpoints" / "latest").read_text() == "step-000002\n"


@pytest.mark.parametrize("state, message", [
    ([], "must hold a JSON object, found a JSON list"),
    ("x", "must hold a JSON object, found a JSON string"),
    ({"step": 1}, "lacks the key 'config'"),
    ({**fake_state(1), "step": "1"}, "step must be an integer >= 0, found '1'"),
    ({**fake_state(1), "step": True}, "step must be an integer >= 0, found True"),
    ({**fake_state(1), "trajectories": -1}, "trajectories must be an integer >= 0"),
    ({**fake_state(1), "config": None}, "config must be a JSON object, found None"),
    ({**fake_state(1), "optimizer": {"scalars": {}}}, "optimizer lacks the key 'param_groups'"),
    ({k: v for k, v in fake_state(1).items() if k != "algorithm_optimizers"}, "lacks the key 'algorithm_optimizers'"),
])
def test_check_state_names_the_file_and_the_key(state, message):
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.check_state(state, "RUN/checkpoints/step-000001/state.json")
    assert "'RUN/checkpoints/step-000001/state.json'" in str(err.value) and "\n" not in str(err.value)


def test_a_trainer_resumes_from_the_previous_good_checkpoint(tmp_path, capsys):
    config = TrainConfig(task={"name": "gaussian"}, out=str(tmp_path / "run"), updates=3, checkpoint_every=1, **SMALL)
    Trainer(config, progress=False).run()
    (tmp_path / "run" / "checkpoints" / "step-000003" / "state.json").write_text("[")
    resumed = Trainer.from_checkpoint(str(tmp_path / "run"), progress=False)
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scoreaction: warning:" in err and "step-000002" in err
    resumed.run()
    assert checkpoint.load(tmp_path / "run")[2]["step"] == 3  # step-3 rewritten whole
    reference = Trainer(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "ref")}), progress=False)
    reference.run()
    for key, value in reference.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key
