"""The library's own errors. Each is a ValueError whose message names the file, key or value at fault
and what was expected, so the command line prints it as one line (exit code 2).

    ScoreactionError       every error the library raises on purpose
      ConfigError          an option or a config file: unknown key, wrong type, out of range, not finite
      CheckpointError      a checkpoint or run folder that is missing, damaged or not a checkpoint
      OutputError          an output path that cannot be written as asked (a file where a folder is due)

Other modules add their own subclasses beside the code that raises them (feedback.database.StoreError,
train.loop.NonFiniteReward).
"""


class ScoreactionError(ValueError):
    """Base class of the errors the library raises on purpose."""


class ConfigError(ScoreactionError):
    """A bad option value, key or config file."""

    shared = True  # every process of a several-process run finds it: only process 0 prints it


class CheckpointError(ScoreactionError):
    """A checkpoint (or a run folder's checkpoints) missing, damaged, or not a checkpoint at all."""


class OutputError(ScoreactionError):
    """An output path that is not what the command writes: a file where a folder is due, or the reverse,
    or a file that must not be overwritten."""
