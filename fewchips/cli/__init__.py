"""`fewchips <command>`: the one place that wires the parts together. Each command's flags live in
its own module here (`fewchips/cli/<command>.py`, a `register(subparsers)` function).

Imports of fewchips modules sit inside the commands' functions, not at the top of these modules:
building the parser must not import torch, so that `fewchips --help` and every command's --help start
at once (python -X importtime: `import fewchips.cli` 27 ms, `import torch` 1.2 s; torch 2.13 CPU;
tests/cli/test_cli.py checks it)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import say_error

# Command modules, in the order `--help` lists them.
COMMANDS = ["info", "data", "train", "sft", "grpo", "sample", "eval", "plan", "convert", "generate", "chat", "serve"]


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help plus each option's default, where it has one worth showing and the help text
    does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, True, argparse.SUPPRESS))
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewchips", description="DeepSeek-V3 training and serving on few chips.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"fewchips.cli.{name}").register(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        p.allow_abbrev = False               # `--step 10` is not `--steps 10`: an unknown flag, said so
    parser.set_defaults(command_parsers=sub.choices)     # for `parse`'s errors, in the subcommand's words
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Like parse_args, but an unknown flag is reported with the subcommand's usage, not the top level's."""
    args, extra = parser.parse_known_args(argv)
    commands = vars(args).pop("command_parsers", None)
    if extra:
        if commands is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(build_parser(), argv)
    import os

    from ..runtime import tune_allocator
    from ..train.config import TrainError             # torch-free, like everything imported here
    tune_allocator(int(os.environ.get("WORLD_SIZE", "1")))    # one process: speed; one of N: memory per rank
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:   # bad input: one clear line, no traceback
        say_error(args.command, e)
        return 2
    except TrainError as e:                        # a run (or its data) that cannot go on: the command says why
        say_error(args.command, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
