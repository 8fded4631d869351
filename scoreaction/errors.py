"""The library's own errors. Each is a ValueError whose message names what was expected and what was
found, so the command line prints it as one line (exit code 2)."""


class ScoreactionError(ValueError):
    """Base class of the errors the library raises on purpose."""
