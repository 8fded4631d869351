"""Evaluation of a policy under any solver: reward gain over the pretrained model, J, distance to p*.

Clock: RL-time grids. Both models start from the same prior draws (and, for stochastic solvers, the
same noise), so the gain is a paired difference with a small standard error.
"""

from __future__ import annotations

import math

import torch

from scoreaction.errors import ScoreactionError
from scoreaction.metrics import fit_gaussian, gaussian_kl, sliced_wasserstein
from scoreaction.policy import ScoreAsAction
from scoreaction.samplers import get_solver


@torch.no_grad()
def sample_with(policy: ScoreAsAction, task, solver: str, steps: int, n: int, seed: int, *, grid: str = "uniform",
                eta: float | None = None, pretrained: bool = False, dtype=torch.float32, cond: torch.Tensor | None = None):
    """Terminal samples and rewards of the policy (or of the pretrained model) under a solver; `cond` (n,)
    replaces the task's draw of conditions (the prior draws and the noise are the same either way)."""
    sol = get_solver(solver)
    eta = sol.default_eta if eta is None else eta
    gen = torch.Generator().manual_seed(seed)
    x0, drawn = task.start(n, generator=gen, dtype=dtype)
    cond = drawn if cond is None else cond
    device = getattr(task, "device", torch.device("cpu"))
    x0, cond = x0.to(device), None if cond is None else cond.to(device)
    ts = task.grid(grid, steps, generator=gen)
    score = task.pretrained if pretrained else policy.score
    x = sol.sample(task.path, score, x0, ts, cond=cond, eta=eta, generator=gen)
    return x, task.reward(x, cond)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The mean of a - b and its standard error, a and b paired by sample."""
    diff = (a - b).double()
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")


@torch.no_grad()
def prompt_gain(policy: ScoreAsAction | None, task, texts: list[str], per_prompt: int, solver: str, steps: int,
                seed: int = 0, *, batch: int = 64, **kw) -> dict:
    """`per_prompt` images of each prompt of `texts` from the policy and from the pretrained model on the same
    noise (batch k of `batch` images from seed + k): each model's mean reward and the paired gain. Where every
    prompt is a caption of the shapes grammar, also GenEval's report of each model's images (accuracy per
    category, overall = their mean, checker.summarise) and the paired gains with standard errors. Without a
    policy, the pretrained model's figures only. A text-to-image task (task.add_prompts, task.images)."""
    from scoreaction.shapes.grammar import category, parse

    ids = task.add_prompts(texts).repeat_interleave(per_prompt)
    models = {"pretrained": True} if policy is None else {"policy": False, "pretrained": True}
    rewards, images = {m: [] for m in models}, {m: [] for m in models}
    for k, chunk in enumerate(ids.split(batch)):
        for m, pretrained in models.items():
            x, r = sample_with(policy, task, solver, steps, len(chunk), seed + k, cond=chunk, pretrained=pretrained,
                               **kw)
            rewards[m].append(r.float().cpu())
            images[m].append(task.images(x).cpu())
    rewards = {m: torch.cat(v) for m, v in rewards.items()}
    out = {"prompts": len(texts), "per_prompt": per_prompt, "n": len(ids), "solver": solver, "steps": steps,
           **{f"reward_{m}" if m == "pretrained" else "reward": float(r.mean()) for m, r in rewards.items()}}
    if policy is not None:
        out["gain"], out["gain_se"] = paired(rewards["policy"], rewards["pretrained"])
    try:
        specs = {t: parse(t) for t in texts}
    except ScoreactionError:
        return out  # not captions of the shapes grammar: the reward only
    from scoreaction.shapes.checker import score, summarise

    caption = [task.prompts.texts[i] for i in ids.tolist()]
    cats = [category(specs[c]) for c in caption]
    binary = {}
    for m, chunks in images.items():
        pixels = (torch.cat(chunks) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        binary[m] = torch.tensor([score(p, specs[c]).binary for p, c in zip(pixels, caption)])
        out[f"accuracy_{m}" if m == "pretrained" else "accuracy"] = summarise(cats, binary[m].tolist())
    if policy is not None:
        gains = {}
        for c in out["accuracy"]["per_category"]:
            rows = torch.tensor([k for k, cat in enumerate(cats) if cat == c])
            gains[c] = dict(zip(("gain", "se"), paired(binary["policy"][rows], binary["pretrained"][rows])))
        se = math.sqrt(sum(g["se"] ** 2 for g in gains.values())) / len(gains)  # categories: disjoint samples
        out["accuracy_gain"] = {"overall": {"gain": sum(g["gain"] for g in gains.values()) / len(gains), "se": se},
                                "per_category": gains}
    return out


def prompt_log(prompts: str, policy: ScoreAsAction, task, per_prompt: int, steps: int, seed: int, **kw) -> dict:
    """A training log's figures of one eval_prompts list (a built-in list or a file), keys eval_{name}_...:
    `prompt_gain` under DDIM (eta = 0) on the scheduler's grid: the policy's reward, the paired gain and, for
    shapes captions, GenEval's overall accuracy of both models, its paired gain and the policy's per category."""
    from scoreaction.tasks.diffusers import read_prompts
    from scoreaction.train.config import prompt_label

    texts = list(dict.fromkeys(read_prompts(prompts)))
    r = prompt_gain(policy, task, texts, per_prompt, "ddim", steps, seed, grid="scheduler", **kw)
    name = f"eval_{prompt_label(prompts)}"
    out = {f"{name}_reward": r["reward"], f"{name}_gain": r["gain"], f"{name}_gain_se": r["gain_se"]}
    if "accuracy" in r:
        gain = r["accuracy_gain"]["overall"]
        out.update({f"{name}_accuracy": r["accuracy"]["overall"],
                    f"{name}_accuracy_pretrained": r["accuracy_pretrained"]["overall"],
                    f"{name}_accuracy_gain": gain["gain"], f"{name}_accuracy_gain_se": gain["se"],
                    **{f"{name}_{c}": v for c, v in r["accuracy"]["per_category"].items()}})
    return out


def solver_gain(policy: ScoreAsAction, task, solver: str, steps: int, n: int = 4096, seed: int = 0, **kw) -> dict:
    """Mean reward of policy and pretrained model under one solver and grid, and the paired gain."""
    _, r_pol = sample_with(policy, task, solver, steps, n, seed, **kw)
    _, r_pre = sample_with(policy, task, solver, steps, n, seed, pretrained=True, **kw)
    diff = (r_pol - r_pre).double()
    return {"solver": solver, "steps": steps, "reward": float(r_pol.mean()), "reward_pretrained": float(r_pre.mean()),
            "gain": float(diff.mean()), "gain_se": float(diff.std() / math.sqrt(n))}


@torch.no_grad()
def objective(policy: ScoreAsAction, task, steps: int = 200, n: int = 4096, seed: int = 0, dtype=torch.float32,
              device: str | torch.device = "cpu") -> dict:
    """J(theta) = E[r(X_T)] - beta_KL KL (Eq. E5) by rollouts of the policy's kernel on the task's uniform grid,
    with the fraction of the achievable improvement closed and distances to p* where the task knows them."""
    gen = torch.Generator().manual_seed(seed)
    x0, cond = task.start(n, generator=gen, dtype=dtype)
    x0, cond = x0.to(device), None if cond is None else cond.to(device)
    traj = policy.rollout(x0, task.grid("uniform", steps), cond, generator=gen)
    r = task.reward(traj.x_final, cond)
    J = r - task.beta_kl * traj.path_kl
    out = {"reward": float(r.mean()), "path_kl": float(traj.path_kl.mean()), "J": float(J.mean()),
           "J_se": float(J.std() / math.sqrt(n))}
    ref = task.reference()
    if ref is not None:
        out["fraction"] = (out["J"] - ref["E_pre_r"]) / (ref["J_star"] - ref["E_pre_r"])
        if task.name == "gaussian":
            mean, cov = fit_gaussian(traj.x_final)
            out["gaussian_kl"] = gaussian_kl(mean, cov, ref["p_star_mean"], ref["p_star_cov"])
        elif task.exact:
            exact = task.sample_optimal(n, generator=torch.Generator().manual_seed(seed + 1))
            floor = task.sample_optimal(n, generator=torch.Generator().manual_seed(seed + 2))
            out["sliced_w2"] = sliced_wasserstein(traj.x_final, exact, seed=seed)
            out["sliced_w2_floor"] = sliced_wasserstein(floor, exact, seed=seed)
    return out
