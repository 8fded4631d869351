"""Data-parallel training on torch.distributed (torchrun, `accelerate launch`): NCCL on GPUs, gloo on CPU.

A run on W processes is the run on one process with its batch cut into W shards, to float tolerance:

- random draws are global: every process draws the whole batch's starting points, conditions, grids and
  noise from the same generator and keeps its shard (`draw`), so a seed gives the same rollouts on any W;
- each process rolls out and rewards its shard of B / W samples;
- what an algorithm needs over the whole batch (per-prompt and group statistics, advantage normalisation,
  explained variance) it gathers (`gather`, a few floats per sample), and its value fit and policy
  minibatches are global index sets of which each process takes its members (`members`);
- a minibatch's loss is a mean over its items, so each process weights its part by its share of the
  minibatch and the gradients are summed (`sum_gradients`: one all-reduce of a flat buffer per optimiser
  step, as cleanrl's multi-GPU PPO; torch's DDP wrapper does not fit an update where a process may hold no
  item of a minibatch and the loss reaches the policy through methods other than forward);
- every process then takes the same optimiser step, so weights, optimiser and generator states stay equal,
  and process 0 alone writes logs and checkpoints, which therefore do not depend on W: a run resumes on
  any number of processes that divides its batch.

A process that dies takes the others down through the launcher; one that hangs makes the others stop at
the collective `timeout` with a one-line error instead of waiting forever.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scoreaction.errors import ScoreactionError


class DistributedError(ScoreactionError):
    """Processes of one run that disagree (batch, configuration) or a collective that failed or timed out."""


class Disagreement(DistributedError):
    """What every process finds alike (batch size, configurations): only process 0 prints it."""

    shared = True


@dataclass
class World:
    """This process's place in the run: rank in [0, size). The single-process World does no communication."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    timeout: float = 1800.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    # --- shards of the batch: process r holds samples [r b, (r + 1) b), b = B / W ------------------------
    def draw(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ N(0, I) for the whole batch (shaped like x with W times its rows), drawn on the generator's
        device; this process's rows, on x's device. With W = 1 it is policy.draw_normal."""
        device = generator.device if generator is not None else x.device
        z = torch.randn((self.size * x.shape[0], *x.shape[1:]), generator=generator, dtype=x.dtype, device=device)
        return self.shard(z).to(x.device)

    def shard(self, t: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        """This process's slice of a whole-batch tensor along `dim`."""
        if t is None or self.size == 1:
            return t
        b = t.shape[dim] // self.size
        return t.narrow(dim, self.rank * b, b)

    def members(self, idx: torch.Tensor, per_rank: int) -> torch.Tensor:
        """Local positions of the items of a global index set that this process holds.

        Items are numbered step-major, g = k B + j over the whole batch (B = W per_rank samples; per-sample
        data has k = 0), and held locally as k per_rank + (j - rank per_rank)."""
        if self.size == 1:
            return idx
        batch = self.size * per_rank
        k, j = idx // batch, idx % batch
        mine = (j // per_rank) == self.rank
        return k[mine] * per_rank + j[mine] % per_rank

    # --- collectives -------------------------------------------------------------------------------
    def gather(self, t: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        """The whole-batch tensor from every process's shard, concatenated along `dim` in rank order."""
        if t is None or self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t, device=self.device) for _ in range(self.size)]
        self._run(dist.all_gather, parts, t.to(self.device))
        return torch.cat(parts, dim=dim).to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a tensor (a new tensor; the input is unchanged)."""
        if self.size == 1:
            return t
        out = t.detach().to(self.device, copy=True)
        self._run(dist.all_reduce, out)
        return out.to(t.device)

    def sum_gradients(self, params: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replace each parameter's gradient by its sum over processes (a missing gradient counts as zero), in one
        all-reduce that also sums the vector `extra` (returned; e.g. diagnostics and flags of the step)."""
        if self.size == 1 or not params:
            return extra if self.size == 1 or extra is None else self.sum(extra)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts = [g.reshape(-1) for g in grads]
        if extra is not None:
            parts.append(extra.to(parts[0]))
        flat = self.sum(torch.cat(parts))
        for p, g in zip(params, flat.split([g.numel() for g in grads] + [len(flat) - sum(g.numel() for g in grads)])):
            p.grad = g.view_as(p).to(p.dtype)
        return None if extra is None else flat[len(flat) - len(extra):].to(extra)

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Copy process 0's values into the same tensors on every process."""
        if self.size == 1:
            return
        for t in tensors:
            buf = t.detach().to(self.device, copy=True)
            self._run(dist.broadcast, buf, 0)
            with torch.no_grad():
                t.copy_(buf.to(t.device))

    def strings(self, text: str) -> list[str]:
        """Every process's string, in rank order (UTF-8 bytes over the wire; nothing is pickled)."""
        if self.size == 1:
            return [text]
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        lengths = self.gather(torch.tensor([len(data)], dtype=torch.int64)).tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[:len(data)] = data
        rows = self.gather(padded.unsqueeze(0))
        return [bytes(row[:n].tolist()).decode() for row, n in zip(rows, lengths)]

    def barrier(self) -> None:
        if self.size > 1:
            self._run(dist.barrier)

    def _run(self, op, *args) -> None:
        try:
            op(*args)
        except (RuntimeError, dist.DistError) as err:  # gloo and NCCL raise RuntimeError subclasses
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(f"process {self.rank} of {self.size}: a collective with the other processes "
                                   f"failed or timed out after {self.timeout:g} s (did another process die or "
                                   f"hang? see its message): {first}") from err

    # --- agreement of the processes ----------------------------------------------------------------
    def check_batch(self, batch_size: int, what: str = "batch_size") -> None:
        if batch_size % self.size:
            raise Disagreement(f"{what} must be divisible by the number of processes ({self.size}), found "
                                   f"{batch_size}")

    def check_same(self, config: dict, what: str = "configuration") -> None:
        """Every process must have been given the same `config` (a JSON-able dict): the first key that differs
        from process 0's is named."""
        if self.size == 1:
            return
        text = json.dumps(config, sort_keys=True, default=str)
        digests = self.strings(hashlib.sha256(text.encode()).hexdigest())
        if len(set(digests)) == 1:
            return
        configs = [json.loads(t) for t in self.strings(text)]
        for r, other in enumerate(configs[1:], start=1):
            keys = sorted(k for k in set(configs[0]) | set(other) if configs[0].get(k) != other.get(k))
            if keys:
                raise Disagreement(f"the processes were given different {what}s: process {r} has "
                                       f"{keys[0]}={other.get(keys[0])!r}, process 0 has {configs[0].get(keys[0])!r}")


def shutdown() -> None:
    """Leave the process group, if this process joined one (also after an error: a process that exits with its
    group open may abort instead of exiting with its own code)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by a launcher of several processes (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout: float = 1800.0) -> World:
    """Join the run the launcher describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or a World of one.

    On CUDA each process takes the GPU of its LOCAL_RANK (NCCL); otherwise processes talk through gloo."""
    if not launched():
        return World(device=device, timeout=timeout)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedError(f"several processes need device cpu (gloo) or cuda (NCCL), found {device.type!r}")
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout), rank=rank, world_size=size,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"process {rank} of {size} could not join the others: {str(err).splitlines()[0]}")
    return World(rank=rank, size=size, device=device, timeout=timeout)
