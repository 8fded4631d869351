"""`scoreaction bench --task diffusers --quick` end to end (TRL's side too when trl is installed), the skipped-TRL
path, the SD-1.5 preset's architecture, and bad options as one-line errors."""

import importlib.util
import json
import math

import pytest
import torch

from scoreaction.cli import main
from scoreaction.experiments import diffusers_bench
from scoreaction.experiments.diffusers_bench import TRL_MISSING, DiffusersBenchConfig, build_random_sd15, cells_of, run
from tests.helpers import numbers

HAS_TRL = importlib.util.find_spec("trl") is not None
PHASES = ("rollout", "reward", "prepare", "update")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusers-bench")
    assert main(["bench", "--task", "diffusers", "--quick", "--device", "cpu", "--out", str(out), "-q"]) == 0

    def reject(token):
        raise ValueError(f"non-finite number {token} in diffusers.json")

    results = json.loads((out / "diffusers.json").read_text(), parse_constant=reject)
    return out, results, (out / "diffusers.md").read_text()


@pytest.mark.slow
def test_quick_bench_measures_both_sides(quick):
    out, results, text = quick
    command = f"scoreaction bench --task diffusers --quick --device cpu --out {out}"
    assert results["command"] == command and f"```\n{command}\n```" in text.split("## Settings")[0]
    assert results["format"] == diffusers_bench.FORMAT
    assert all(math.isfinite(v) for v in numbers(results))
    expected = {"ctrl", "ddpo", "grpo", "ctrl + KL 0.01", "ddpo (TRL's backward size)"} | (
        {"TRL ddpo"} if HAS_TRL else set())
    assert {c["label"] for c in results["cells"]} == expected
    assert results["trl_skipped"] is None if HAS_TRL else results["trl_skipped"] == TRL_MISSING
    assert results["versions"]["torch"] and results["versions"]["diffusers"]
    assert len(results["machine"]["load_average_start"]) == 3
    for c in results["cells"]:
        assert c["error"] is None, c
        m = c["median"]
        assert m["seconds"] > 0 and m["samples_per_s"] > 0 and c["peak_rss_mb"] >= c["rss_setup_mb"] > 0
        assert all(m[f"seconds_{p}"] >= 0 for p in PHASES)
        assert sum(m[f"seconds_{p}"] for p in PHASES) <= m["seconds"] + 1e-6
        assert len(c["records"]) == 2 and len(c["load_start"]) == 3
        # the same transitions are trained on both sides: K x B x 2 (guidance) UNet rows with gradients per epoch
        assert m["unet_grad_rows"] == c["steps"] * c["batch_size"] * 2
        assert m["unet_nograd_rows"] >= c["steps"] * c["batch_size"] * 2 and m["vae_rows"] >= c["batch_size"]
        # one backward pass per minibatch, or per timestep and minibatch with TRL's backward size (and on TRL)
        calls = 2 * c["steps"] if c["side"] == "trl" or "backward size" in c["label"] else 2
        assert m["unet_grad_calls"] == calls
    for heading in ("## Settings", "## Seconds per update, split", "## Against steps and batch size",
                    "## What the KL term costs", "## Where the time and memory go", "## What explains the ratios"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 | 2 | ")]
    assert len(rows) == len(expected) and all("failed" not in r for r in rows)
    if HAS_TRL:
        trl_row = next(r for r in rows if "TRL ddpo" in r)
        assert [x.strip() for x in trl_row.split("|")].count("1.00") == 3  # TRL against itself: the three ratios
        assert "- **Rollouts**" in text and "- **Memory**" in text


@pytest.mark.slow
def test_without_trl_runs_ours_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(diffusers_bench, "trl_installed", lambda: False)
    config = DiffusersBenchConfig(out=str(tmp_path), algorithms=["ddpo"], kl_algorithms=[], matched=[], steps=[2],
                                  batch_sizes=[2], updates=1)
    results = run(config)
    assert results.trl_skipped == TRL_MISSING and [c.label for c in results.cells] == ["ddpo"]
    assert results.cells[0].error is None
    text = (tmp_path / "diffusers.md").read_text()
    assert TRL_MISSING in text and "no ratios to explain" in text


def test_cli_says_in_one_line_that_trl_is_skipped(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(diffusers_bench, "trl_installed", lambda: False)
    monkeypatch.setattr(diffusers_bench, "run", lambda config, log=None: None)
    assert main(["bench", "--task", "diffusers", "--quick", "--device", "cpu", "--out", str(tmp_path), "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scoreaction: {TRL_MISSING}"]


def test_sd15_preset_is_the_sd15_architecture():
    with torch.device("meta"):  # no memory, no weights: the shapes only
        pipe = build_random_sd15()
    count = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae")}
    assert count == {"unet": 859_520_964, "vae": 83_653_863}  # Stable Diffusion 1.5's UNet and VAE
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512


def test_cells_of_the_presets():
    tiny = cells_of(DiffusersBenchConfig(), "folder", with_trl=True)
    assert len(tiny) == 2 * 3 * 8  # K in (10, 20), B in (4, 8, 16); 3 + 3 with KL + ddpo matched + TRL
    assert {c.micro_batch for c in tiny if c.label.endswith("(TRL's backward size)")} == {2, 4, 8}
    assert {c.micro_batch for c in tiny if not c.label.endswith("(TRL's backward size)")} == {None}
    sd15 = cells_of(DiffusersBenchConfig(preset="sd15", device="cuda"), "folder", with_trl=False)
    assert [c.label for c in sd15] == ["ctrl", "ddpo", "grpo", "ctrl + KL 0.01", "ddpo + KL 0.01", "grpo + KL 0.01"]
    assert {(c.steps, c.batch_size, c.micro_batch, c.precision, c.updates) for c in sd15} == {(50, 8, 4, "bf16", 3)}


@pytest.mark.parametrize("argv, expected", [
    (["--device", "tpu"], "--device must be one of ['auto', 'cpu', 'cuda'], found 'tpu'"),
    (["--preset", "sdxl"], "--preset must be one of ['tiny', 'sd15'], found 'sdxl'"),
    (["--quick", "--preset", "sd15"], "--quick runs the tiny pipeline"),
    (["--preset", "sd15", "--device", "cpu"], "--preset sd15 (512 px, 50 steps, bf16) needs a GPU"),
    (["--only", "cost"], "--only applies to --task exact and efficiency, not to --task diffusers"),
    (["--set", "steps=3"], "unknown option 'steps'"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, argv, expected):
    assert main(["bench", "--task", "diffusers", *argv, "--out", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_device_and_preset_belong_to_the_diffusers_task(capsys):
    assert main(["bench", "--task", "exact", "--device", "cpu"]) == 2
    assert "--device and --preset apply to --task diffusers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_cuda_without_a_gpu_is_an_error(capsys):
    assert main(["bench", "--task", "diffusers", "--device", "cuda"]) == 2
    assert "finds no CUDA GPU" in capsys.readouterr().err


def test_batch_sizes_must_split_into_minibatches():
    with pytest.raises(ValueError, match="multiple of minibatches=2"):
        DiffusersBenchConfig(batch_sizes=[3])
