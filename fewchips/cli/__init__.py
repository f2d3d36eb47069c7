"""`fewchips <command>`: the one place that wires the parts together. Each command's flags live in
its own module here (`fewchips/cli/<command>.py`, a `register(subparsers)` function); heavy imports
happen inside the command, so `fewchips --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Command modules, in the order `--help` lists them.
COMMANDS = ["info", "train", "plan", "convert", "generate", "chat", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewchips", description="DeepSeek-V3 training and serving on few chips.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"fewchips.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from ..runtime import keep_freed_memory
    keep_freed_memory()          # big tensors reuse warm pages instead of faulting fresh ones each step
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:   # bad input: one clear line, no traceback
        print(f"fewchips {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
