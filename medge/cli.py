"""The ``medge`` command line: one entry point, subcommands registered by module.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)`` and sets ``func`` on its
parsers; ``func(args) -> int`` returns the exit status (see ``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medge import __version__
from medge.exitcodes import EXIT_USAGE

COMMAND_MODULES: list[str] = [
    "medge.configcli",
    "medge.runcli",
    "medge.simcli",
    "medge.gatewaycli",
    "medge.wsicli",
    "medge.scancli",
    "medge.pkicli",
    "medge.consolecli",
    "medge.uscli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medge",
        description="Edge device control and telemonitoring daemons for digital medicine.",
    )
    parser.add_argument("--version", action="version", version=f"medge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


def usage_error(message: str) -> int:
    """Print a one-line usage error and return the documented status."""
    print(f"medge: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
