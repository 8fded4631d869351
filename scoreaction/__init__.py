"""scoreaction: continuous-time RL fine-tuning of diffusion models, with the score as the action."""

from scoreaction.paths import GaussianPath, make_path
from scoreaction.policy import ScoreAsAction, StepOutput, Trajectory
from scoreaction.samplers import SOLVERS, get_solver, make_grid
from scoreaction.tasks import TASKS, make_task

__version__ = "0.1.0"
__all__ = ["GaussianPath", "make_path", "ScoreAsAction", "StepOutput", "Trajectory", "SOLVERS", "get_solver",
           "make_grid", "TASKS", "make_task"]
