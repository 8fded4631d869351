"""One training loop for every algorithm, for points and images.

    rollout -> reward -> (value fit, advantages: algorithm.prepare) -> policy update (epochs x
    minibatches of algorithm.loss) -> metrics -> periodic evaluation and checkpoint

Clock: RL time t for grids and rollouts. A reward that returns NaN/inf skips the update (the weights
never see it), and so does an optimiser step whose loss, gradient or result is not finite (rolled back);
`max_skipped` updates in a row that change no weight stop the run (NonFiniteUpdates), and so does a run
that ends without one update that changed them; a reward of the wrong shape or dtype stops it at once,
with a message naming the update.

Memory: rollouts run in chunks of `rollout_batch`, and each minibatch's loss in micro-batches of
`micro_batch` transitions whose gradients accumulate (weighted by size, so the optimiser step is the
one a single pass over the minibatch gives: every algorithm's loss is a mean over its items). The
device (`device`) holds the policy, the pretrained model and the reward; random draws come from one
CPU generator, so a seed gives the same rollouts on every device.

Several processes (torchrun): each rolls out and rewards its shard of the batch, micro-batches span
processes, and process 0 alone writes; the run is the one-process run to float tolerance
(scoreaction/distributed.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scoreaction import distributed
from scoreaction.algorithms import Batch, make_algorithm
from scoreaction.config import merge, shown
from scoreaction.errors import CheckpointError, ScoreactionError
from scoreaction.evaluation import objective, prompt_log
from scoreaction.io import atomic_write_bytes
from scoreaction.outputs import RUN, claim_folder, same_path
from scoreaction.policy import ScoreAsAction
from scoreaction.rewards.images import imports_only
from scoreaction.tasks import make_task
from scoreaction.train import checkpoint
from scoreaction.train.logs import Board, cut_log
from scoreaction.train.config import TrainConfig, resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL_SEED_OFFSET = 1_000_003
RESUMABLE = ("updates", "eval_every", "eval_n", "eval_steps", "eval_prompts", "eval_per_prompt", "checkpoint_every",
             "max_skipped", "device", "rollout_batch", "micro_batch", "tensorboard", "image_every", "timeout", "out")
DIAGNOSTICS = ("loss", "approx_kl", "clipfrac", "ratio_mean")


class NonFiniteUpdates(ScoreactionError):
    """`max_skipped` updates in a row, or every update of a run, changed no weight because a reward, loss,
    gradient or optimiser step was not finite: the run stops, writing no checkpoint."""


class NonFiniteReward(NonFiniteUpdates):
    """`max_skipped` batches in a row had a non-finite reward: the run stops (the weights never saw one)."""


def build_policy(task, config: TrainConfig) -> ScoreAsAction:
    """The trainable policy of a task: its action (Task.make_action) under the task's path, eta and the kernel."""
    action = task.make_action(config.hidden)  # first: full fine-tuning may give the task a separate reference
    return ScoreAsAction(task.path, task.pretrained, action, eta=task.eta, action_noise=config.action_noise,
                         kernel=config.kernel)


def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast float32/float64 weights to dtype; frozen bf16/fp16 weights (mixed precision) stay as they are."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.dtype in (torch.float32, torch.float64):
            t.data = t.data.to(dtype)


def check_reward(r, n: int, where: str) -> torch.Tensor:
    if not torch.is_tensor(r) or r.shape != (n,) or not r.is_floating_point():
        found = f"shape {tuple(r.shape)} dtype {r.dtype}" if torch.is_tensor(r) else type(r).__name__
        raise ValueError(f"{where}: the reward must return a float tensor of shape ({n},), found {found}")
    return r


class Trainer:
    """`monitors`: name -> f(x, cond) -> (B,), evaluated on every batch's final samples and logged as
    `{name}_mean` (e.g. a hidden utility the learner never sees); they never reach the loss."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None, progress: bool = True,
                 monitors: dict | None = None, overwrite: bool = False):
        """`overwrite`: a fresh run may replace an existing run folder at `config.out` (see `run`)."""
        self.config, self.progress, self.monitors = config, progress, dict(monitors or {})
        self.overwrite = overwrite
        self.source_run = None if resume is None else checkpoint.run_folder(resume)  # the run resumed from
        self.dtype = DTYPES[config.dtype]
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.world = distributed.init(resolve_device(config.device), config.timeout)
        self.device = self.world.device
        self.world.check_batch(config.batch_size)
        self.world.check_same(config.to_dict())
        self.task = make_task(config.task)
        self.eval_n = config.eval_n or self.task.eval_n
        self.eval_steps = config.eval_steps or self.task.eval_steps
        self.policy = build_policy(self.task, config)
        self.task.to(self.device)
        cast_floating(self.policy, self.dtype)
        self.policy.to(self.device)
        self.algorithm = make_algorithm(config.algorithm, self.policy, self.task, config.algo)
        self.algorithm.world = self.world
        # DDPO's setting (beta_KL = 0): where nothing needs the pretrained model, rollouts never evaluate it
        self.policy.reference = (self.task.beta_kl > 0 or self.algorithm.needs_reference
                                 or getattr(self.policy.action, "takes_pretrained", False))
        for module in self.algorithm.modules().values():
            cast_floating(module, self.dtype)
            module.to(self.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.world.broadcast([*self.params, *(p for m in self.algorithm.modules().values() for p in m.parameters())])
        self.times: dict = {}
        self.optimizer = torch.optim.Adam(self.params, lr=self.algorithm.config.lr)
        self.step, self.trajectories, self.skipped_in_row = 0, 0, 0
        self.changed = 0  # updates of this process's run that changed the weights
        self.resumed_from: int | None = None
        self.resume_changes: dict = {}
        self.run_dir = Path(config.out)
        self.probe_reward()
        if resume is not None:
            self.load(resume)

    def probe_reward(self) -> None:
        """Call the reward on two prior draws (its own generator), so that a reward of the wrong shape or dtype
        stops the run before anything is written."""
        x, cond = self.task.start(2, generator=torch.Generator().manual_seed(self.config.seed + 1), dtype=self.dtype)
        with torch.no_grad():
            r = self.task.reward(x.to(self.device), None if cond is None else cond.to(self.device))
        check_reward(r, 2, f"task {self.task.name!r}")

    # --- one update ---------------------------------------------------------------------------
    def collect(self) -> Batch:
        cfg = self.config
        ts = self.task.grid(cfg.grid, cfg.steps, generator=self.generator)
        x0, cond = self.task.start(cfg.batch_size, generator=self.generator, dtype=self.dtype,
                                   group=cfg.algo.samples_per_condition)  # the whole batch's: keep this shard
        x0, cond = self.world.shard(x0).to(self.device), None if cond is None else self.world.shard(cond).to(self.device)
        with self.clock("rollout"):
            traj = self.policy.rollout(x0, ts, cond, chunk=cfg.rollout_batch,
                                       draw=lambda x: self.world.draw(x, self.generator))
        with self.clock("reward"), torch.no_grad():
            r = check_reward(self.task.reward(traj.x_final, cond), len(x0), f"update {self.step + 1}")
        return Batch(traj=traj, rewards=r.to(self.dtype), beta_kl=self.task.beta_kl)

    @contextlib.contextmanager
    def clock(self, phase: str):
        """Add the wall time of a phase of the update to `seconds_{phase}` (synchronising an accelerator first, so
        that its queued work is counted where it was issued)."""
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start

    def micro_batches(self, minibatch) -> list:
        """A minibatch's items (this process's part of it) cut into parts of at most `micro_batch`."""
        size, n = self.config.micro_batch, len(minibatch)
        if n == 0:
            return []
        if size is None or n <= size:
            return [minibatch]
        return [minibatch.select(idx) for idx in torch.arange(n).split(size)]

    def optimiser_step(self, minibatch, total: int) -> tuple[float, dict] | None:
        """One optimiser step on a minibatch of `total` items over all processes, of which this process holds
        `minibatch`: each micro-batch's mean loss is weighted by its share of the total and the gradients summed
        (over processes too). None if skipped because a loss or the gradient was not finite anywhere (the
        weights are unchanged then)."""
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2 * len(DIAGNOSTICS) + 1, dtype=torch.float64)  # weighted values, weights, bad
        for part in self.micro_batches(minibatch):
            weight = len(part) / total
            loss, part_diag = self.algorithm.loss(self.policy, part)
            if not torch.isfinite(loss):
                sums[-1] = 1.0
                break
            (loss * weight).backward()
            for i, key in enumerate(DIAGNOSTICS):
                value = loss.item() if key == "loss" else part_diag.get(key)
                if value is not None:
                    sums[i] += weight * value
                    sums[len(DIAGNOSTICS) + i] += weight
        sums = self.world.sum_gradients(self.params, sums)
        if sums[-1] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        diag = {key: float(sums[i] / sums[len(DIAGNOSTICS) + i]) for i, key in enumerate(DIAGNOSTICS)
                if sums[len(DIAGNOSTICS) + i] > 0}
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.algorithm.config.max_grad_norm)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        weights = [p.detach().clone() for p in self.params]
        state = copy.deepcopy(self.optimizer.state_dict())
        self.optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # roll the step back: weights and Adam
            with torch.no_grad():
                for p, w in zip(self.params, weights):
                    p.copy_(w)
            self.optimizer.load_state_dict(state)
            self.rolled_back += 1
            return None
        return float(norm), diag

    def update(self) -> dict:
        start, self.times = time.perf_counter(), {}
        batch = self.collect()
        self.trajectories += self.config.batch_size
        rewards = self.world.gather(batch.rewards)  # the whole batch's, as every figure logged below
        bad = int((~torch.isfinite(rewards)).sum())
        if bad:
            self.step += 1
            self.skipped_in_row += 1
            message = (f"update {self.step}: the reward returned {bad} non-finite value(s) in a batch of "
                       f"{len(rewards)}; update skipped")
            if self.skipped_in_row >= self.config.max_skipped:
                raise NonFiniteReward(f"{message}; stopping after {self.skipped_in_row} such batches in a row")
            return {"step": self.step, "skipped": 1, "message": message, "trajectories": self.trajectories}
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            watched = {f"{name}_mean": float(self.world.gather(f(batch.traj.x_final, batch.traj.cond)).mean())
                       for name, f in self.monitors.items()}
        with self.clock("prepare"):
            data, metrics = self.algorithm.prepare(batch, self.generator)
        metrics.update(watched)
        diags, grad_norms, skipped_steps, self.rolled_back = [], [], 0, 0
        with self.clock("update"):
            for _ in range(self.algorithm.config.epochs):
                for mb, total in self.algorithm.minibatches(data, self.generator):
                    done = self.optimiser_step(mb, total)
                    if done is None:
                        skipped_steps += 1
                        continue
                    grad_norms.append(done[0])
                    diags.append(done[1])
        self.step += 1
        self.last_samples = batch.traj.x_final[:8].detach()
        if self.rolled_back:
            tqdm.write(f"scoreaction: warning: update {self.step}: {self.rolled_back} optimiser step(s) would have made "
                       f"the weights non-finite and were rolled back", file=sys.stderr)
        self.count_change(changed=bool(grad_norms) or not skipped_steps, skipped_steps=skipped_steps)
        elapsed = time.perf_counter() - start
        metrics.update({
            "step": self.step, "trajectories": self.trajectories,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            **({"path_kl": float(self.world.gather(batch.traj.path_kl).mean())} if self.policy.reference else {}),
            "J": float(self.world.gather(batch.objective).mean()),
            "grad_norm": _mean(grad_norms), "skipped_steps": skipped_steps, "rolled_back": self.rolled_back,
            "seconds": elapsed, **{f"seconds_{k}": v for k, v in self.times.items()},
            "samples_per_s": self.config.batch_size / elapsed, "lr": lr,
            **self.memory(),
            **{key: _mean([d[key] for d in diags if key in d]) for key in DIAGNOSTICS},
        })
        return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}

    def count_change(self, *, changed: bool, skipped_steps: int) -> None:
        """Count an update that changed the weights, or one whose every optimiser step was skipped or rolled
        back as non-finite; `max_skipped` of those in a row stop the run."""
        self.skipped_in_row, self.changed = (0, self.changed + 1) if changed else (self.skipped_in_row + 1, self.changed)
        if self.skipped_in_row >= self.config.max_skipped:
            raise NonFiniteUpdates(f"update {self.step}: all {skipped_steps} optimiser step(s) were non-finite (loss, "
                                   f"gradient or new weights) and changed nothing; stopping after "
                                   f"{self.skipped_in_row} such updates in a row (max_skipped)")

    def check_changed(self) -> None:
        """The end of a run: an error if no update of it changed the weights (each was non-finite)."""
        if self.changed == 0:
            first = (self.resumed_from or 0) + 1
            raise NonFiniteUpdates(f"no update of the run ({first}..{self.step}) changed the weights: every reward or "
                                   f"optimiser step was non-finite; no checkpoint written")
        if self.skipped_in_row:
            first = self.step - self.skipped_in_row + 1
            raise NonFiniteUpdates(f"the run ended with {self.skipped_in_row} update(s) in a row ({first}..{self.step}) "
                                   f"that changed no weight (a non-finite reward or optimiser step): its final weights "
                                   f"give non-finite values; no final checkpoint written")

    def memory(self) -> dict:
        """Peak memory since the last call: the device's allocator on CUDA, and the process's resident set."""
        out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            out["peak_device_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def learning_rate(self) -> float:
        """The policy's learning rate for update self.step + 1: lr_u = lr (1 - (u - 1) / updates) if linear."""
        lr = self.algorithm.config.lr
        if self.config.lr_schedule == "linear":
            lr *= max(0.0, 1.0 - self.step / self.config.updates)
        return lr

    # --- evaluation: J(theta) on a fine grid, whatever grid training used --------------------------
    def evaluate(self, steps: int | None = None, n: int | None = None) -> dict:
        """J(theta) and the path KL, measured even where training does not evaluate the reference."""
        saved, self.policy.reference = self.policy.reference, True
        try:
            out = objective(self.policy, self.task, steps or self.eval_steps, n or self.eval_n,
                            seed=self.config.seed + EVAL_SEED_OFFSET, dtype=self.dtype, device=self.device)
        finally:
            self.policy.reference = saved
        out = {f"eval_{k}": v for k, v in out.items()}
        for prompts in self.config.eval_prompts:  # DDIM (eta = 0) on the scheduler's grid, the same seed each time
            out.update(prompt_log(prompts, self.policy, self.task, self.config.eval_per_prompt, steps or self.eval_steps,
                                  self.config.seed + EVAL_SEED_OFFSET, dtype=self.dtype))
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, metrics: dict | None = None) -> Path:
        train = {"rng": self.generator.get_state()}
        opt_tensors, opt_meta = checkpoint.optimizer_state(self.optimizer, "optimizer")
        train.update(opt_tensors)
        algo_opt_meta = {}
        for name, module in self.algorithm.modules().items():
            train.update({f"algo.{name}.{k}": v for k, v in module.state_dict().items()})
        for name, opt in self.algorithm.optimizers().items():
            tensors, algo_opt_meta[name] = checkpoint.optimizer_state(opt, f"algo.{name}")
            train.update(tensors)
        extra_tensors, extra_meta = self.algorithm.extra_state()
        train.update({f"extra.{k}": v for k, v in extra_tensors.items()})
        state = {"format": checkpoint.FORMAT, "config": self.config.to_dict(), "step": self.step,
                 "trajectories": self.trajectories, "metrics": metrics or {}, "optimizer": opt_meta,
                 "algorithm_optimizers": algo_opt_meta, "algorithm_extra": extra_meta}
        if getattr(self.task, "weights_digest", None) is not None:
            state["base_weights"] = self.task.weights_digest  # checked by `load`
        name = f"step-{self.step:06d}"
        folder = checkpoint.save(self.run_dir / "checkpoints" / name, model=self.policy.trainable_state(), train=train,
                                 state=state)
        checkpoint.mark_latest(self.run_dir, name)
        return folder

    def load(self, path: str) -> None:
        folder = checkpoint.resolve(path)
        model, train, state = checkpoint.load(folder)
        self.check_base_weights(state.get("base_weights"), folder)
        self.policy.load_trainable(model, f"checkpoint {str(folder)!r} does not match the policy")
        checkpoint.load_optimizer_state(self.optimizer, "optimizer", train, state["optimizer"])
        for name, module in self.algorithm.modules().items():
            prefix = f"algo.{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in train.items() if k.startswith(prefix)})
        for name, opt in self.algorithm.optimizers().items():
            checkpoint.load_optimizer_state(opt, f"algo.{name}", train, state["algorithm_optimizers"][name])
        self.algorithm.load_extra_state({k[6:]: v for k, v in train.items() if k.startswith("extra.")},
                                        state.get("algorithm_extra", {}))
        self.generator.set_state(train["rng"])
        self.step, self.trajectories = int(state["step"]), int(state["trajectories"])
        self.resumed_from = self.step

    def check_base_weights(self, recorded, folder) -> None:
        """A checkpoint that recorded its base model's digest (tasks with `weights_digest`) loads only on
        those weights: a one-line CheckpointError naming both digests otherwise."""
        if recorded is None:
            return
        now = getattr(self.task, "weights_digest", None)
        if not isinstance(recorded, str) or recorded != now:
            model = getattr(self.task.config, "model", self.task.name)
            was = recorded if isinstance(recorded, str) and len(recorded) < 100 else shown(recorded)
            raise CheckpointError(f"checkpoint {str(folder)!r} was trained on base weights {was}, but "
                                  f"the model {model!r} now has {now}: resume, sample and evaluate need the "
                                  f"weights the run was trained on")

    @classmethod
    def from_checkpoint(cls, path: str, overrides: dict | None = None, **kw) -> "Trainer":
        """Rebuild a run from a checkpoint (or a run folder): config, task, policy, optimisers, RNG.

        Resume continues exactly the run it names: overrides may change only what does not alter what was
        trained (RESUMABLE: more updates, evaluation and checkpoint cadence, device, memory knobs, logging);
        anything else, or fewer updates than already done, is a one-line error before anything is written. A reward
        the checkpoint names as `package.module:function` is imported only if `overrides` names it again
        (`{"task": {"reward": spec}}`, from `--set task.reward=SPEC`): a checkpoint is data and never runs code."""
        folder = checkpoint.resolve(path)
        _, _, state = checkpoint.load(folder)
        old = TrainConfig.from_dict(state["config"], f"in checkpoint {str(folder)!r}").to_dict()
        run, given = checkpoint.run_folder(folder), dict(overrides or {})
        if "out" not in given and run is not None:  # where it is pointed, not the out the checkpoint recorded
            overrides = {**given, "out": str(run)}
        for key, value in (overrides or {}).items():
            now = merge({key: old.get(key)}, {key: value})[key] if isinstance(old.get(key), dict) else value
            if key not in RESUMABLE and now != old.get(key):
                raise ScoreactionError(f"resume continues the run in {str(folder)!r}: {key} was {old.get(key)!r}, found "
                                       f"{now!r} (a resume may change only {', '.join(RESUMABLE)})")
        config = TrainConfig.from_dict(merge(state["config"], overrides or {}), "for training")
        changes = {key: [old[key], value] for key, value in config.to_dict().items() if value != old[key]}
        if config.updates < int(state["step"]):
            raise ScoreactionError(f"updates {config.updates} is fewer than the {int(state['step'])} the checkpoint "
                                   f"{str(folder)!r} has already done")
        task_overrides = (overrides or {}).get("task")
        named = [task_overrides["reward"]] if isinstance(task_overrides, dict) and "reward" in task_overrides else []
        with imports_only(named, f"checkpoint {str(folder)!r}"):  # the checkpoint's own specs never import code
            trainer = cls(config, resume=str(folder), **kw)
        trainer.resume_changes = changes
        if "out" not in given and run is None:
            trainer.run_dir = None  # a lone checkpoint folder: `run` needs out to be given
        return trainer

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.config
        if self.step >= cfg.updates:  # a resume with nothing left to do writes nothing
            return {"step": self.step, "trajectories": self.trajectories}
        if not self.world.main:
            return self.follow()
        lock = self.claim_run_dir()
        try:
            return self.lead()
        finally:
            lock.release()

    def claim_run_dir(self):
        """Lock the run folder for this process (outputs.FolderLock; a second writer is refused). A resume continues
        its own run folder; a fresh run (or a resume into another folder) takes a new or empty one, or
        replaces an existing run folder where `overwrite` says so, never a folder of anything else."""
        if self.run_dir is None:
            raise ScoreactionError("the checkpoint lies in no run folder (RUN/checkpoints/NAME): give out "
                                   "(--out RUN) to say where the resumed run writes")
        fresh = (self.resumed_from is None or self.source_run is None
                 or not same_path(self.run_dir, self.source_run))
        return claim_folder(self.run_dir, RUN, fresh=fresh, overwrite=self.overwrite, what="run folder")

    def lead(self) -> dict:
        """The loop of process 0, in the locked run folder: updates, logs, evaluations and checkpoints."""
        cfg = self.config
        if self.resumed_from is None or not (self.run_dir / "config.json").exists():
            atomic_write_bytes(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        if self.resumed_from is not None:
            cut_log(self.run_dir / "metrics.jsonl", self.resumed_from)
            with open(self.run_dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"step": self.resumed_from, "changes": self.resume_changes}) + "\n")
        log = open(self.run_dir / "metrics.jsonl", "a")
        board = Board(self.run_dir / "tensorboard", self.task, cfg.image_every) if cfg.tensorboard else None
        last: dict = {}
        bar = tqdm(total=cfg.updates, initial=self.step, desc=f"{cfg.algorithm} on {self.task.name}",
                   disable=not self.progress)
        try:
            if self.step == 0 and cfg.eval_every:  # the baseline of the curve: the pretrained policy, same seed
                log.write(json.dumps({"step": 0, "trajectories": 0, **self.evaluate()}) + "\n")
            while self.step < cfg.updates:
                metrics = self.update()
                if "message" in metrics:
                    tqdm.write(f"scoreaction: warning: {metrics['message']}", file=sys.stderr)
                elif (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.updates:
                    metrics.update(self.evaluate())
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if board is not None:
                    board.log(self.step, metrics, getattr(self, "last_samples", None))
                last = {**last, **metrics}
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save(last)
                bar.update(1)
                bar.set_postfix({k: f"{last[k]:.3g}" for k in ("reward_mean", "path_kl", "J", "eval_fraction")
                                 if k in last})
        finally:
            bar.close()
            log.close()
            if board is not None:
                board.close()
        self.check_changed()
        last["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.save(last)
        self.world.barrier()
        return last

    def follow(self) -> dict:
        """The loop of processes other than 0: the same updates, no evaluation, logs or checkpoints."""
        last: dict = {}
        while self.step < self.config.updates:
            last = self.update()
        self.check_changed()
        self.world.barrier()
        return last


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")
