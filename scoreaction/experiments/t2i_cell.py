"""One (method, seed) cell of `scoreaction bench --task t2i` (experiments/t2i.py), in the process that runs
`child_main`: train, evaluate along the way and at the end, return JSON.

A learner has `step()` (one update of B trajectories) and `sync()` (make `trainer.policy` the current policy):
scoreaction's methods train `trainer` itself; TRL's DDPOTrainer trains its own pipeline, and `sync` copies its peft
LoRA weights into a scoreaction policy with the same rank, alpha and targets (peft names both the same once the
adapter name is dropped: `get_peft_model_state_dict` / `set_peft_model_state_dict`). Every method is then evaluated
by the same functions (evaluation.prompt_gain, Trainer.evaluate, the CLIP diversity and the image grid).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from scoreaction.io import atomic_write_bytes


def child_main(cell_json: str, result_path: str) -> None:
    from scoreaction.experiments.finetune_results import jsonable

    atomic_write_bytes(Path(result_path), json.dumps(jsonable(run_cell(json.loads(cell_json)))).encode())


def run_cell(cell: dict) -> dict:
    """U updates with an evaluation at update 0, every E updates and at the end; the clocks count training only."""
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(cell["threads"])
    torch.manual_seed(cell["seed"])
    learner = (trl_learner if cell["method"] == "trl" else scoreaction_learner)(cell)
    curve, cpu, wall, eval_seconds = [], 0.0, 0.0, 0.0
    for update in range(cell["updates"] + 1):
        if update:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            learner.step()
            cpu, wall = cpu + time.process_time() - cpu0, wall + time.perf_counter() - wall0
        if update % cell["eval_every"] == 0 or update == cell["updates"]:
            start = time.perf_counter()
            learner.sync()
            curve.append({"update": update, "trajectories": update * cell["batch_size"], "cpu_seconds": cpu,
                          "wall_seconds": wall, **{name: accuracy(learner.trainer, cell, cell["prompts"][name])
                                                   for name in ("train", "heldout")}})
            eval_seconds += time.perf_counter() - start
    start = time.perf_counter()
    final = finish(learner.trainer, cell)
    return {"curve": curve, **final, "weights_digest": learner.trainer.task.weights_digest,
            "eval_seconds": eval_seconds, "final_seconds": time.perf_counter() - start, **learner.extra()}


def accuracy(trainer, cell: dict, texts: list[str], solver: str = "ddim", steps: int | None = None) -> dict:
    """prompt_gain on `texts`, eta = 0, the scheduler's grid, the cell's evaluation noise."""
    from scoreaction.evaluation import prompt_gain

    return prompt_gain(trainer.policy, trainer.task, texts, cell["per_prompt"], solver, steps or cell["steps"],
                       seed=cell["eval_seed"], grid="scheduler", eta=0.0)


def finish(trainer, cell: dict) -> dict:
    """Solver gains on the training prompts, the path KL at K steps, the CLIP diversity and the image grid."""
    solvers = [accuracy(trainer, cell, cell["prompts"]["train"], name, steps) for name, steps in cell["solvers"]]
    path_kl = trainer.evaluate(steps=cell["steps"], n=cell["kl_n"])["eval_path_kl"]
    images = grid_images(trainer, cell)
    if cell["grid"]:
        save_grid(images, cell["prompts"]["grid"], cell["grid"], f"{cell['method']}, seed {cell['seed']}")
    return {"solvers": solvers, "path_kl": path_kl, "diversity": diversity(images, cell),
            "grid": cell["grid"] and Path(cell["grid"]).name}


@torch.no_grad()
def grid_images(trainer, cell: dict) -> dict:
    """diversity_per_prompt images of each grid prompt from the policy and the pretrained model, same noise."""
    from scoreaction.evaluation import sample_with

    task = trainer.task
    ids = task.add_prompts(cell["prompts"]["grid"]).repeat_interleave(cell["diversity_per_prompt"])
    return {who: task.images(sample_with(trainer.policy, task, "ddim", cell["steps"], len(ids), cell["eval_seed"],
                                         grid="scheduler", cond=ids, pretrained=who == "pretrained")[0])
            for who in ("policy", "pretrained")}


@torch.no_grad()
def diversity(images: dict, cell: dict) -> dict:
    """The variance (trace of the covariance) of the shipped CLIP's normalised image embeddings among the images of
    one prompt, averaged over the grid prompts, for the policy and the pretrained model."""
    from scoreaction.rewards.images import image_embeddings, load_clip

    model, prep = load_clip(Path(cell["model_dir"]) / "clip", "clip:shapes")
    out, shape = {}, (len(cell["prompts"]["grid"]), cell["diversity_per_prompt"], -1)
    for who, x in images.items():
        e = image_embeddings(model, prep, x).double().view(shape)
        out[who] = float(((e - e.mean(1, keepdim=True)) ** 2).sum((1, 2)).mean() / (e.shape[1] - 1))
    return out


def save_grid(images: dict, texts: list[str], path: str, title: str) -> None:
    """A PNG: one row per prompt, its first pretrained image beside the fine-tuned one from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = len(images["policy"]) // len(texts)
    fig, axes = plt.subplots(len(texts), 2, figsize=(4.4, 2.2 * len(texts)), squeeze=False)
    for i, text in enumerate(texts):
        for j, who in enumerate(("pretrained", "policy")):
            axes[i, j].imshow(images[who][i * per].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_title(f"{'pre-trained' if who == 'pretrained' else 'fine-tuned'}\n{text}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- learners ---------------------------------------------------------------------------------------------------
def make_trainer(cell: dict, algorithm: str):
    """scoreaction's Trainer on the cell's pipeline folder, the shapes-train prompts and the checker's reward."""
    from scoreaction.train import TrainConfig, Trainer

    algo = {"lr": cell["lr"], **cell["algo"], **({"group_size": math.gcd(cell["batch_size"], 4)}
                                                 if algorithm == "grpo" else {}),
            **({"adv_clip": cell["adv_clip"]} if algorithm == "ddpo" else {})}
    task = {"name": "diffusers", "model": cell["model_dir"], "prompts": "shapes-train", "reward": cell["reward"],
            "guidance_scale": cell["guidance_scale"], "beta_kl": cell["beta_kl"], "eta": cell["eta"],
            "lora_rank": cell["lora_rank"], "lora_alpha": float(cell["lora_rank"]), "seed": cell["seed"]}
    config = TrainConfig.from_dict({"task": task, "algorithm": algorithm, "algo": algo, "kernel": "ddim",
                                    "grid": "scheduler", "steps": cell["steps"], "batch_size": cell["batch_size"],
                                    "updates": cell["updates"], "seed": cell["seed"], "device": cell["device"],
                                    "eval_every": 0, "tensorboard": False,
                                    "out": tempfile.mkdtemp(prefix="scoreaction-t2i-run-")}, "for bench t2i")
    return Trainer(config, progress=False)


def scoreaction_learner(cell: dict) -> SimpleNamespace:
    trainer = make_trainer(cell, cell["method"])
    return SimpleNamespace(trainer=trainer, step=trainer.update, sync=lambda: None, extra=dict)


def trl_learner(cell: dict) -> SimpleNamespace:
    """TRL 0.23.1's DDPOTrainer (DefaultDDPOStableDiffusionPipeline: LoRA r = 4 on to_k, to_q, to_v, to_out.0) on
    the same folder, prompts drawn from shapes-train, the checker's score of its images as the reward, advantages
    normalised per prompt as scoreaction's ddpo does (its buffer size and minimum count)."""
    from accelerate import PartialState
    from trl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from scoreaction.algorithms.ddpo import DDPOConfig
    from scoreaction.experiments.diffusers_jobs import ddpo_config
    from scoreaction.shapes.checker import score
    from scoreaction.tasks.diffusers import read_prompts

    PartialState(cpu=cell["device"] == "cpu")  # accelerate's logging needs its state before the pipeline warns
    pipe = DefaultDDPOStableDiffusionPipeline(cell["model_dir"], use_lora=True)
    texts, rng, binary = read_prompts("shapes-train"), random.Random(cell["seed"]), cell["reward"].endswith("binary")

    def reward(images, prompts, metadata):
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = [score(p, text) for p, text in zip(pixels, prompts)]
        return torch.tensor([s.binary if binary else s.partial for s in scores]), {}

    config = ddpo_config(updates=cell["updates"], seed=cell["seed"], device=cell["device"], precision="fp32",
                         steps=cell["steps"], eta=cell["eta"], guidance_scale=cell["guidance_scale"],
                         batch_size=cell["batch_size"], minibatches=cell["algo"]["minibatches"],
                         epochs=cell["algo"]["epochs"], lr=cell["lr"], clip=cell["algo"]["clip"],
                         adv_clip=cell["adv_clip"], per_prompt_stat_tracking=True,  # as scoreaction's ddpo
                         per_prompt_stat_tracking_buffer_size=DDPOConfig.buffer_size,
                         per_prompt_stat_tracking_min_count=DDPOConfig.min_count)
    trl = DDPOTrainer(config, reward, lambda: (rng.choice(texts), {}), pipe)
    trl.sd_pipeline.set_progress_bar_config(disable=True)
    trainer = make_trainer(cell, "ddpo")  # evaluates TRL's weights: its policy is never trained
    epochs = iter(range(cell["updates"]))
    learner = SimpleNamespace(trainer=trainer, step=lambda: trl.step(next(epochs), 0),
                              sync=lambda: copy_lora(pipe.unet, trainer.task.denoiser))
    learner.extra = lambda: {"trl_copy_max_diff": copy_check(pipe.unet, trainer.task.denoiser)}
    return learner


def copy_lora(source, target) -> None:
    """TRL's peft adapter ("default") into scoreaction's (models/pipeline.ADAPTER): same rank, alpha and targets,
    and the same parameter names once peft drops the adapter name; anything else is an error."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from scoreaction.models.pipeline import ADAPTER, lora_state_dict

    theirs, ours = source.peft_config["default"], target.peft_config[ADAPTER]
    same = (theirs.r, theirs.lora_alpha, set(theirs.target_modules)) == (ours.r, ours.lora_alpha,
                                                                        set(ours.target_modules))
    weights = get_peft_model_state_dict(source, adapter_name="default")
    if not same or set(weights) != set(lora_state_dict(target)):
        raise ValueError(f"TRL's LoRA (r={theirs.r}, alpha={theirs.lora_alpha}, {len(weights)} tensors) does not match "
                         f"scoreaction's (r={ours.r}, alpha={ours.lora_alpha}, {len(lora_state_dict(target))})")
    result = set_peft_model_state_dict(target, weights, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise ValueError(f"TRL's LoRA weights {result.unexpected_keys[:3]} have no place in scoreaction's policy")


@torch.no_grad()
def copy_check(source, target) -> float:
    """The largest difference between the two UNets' outputs on one random input, after the copy."""
    gen = torch.Generator().manual_seed(0)
    cfg = target.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2, 7, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    a, b = (unet(x, t, encoder_hidden_states=text).sample for unet in (source, target))
    return float((a.float() - b.float()).abs().max())
