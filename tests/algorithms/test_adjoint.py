"""Adjoint Matching (Eq. E20): the lean adjoint's regression target is the optimal action (Eq. E8) on the gaussian
task (E21), the loss is minimal at the optimum, short runs close the gap, and bad input is a one-line error."""

import json

import pytest
import torch
from helpers import run_cli

from scoreaction.algorithms import Batch, make_algorithm
from scoreaction.policy import ScoreAsAction
from scoreaction.tasks import make_task
from scoreaction.train import TrainConfig, Trainer

BETA = 0.5  # not 1, so that a lost or inverted 1 / beta_KL shows


@pytest.fixture(scope="module")
def at_the_optimum():
    """Rollouts of the exact optimal action a* on a fine grid, and the algorithm's lean adjoints along them."""
    task = make_task("gaussian", {"beta_kl": BETA})
    optimal = ScoreAsAction(task.path, task.pretrained, task.optimal_score)
    gen = torch.Generator().manual_seed(0)
    x0, cond = task.start(4096, generator=gen, dtype=torch.float64)
    traj = optimal.rollout(x0, task.grid("uniform", 200), cond, generator=gen)
    batch = Batch(traj=traj, rewards=task.reward(traj.x_final), beta_kl=task.beta_kl)
    algorithm = make_algorithm("adjoint", optimal, task)
    data, metrics = algorithm.prepare(batch)
    return task, optimal, algorithm, data, metrics


def test_lean_adjoint_target_is_the_optimal_action(at_the_optimum):
    """E[s_pre - atilde_{k+1} | X_k] = a*(t_k, X_k): both sides are affine in X_k here, so a least-squares fit of the
    target on (1, X_k) must reproduce a* - s_pre = grad log phi at the sampled states. The residual noise of the fit
    leaves a relative squared error of ~1e-3; a sign error gives 4, a factor 2 in the scale 0.25."""
    task, _, _, data, metrics = at_the_optimum
    traj = data.batch.traj
    assert metrics["adjoint_norm_last"] > 0
    for k in (20, 100, 160, 190):  # RL times 0.1, 0.5, 0.8, 0.95
        x, s = traj.xs[k], task.path.T - float(traj.ts[k])
        target = -data.adjoints[k]  # the regression target s_pre - atilde_{k+1}, minus s_pre (em, eta = 1)
        features = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], dim=1)
        fit = features @ torch.linalg.lstsq(features, target).solution
        control = task.optimal_score(s, x) - task.pretrained(s, x)  # grad log phi(t_k, X_k)
        error = float(((fit - control) ** 2).sum(1).mean() / (control**2).sum(1).mean())
        assert error < 0.02, (k, error)


def test_loss_is_minimal_at_the_optimal_action(at_the_optimum):
    """On rollouts of a*, the loss of the actions s_pre + (1 + eps) grad log phi (a wrong scale of the control) and
    a* + eps c (a constant bias c) is a quadratic in eps whose minimiser is eps = 0 up to Monte-Carlo noise."""
    task, _, algorithm, data, _ = at_the_optimum
    bias = torch.tensor([1.0, -0.5], dtype=torch.float64)

    def scaled(eps):
        return lambda s, x, c: task.pretrained(s, x) + (1 + eps) * (task.optimal_score(s, x) - task.pretrained(s, x))

    def shifted(eps):
        return lambda s, x, c: task.optimal_score(s, x) + eps * bias

    mb = data.select(torch.arange(1024))
    for family in (scaled, shifted):
        loss = {eps: float(algorithm.loss(ScoreAsAction(task.path, task.pretrained, family(eps)), mb)[0])
                for eps in (-1.0, 0.0, 1.0)}
        curvature = loss[1.0] + loss[-1.0] - 2 * loss[0.0]
        minimiser = -(loss[1.0] - loss[-1.0]) / (2 * curvature)
        assert curvature > 0 and abs(minimiser) < 0.1, (family.__name__, loss, minimiser)


@pytest.mark.slow
def test_short_adjoint_run_closes_most_of_the_gap(tmp_path):
    """Gaussian d = 2, beta_KL = 1, K = 20: 40 updates close >= 90% of J* - E_pre[r] (measured: 0.964; the fraction's
    standard error at n = 16384 is 0.011, so 0.9 is almost six standard errors below, and the start is at 0)."""
    config = TrainConfig(task={"name": "gaussian"}, algorithm="adjoint", batch_size=256, steps=20, eval_every=0,
                         dtype="float32", out=str(tmp_path / "run"))
    tr = Trainer(config, progress=False)
    pre = tr.evaluate(n=16384)
    for _ in range(40):
        tr.update()
    post = tr.evaluate(n=16384)
    assert abs(pre["eval_fraction"]) < 0.1
    assert post["eval_fraction"] > 0.9, post
    assert post["eval_gaussian_kl"] < 0.1 * pre["eval_gaussian_kl"], (pre, post)


def test_time_subsampling_is_an_unbiased_scaled_sum(at_the_optimum):
    """steps_per_sample = m: each sample's loss is K / m times the sum over a fresh uniform m-subset of its steps."""
    task, optimal, _, data, _ = at_the_optimum
    algorithm = make_algorithm("adjoint", optimal, task, {"steps_per_sample": 50, "minibatches": 1})
    gen = torch.Generator().manual_seed(1)
    biased = ScoreAsAction(task.path, task.pretrained, lambda s, x, c: task.pretrained(s, x) + 0.3)
    full = float(algorithm.loss(biased, data)[0])
    draws = []
    for _ in range(20):
        mb, total = next(iter(algorithm.minibatches(data, gen)))
        assert total == len(data) and mb.steps.shape == (len(data), 50)
        assert all(len(set(row.tolist())) == 50 for row in mb.steps[:10])  # steps without repetition
        draws.append(float(algorithm.loss(biased, mb)[0]))
    draws = torch.tensor(draws)
    assert abs(float(draws.mean()) - full) < 4 * float(draws.std()) / 20**0.5 + 1e-3 * full


def test_conditions_pass_through_on_digits(tmp_path):
    config = TrainConfig(task={"name": "digits"}, algorithm="adjoint", updates=1, batch_size=4, steps=3,
                         eval_every=0, out=str(tmp_path / "run"))
    tr = Trainer(config, progress=False)
    before = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    metrics = tr.update()
    assert "message" not in metrics and torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in tr.policy.named_parameters())


def test_bad_input_is_a_one_line_error():
    task = make_task("gaussian")
    policy = ScoreAsAction(task.path, task.pretrained)
    with pytest.raises(ValueError, match="adjoint needs beta_kl > 0 .*, found 0.0"):
        make_algorithm("adjoint", policy, make_task("gaussian", {"beta_kl": 0}))
    with pytest.raises(ValueError, match="adjoint needs rollouts with noise, eta > 0, found eta = 0.0"):
        make_algorithm("adjoint", ScoreAsAction(task.path, task.pretrained, eta=0, action_noise=0.1), task)
    with pytest.raises(ValueError, match="steps_per_sample must be an integer >= 0, found -1"):
        make_algorithm("adjoint", policy, task, {"steps_per_sample": -1})
    task.reward.differentiable = False
    with pytest.raises(ValueError, match="adjoint needs a differentiable reward, found QuadraticReward"):
        make_algorithm("adjoint", policy, task)


def test_cli_trains_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--algorithm", "adjoint", "--updates", "2", "--batch-size", "8", "--steps",
                           "4", "--hidden", "16", "--eval-n", "64", "--out", str(out), "-q")
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2] and all(m["loss"] >= 0 for m in lines[1:])  # 0: the baseline
    code, _, err = run_cli(capsys, "train", "--algorithm", "adjoint", "--set", "task.beta_kl=0", "--out",
                           str(tmp_path / "bad"), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "adjoint needs beta_kl > 0" in err
    assert not (tmp_path / "bad").exists()
