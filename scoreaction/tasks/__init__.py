"""Built-in tasks: data + pretrained score + reward + exact references. `make_task(name, options)`."""

from __future__ import annotations

from scoreaction.tasks.base import Task, TaskConfig
from scoreaction.tasks.digits import DigitsConfig, DigitsTask
from scoreaction.tasks.gaussian import GaussianConfig, GaussianTask
from scoreaction.tasks.mixture import MixtureConfig, MixtureTask

TASKS = {
    "gaussian": (GaussianTask, GaussianConfig, "N(m, S) data in any dimension, quadratic reward; J*, p* in closed form (E21)"),
    "mixture": (MixtureTask, MixtureConfig, "Gaussian-mixture data (2-D default), quadratic reward; exact p* sampler (E22)"),
    "digits": (DigitsTask, DigitsConfig, "class-conditional 8x8 digits: our UNet (CFG), reward log p(class | x) of our classifier"),
}


def make_task(name: str, options: dict | None = None) -> Task:
    """Build a task by name from a dict of its config fields (unknown keys are an error)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, found {name!r}")
    task_cls, config_cls, _ = TASKS[name]
    return task_cls(config_cls.from_dict(dict(options or {}), f"for task {name!r}"))


__all__ = ["TASKS", "Task", "TaskConfig", "make_task", "GaussianTask", "MixtureTask"]
