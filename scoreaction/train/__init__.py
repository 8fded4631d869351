"""Training: config dataclass, the loop, checkpoints."""

from scoreaction.train.config import TrainConfig
from scoreaction.train.loop import Trainer, build_policy

__all__ = ["TrainConfig", "Trainer", "build_policy"]
