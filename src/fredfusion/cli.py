"""The `fredfusion` command: prepare the FRED RGB+Event drone dataset, train, evaluate and use detectors."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from fredfusion import __version__
from fredfusion.commands import NAMES
from fredfusion.commands.flags import Parser
from fredfusion.config import ConfigError
from fredfusion.engine.errors import TrainingStopped
from fredfusion.model.weights import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, OSError)
"""What a user's mistake raises (a flag, a file, a folder, a value): one line and exit status 2."""


def build_parser() -> Parser:
    """The parser of every command (``fredfusion.commands.<name>.add_parser``)."""
    parser = Parser(prog="fredfusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fredfusion {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=Parser,
        metavar="COMMAND",
        help="what to do (COMMAND --help)",
    )
    for name in NAMES:
        importlib.import_module(f"fredfusion.commands.{name}").add_parser(sub)
    return parser


def _one_line(text: object) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fredfusion` command: 0 done, 1 a run stopped on a fault, 2 a user mistake
    (one line on stderr naming the flag or file), 130 interrupted."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].unknown(extra)
    where = f"fredfusion {args.command}"
    try:
        return int(args.func(args) or 0)
    except TrainingStopped as exc:
        print(f"{where}: stopped: {_one_line(exc.code)}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(f"{where}: error: {_one_line(exc.code)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        print(f"{where}: error: {first}; lower --batch or --imgsz", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
