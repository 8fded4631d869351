"""The `scoreaction` command. Each command group lives in its own module with `register(subparsers)`.

User errors (ValueError, TypeError, missing files) print one line and exit with code 2; nothing
the user typed produces a traceback. So do the errors of the machine a command runs on: a file system's
(OSError: a full disk, a read-only folder, a name too long), running out of memory, and the errors of the
libraries that read our files (cli/preflight.py words them). Any other exception is a bug: its traceback shows.
Path options are checked before a command runs (preflight.check_paths).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from scoreaction import __version__
from scoreaction.cli import bench, export, feedback, preflight, pretrain, quickstart, reward, sample, train
from scoreaction.cli import shapes


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ('scoreaction: error: ...') and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scoreaction",
                            description="Fine-tune diffusion models with continuous-time RL: the score is the action.")
    parser.add_argument("--version", action="version", version=f"scoreaction {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sample.register(sub)
    train.register(sub)
    export.register(sub)
    bench.register(sub)
    feedback.register(sub)
    reward.register(sub)
    pretrain.register(sub)
    quickstart.register(sub)
    shapes.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    flags = preflight.flag_names(parser)
    from scoreaction.models import pipeline_load

    pipeline_load.SHOW_LIBRARY_OUTPUT = bool(getattr(args, "verbose", False))  # for this command only
    try:
        preflight.check_paths(args, flags)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("scoreaction: interrupted\n")
        return 130
    except (ValueError, TypeError, yaml.YAMLError) as err:
        return report(err, str(err).splitlines()[0] if str(err).strip() else type(err).__name__)
    except (OSError, RuntimeError, *preflight.library_errors()) as err:
        message = preflight.describe(err, args, flags)
        if message is None:  # a RuntimeError that is not an allocation: a bug
            raise
        return report(err, message)


def report(err: BaseException, message: str) -> int:
    """Print the one line of a user's error; exit code 2."""
    if os.environ.get("RANK", "0") != "0" and getattr(err, "shared", False):
        time.sleep(10)  # every process found it: process 0 says it, and the launcher stops the others meanwhile
        return 2
    sys.stderr.write(f"scoreaction: error: {message}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
