"""Tasks: data (through a pretrained score) + reward + KL weight + exact references where known.

`make_task(name, options)` builds a registered task; `register_task` adds one of your own (a
`TaskConfig` subclass with a `name` field defaulting to the task's name, and a `Task` subclass):

    @dataclass
    class MyConfig(TaskConfig):
        name: str = "mine"
        width: int = 3

    class MyTask(Task): ...

    register_task(MyTask, MyConfig, "what it is")

A package can also make its tasks available without being imported first: declare an entry point in the
group `scoreaction.tasks` (pyproject: [project.entry-points."scoreaction.tasks"] mine = "mypkg.tasks") whose
module calls `register_task` on import; `task_config` loads it when the name is asked for. docs/diffusers.md
shows a task around a network of one's own that takes text embeddings as its condition.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreaction.tasks.base import Task, TaskConfig
from scoreaction.tasks.diffusers import DiffusersConfig, DiffusersTask
from scoreaction.tasks.digits import DigitsConfig, DigitsTask
from scoreaction.tasks.gaussian import GaussianConfig, GaussianTask
from scoreaction.tasks.mixture import MixtureConfig, MixtureTask


@dataclass(frozen=True)
class TaskEntry:
    task: type[Task]
    config: type[TaskConfig]
    description: str


TASKS: dict[str, TaskEntry] = {}


def register_task(task_cls: type[Task], config_cls: type[TaskConfig], description: str = "") -> None:
    """Make a task available by name to every command and config (`task: {name: ...}`)."""
    name = config_cls().name
    if not name or task_cls.name != name:
        raise ValueError(f"a task's config must name it: {config_cls.__name__}.name defaults to {name!r}, "
                         f"{task_cls.__name__}.name is {task_cls.name!r}")
    TASKS[name] = TaskEntry(task_cls, config_cls, description)


def task_config(options: dict) -> TaskConfig:
    """A mapping {name: ..., option: value, ...} -> that task's validated config (name defaults to gaussian)."""
    if not isinstance(options, dict):
        raise ValueError(f"task must be a mapping of options with a 'name', found {options!r}")
    name = options.get("name", "gaussian")
    if name not in TASKS:
        load_plugins(name)
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, found {name!r}")
    return TASKS[name].config.from_dict({**options, "name": name}, f"for task {name!r}")


def load_plugins(name: str) -> None:
    """Import the entry point `name` of the group `scoreaction.tasks` (its module registers the task)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="scoreaction.tasks"):
        if entry.name == name:
            try:
                entry.load()
            except Exception as err:  # a plugin may fail in any way: one line naming it
                raise ValueError(f"task plugin {name!r} ({entry.value}) failed to load: {err}") from None


def make_task(name_or_config: str | TaskConfig, options: dict | None = None) -> Task:
    """Build a task from its name and a dict of its config fields (unknown keys are an error), or from a config."""
    if isinstance(name_or_config, TaskConfig):
        config = name_or_config
    else:
        config = task_config({**dict(options or {}), "name": name_or_config})
    return TASKS[config.name].task(config)


register_task(GaussianTask, GaussianConfig, "N(m, S) data in any dimension, quadratic reward; J*, p* in closed form (E21)")
register_task(MixtureTask, MixtureConfig, "Gaussian-mixture data (2-D default), quadratic reward; exact p* sampler (E22)")
register_task(DigitsTask, DigitsConfig,
              "class-conditional 8x8 digits: our UNet (CFG), reward log p(class | x) of our classifier")
register_task(DiffusersTask, DiffusersConfig,
              "a text-to-image diffusers pipeline (SD 1.x/2.x, SD3; tiny-sd, tiny-sd3 built in) with LoRA, image rewards")

__all__ = ["TASKS", "Task", "TaskConfig", "make_task", "register_task", "task_config", "GaussianTask", "MixtureTask",
           "DigitsTask", "DiffusersTask"]
