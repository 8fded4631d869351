"""The `scoreaction` command. Each command group lives in its own module with `register(subparsers)`.

User errors (ValueError, TypeError, missing files) print one line and exit with code 2; nothing
the user typed produces a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from scoreaction import __version__
from scoreaction.cli import bench, export, feedback, pretrain, quickstart, reward, sample, train


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError, yaml.YAMLError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if os.environ.get("RANK", "0") != "0" and getattr(err, "shared", False):
            time.sleep(10)  # every process found it: process 0 says it, and the launcher stops the others meanwhile
            return 2
        sys.stderr.write(f"scoreaction: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("scoreaction: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
