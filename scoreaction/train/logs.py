"""A training run's logs: metrics.jsonl (cut back on resume) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scoreaction.io import atomic_write_bytes


class Board:
    """TensorBoard beside metrics.jsonl: every numeric metric each update, and a batch's final samples as
    images every `image_every` updates where the task's samples are images (Task.images)."""

    def __init__(self, folder: Path, task, image_every: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.task, self.image_every = SummaryWriter(str(folder)), task, image_every

    def log(self, step: int, metrics: dict, samples: torch.Tensor | None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, step)
        if samples is not None and self.image_every and step % self.image_every == 0:
            with torch.no_grad():
                images = self.task.images(samples)
            if images is not None:
                self.writer.add_images("samples", images.float().cpu(), step)

    def close(self) -> None:
        self.writer.close()


def cut_log(path: Path, step: int) -> None:
    """Drop the lines of a metrics.jsonl after `step` (written after the checkpoint a resume starts from, or
    torn by a kill), so that a resumed run's log has each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
