"""TensorBoard logging of a training run."""

from __future__ import annotations

from pathlib import Path

import torch


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
