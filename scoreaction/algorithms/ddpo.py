"""DDPO (Black et al. 2023), Eq. E16: PPO-clip over the K-step denoising MDP.

Clock: RL time t. The advantage of every step of a trajectory is its terminal reward normalised by
running per-prompt statistics (the last `buffer_size` rewards seen for that prompt, across batches;
the batch's own statistics until `min_count` are in), clipped to +-adv_clip. No KL term in the loss:
with fold_kl (default) the reward is r - beta_KL * path KL, so DDPO optimises the same J as the rest.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import torch

from scoreaction.algorithms.base import Algorithm, AlgorithmConfig, Batch, Transitions, clipped_surrogate, rescore
from scoreaction.config import check_positive, check_positive_int, shown
from scoreaction.errors import CheckpointError


@dataclass
class DDPOConfig(AlgorithmConfig):
    lr: float = 1e-3
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    adv_clip: float = 5.0
    fold_kl: bool = True
    buffer_size: int = 1024
    min_count: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_positive("clip", self.clip)
        check_positive("adv_clip", self.adv_clip)
        check_positive_int("buffer_size", self.buffer_size)
        check_positive_int("min_count", self.min_count)


def prompt_keys(cond: torch.Tensor | None, n: int) -> list:
    if cond is None:
        return [None] * n
    return [tuple(c.reshape(-1).tolist()) for c in cond]


class PerPromptStats:
    """Running mean/std of rewards per prompt over the last `buffer_size` values (ddpo-pytorch's tracker)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict = defaultdict(lambda: deque(maxlen=buffer_size))

    def normalise(self, rewards: torch.Tensor, keys: list) -> torch.Tensor:
        out = torch.empty_like(rewards)
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            self.buffers[key].extend(rewards[idx].tolist())
            ref = torch.tensor(list(self.buffers[key]), dtype=rewards.dtype)
            if len(ref) < self.min_count:
                ref = rewards
            out[idx] = (rewards[idx] - ref.mean()) / (ref.std() + 1e-6)
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        keys = list(self.buffers)
        tensors = {f"stats.{i}": torch.tensor(list(self.buffers[k]), dtype=torch.float64) for i, k in enumerate(keys)}
        return tensors, {"stats_keys": [None if k is None else list(k) for k in keys]}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of `state`, every key and buffer checked first (a CheckpointError names what is wrong)."""
        keys = meta.get("stats_keys", [])
        where = "the checkpoint's per-prompt statistics (algorithm_extra.stats_keys, train.safetensors stats.*)"
        if not isinstance(keys, list) or any(k is not None and not (isinstance(k, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in k)) for k in keys):
            raise CheckpointError(f"{where}: stats_keys must be a list of null or lists of numbers, found {shown(keys)}")
        names = {f"stats.{i}" for i in range(len(keys))}
        if set(tensors) != names:
            odd = sorted(set(tensors) ^ names)[0]
            raise CheckpointError(f"{where}: {len(keys)} keys, but the buffer {odd!r} is "
                                  f"{'extra' if odd in tensors else 'missing'}")
        for name in sorted(names):
            buffer = tensors[name]
            if buffer.ndim != 1 or not buffer.is_floating_point() or not bool(torch.isfinite(buffer).all()):
                raise CheckpointError(f"{where}: {name} must be a 1-D tensor of finite floats, found "
                                      f"{buffer.dtype} of shape {tuple(buffer.shape)}")
        self.buffers.clear()
        for i, key in enumerate(keys):
            self.buffers[None if key is None else tuple(key)].extend(tensors[f"stats.{i}"].tolist())


class DDPO(Algorithm):
    name = "ddpo"
    Config = DDPOConfig

    def __init__(self, policy, task, config: DDPOConfig):
        super().__init__(policy, task, config)
        self.stats = PerPromptStats(config.buffer_size, config.min_count)

    def terminal_reward(self, batch: Batch) -> torch.Tensor:
        return batch.sampled_objective if self.config.fold_kl else batch.rewards

    def prepare(self, batch: Batch, generator=None):
        K = batch.traj.steps
        r = self.world.gather(self.terminal_reward(batch))  # statistics of the whole batch, on every process
        cond = self.world.gather(batch.traj.cond)
        adv = self.stats.normalise(r, prompt_keys(cond, len(r))).clamp(-self.config.adv_clip, self.config.adv_clip)
        adv = self.world.shard(adv)
        return Transitions.from_trajectory(batch.traj, adv.unsqueeze(0).expand(K, -1)), {}

    def loss(self, policy, mb: Transitions):
        log_prob, _ = rescore(policy, mb)
        surrogate, diag = clipped_surrogate(log_prob, mb.log_prob, mb.adv, self.config.clip, self.ratio_dims(mb))
        return -surrogate.mean(), diag

    def extra_state(self):
        return self.stats.state()

    def load_extra_state(self, tensors, meta):
        self.stats.load(tensors, meta)
