"""Fine-tuning algorithms: parameters move, on-policy ratios are 1, advantages have the right sign,
and short runs improve the objective on the gaussian task."""

import pytest
import torch

from scoreaction.algorithms import ALGORITHMS, Batch, make_algorithm
from scoreaction.algorithms.base import normalise, rescore
from scoreaction.policy import Trajectory
from scoreaction.train import TrainConfig, Trainer

SMALL = dict(batch_size=64, steps=10, eval_n=2048, eval_steps=50, eval_every=0, dtype="float64")


def trainer(tmp_path, algorithm, algo=None, **kw):
    config = TrainConfig(task={"name": "gaussian"}, algorithm=algorithm, algo=algo or {},
                         out=str(tmp_path / algorithm), **{**SMALL, **kw})
    return Trainer(config, progress=False)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_trainable_parameter_changes_after_one_update(tmp_path, algorithm):
    # two epochs x two minibatches: the zero-initialised head of the residual action (which makes the
    # policy start exactly at the pretrained model) gives the layers below it a gradient from step 2
    tr = trainer(tmp_path, algorithm, {"epochs": 2, "minibatches": 2})
    modules = {"policy": tr.policy, **tr.algorithm.modules()}
    before = {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.named_parameters()}
    metrics = tr.update()
    assert "message" not in metrics
    after = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.named_parameters()}
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{algorithm}: parameters unchanged after one update: {unchanged}"


@pytest.mark.parametrize("algorithm", ["ctrl", "ctpg", "ddpo", "dpok", "grpo"])
def test_first_minibatch_is_on_policy(tmp_path, algorithm):
    tr = trainer(tmp_path, algorithm)
    batch = tr.collect()
    data, _ = tr.algorithm.prepare(batch, tr.generator)
    mb, _ = next(iter(tr.algorithm.minibatches(data, tr.generator)))
    _, diag = tr.algorithm.loss(tr.policy, mb)
    assert diag["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert diag["approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert diag.get("clipfrac", 0.0) == 0.0  # the clipped algorithms report it: ctrl, ddpo, grpo
    assert ("clipfrac" in diag) == (algorithm in ("ctrl", "ddpo", "grpo"))


@pytest.mark.parametrize("algorithm", ["ctrl", "ctpg", "ddpo", "dpok", "grpo"])
def test_approx_kl_measures_the_policy_move(tmp_path, algorithm):
    """After an update, the k3 estimate on the stored transitions is positive and matches the plain
    Monte-Carlo KL(pi_old || pi_theta) = E[log pi_old - log pi_theta] within its noise."""
    tr = trainer(tmp_path, algorithm, {"lr": 3e-2})
    batch = tr.collect()
    data, _ = tr.algorithm.prepare(batch, tr.generator)
    for mb, _ in tr.algorithm.minibatches(data, tr.generator):
        loss, _ = tr.algorithm.loss(tr.policy, mb)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
    mb, _ = next(iter(tr.algorithm.minibatches(data, tr.generator)))
    _, diag = tr.algorithm.loss(tr.policy, mb)
    with torch.no_grad():
        log_ratio = rescore(tr.policy, mb)[0] - mb.log_prob
    plain = float(-log_ratio.mean())
    assert diag["approx_kl"] > 1e-6
    assert diag["approx_kl"] == pytest.approx(plain, rel=0.5, abs=1e-4)


def hand_made_batch(task, rewards, kls, xs):
    K, B = kls.shape
    ts = torch.linspace(0, task.path.T, K + 1, dtype=torch.float64)
    zeros = torch.zeros(K, B, dtype=torch.float64)
    traj = Trajectory(xs=xs, ts=ts, log_probs=zeros, kls=kls, log_ratios=kls.clone(), x0_hats=xs[:-1],
                      noises=torch.zeros_like(xs[:-1]))
    return Batch(traj=traj, rewards=rewards, beta_kl=task.beta_kl)


def test_td_advantages_on_a_hand_made_case(tmp_path):
    tr = trainer(tmp_path, "ctrl", {"advantage": "td"})
    task = tr.task
    xs = torch.zeros(3, 2, 2, dtype=torch.float64)
    rewards = torch.tensor([0.0, -2.0], dtype=torch.float64)
    kls = torch.tensor([[0.1, 0.1], [0.0, 0.3]], dtype=torch.float64)
    values = torch.tensor([[-1.0, -1.0], [-0.5, -1.5]], dtype=torch.float64)  # V(t_0), V(t_1)
    adv = tr.algorithm.advantages(hand_made_batch(task, rewards, kls, xs), values)
    beta = task.beta_kl
    expected = torch.tensor([[-0.5 - (-1.0) - beta * 0.1, -1.5 - (-1.0) - beta * 0.1],   # V1 - V0 + rho dt
                             [0.0 - (-0.5) - 0.0, -2.0 - (-1.5) - beta * 0.3]], dtype=torch.float64)  # r - V1 + rho dt
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv[0, 0] > 0 > adv[0, 1] and adv[1, 0] > 0 > adv[1, 1]  # better outcome, positive advantage


def test_gae_lambda_mixes_td_advantages_up_to_the_monte_carlo_return(tmp_path):
    xs = torch.zeros(4, 2, 2, dtype=torch.float64)
    rewards = torch.tensor([1.0, -2.0], dtype=torch.float64)
    kls = torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.05, 0.4]], dtype=torch.float64)
    values = torch.tensor([[-1.0, 0.5], [0.2, -1.5], [0.7, 0.1]], dtype=torch.float64)
    td = trainer(tmp_path, "ctrl").algorithm
    batch = hand_made_batch(td.task, rewards, kls, xs)
    delta = td.advantages(batch, values)
    for lam in (0.5, 1.0):
        adv = trainer(tmp_path, "ctrl", {"gae_lambda": lam}).algorithm.advantages(batch, values)
        expected = torch.stack([sum(lam ** (j - k) * delta[j] for j in range(k, 3)) for k in range(3)])
        torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(adv, batch.returns() - values, rtol=0, atol=1e-12)  # lambda = 1: G_k - V_k
    with pytest.raises(ValueError, match=r"gae_lambda must be in \[0, 1\], found 1.5"):
        trainer(tmp_path, "ctrl", {"gae_lambda": 1.5})
    with pytest.raises(ValueError, match="gae_lambda applies to advantage=td only"):
        trainer(tmp_path, "ctrl", {"gae_lambda": 0.5, "advantage": "grad"})


def test_grad_advantages_on_a_hand_made_case(tmp_path):
    """One step into t_K = T: A = <grad r(m), X_1 - m> + rho dt, with X_1 - m = std z."""
    tr = trainer(tmp_path, "ctrl", {"advantage": "grad"})
    task, policy = tr.task, tr.policy
    xs = torch.zeros(2, 2, 2, dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    ts = torch.tensor([0.0, task.path.T], dtype=torch.float64)
    std = policy.transition_std(0.0, task.path.T)
    m = torch.zeros(2, 2, dtype=torch.float64)
    xs[1] = m + std * z
    kls = torch.tensor([[0.2, 0.2]], dtype=torch.float64)
    traj = Trajectory(xs=xs, ts=ts, log_probs=torch.zeros(1, 2, dtype=torch.float64), kls=kls, log_ratios=kls,
                      x0_hats=xs[:1], noises=z.unsqueeze(0))
    batch = Batch(traj=traj, rewards=task.reward(xs[1]), beta_kl=task.beta_kl)
    adv = tr.algorithm.advantages(batch, torch.zeros(1, 2, dtype=torch.float64))
    grad_r = -(m - task.reward.y) @ task.reward.A  # reward pulls towards y = (1, 1)
    expected = (grad_r * std * z).sum(-1) - task.beta_kl * 0.2
    torch.testing.assert_close(adv[0], expected, rtol=0, atol=1e-12)
    assert adv[0, 0] > adv[0, 1]  # the step towards the target is the better one


def test_global_normalisation_keeps_the_objective_direction():
    adv = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    out, scale = normalise(adv, "global")
    torch.testing.assert_close(out * scale, adv)
    per_time, _ = normalise(adv, "per_time")
    torch.testing.assert_close(per_time.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        normalise(adv, "minmax")


@pytest.mark.slow
def test_short_ctrl_run_closes_most_of_the_gap(tmp_path):
    tr = trainer(tmp_path, "ctrl", batch_size=256, steps=20, dtype="float32")
    pre = tr.evaluate(n=16384)
    for _ in range(30):
        tr.update()
    post = tr.evaluate(n=16384)
    assert abs(pre["eval_fraction"]) < 0.1  # the policy starts at the pretrained model
    assert post["eval_fraction"] > 0.9, post  # fraction SE ~ 0.012 at n = 16384
    assert post["eval_gaussian_kl"] < 0.1 * pre["eval_gaussian_kl"], (pre, post)


@pytest.mark.slow
def test_short_ddpo_run_raises_the_reward(tmp_path):
    tr = trainer(tmp_path, "ddpo", batch_size=256, steps=20, dtype="float32")
    pre = tr.evaluate(n=8192)
    for _ in range(15):
        tr.update()
    post = tr.evaluate(n=8192)
    assert post["eval_reward"] > pre["eval_reward"] + 0.3, (pre, post)  # reward SE ~ 0.015


@pytest.mark.parametrize("algorithm, options, message", [
    ("ctrl", {"lr": -1e-3}, "lr must be a number > 0, found -0.001"),
    ("ctrl", {"clip": 0}, "clip must be a number > 0, found 0"),
    ("ctrl", {"advantage": "gae"}, "advantage must be one of"),
    ("ddpo", {"epochs": 0}, "epochs must be a positive integer, found 0"),
    ("grpo", {"group_size": -4}, "group_size must be a positive integer"),
    ("dpok", {"kl_weight": 0.1}, "unknown option 'kl_weight' for algorithm 'dpok'"),  # beta_kl is the task's
    ("ctrl", {"learning_rate": 1}, "unknown option 'learning_rate' for algorithm 'ctrl'"),
    ("ppo", {}, "algorithm must be one of"),
])
def test_invalid_algorithm_config(algorithm, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_algorithm(algorithm, None, None, options)
