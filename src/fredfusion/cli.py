"""The `fredfusion` command: synth, prepare, train, eval, predict, show, export, demo, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

from fredfusion import __version__
from fredfusion.commands import NAMES
from fredfusion.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``fredfusion.commands.<name>.add_parser``)."""
    parser = argparse.ArgumentParser(prog="fredfusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fredfusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in NAMES:
        importlib.import_module(f"fredfusion.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fredfusion` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"fredfusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
