"""The ``medge`` command line: one entry point, subcommands registered by module.

Each module named in ``COMMANDS`` exposes ``register(subparsers)`` and sets ``func`` on its
parsers; ``func(args) -> int`` returns the exit status (see ``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medge import __version__
from medge.exitcodes import EXIT_USAGE

COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("medge.configcli", "work with configuration files"),
    "run": ("medge.runcli", "run a daemon in the foreground"),
    "sim": ("medge.simcli", "run a device simulator (firmware_sim) in the foreground"),
    "gateway": ("medge.gatewaycli", "home gateway: pairing and status"),
    "wsi": ("medge.wsicli", "whole-slide images: build, validate, send to PACS"),
    "scan": ("medge.scancli", "slide scan jobs on the microscope daemon"),
    "stage": ("medge.scancli", "the scanner stage"),
    "camera": ("medge.scancli", "the scanner cameras"),
    "pki": ("medge.pkicli", "device and operator certificates for a site"),
    "console": ("medge.consolecli", "the sonographer's teleoperation console (a local web page)"),
    "us": ("medge.uscli", "robotic ultrasound: sweeps, recordings, listing"),
}
"""Command -> (module whose ``register`` adds it, one-line help). Only the module of the
command being run is imported, so ``medge --version`` or ``medge scan status`` does not pay
for OpenCV or the console server."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medge",
        description="Edge device control and telemonitoring daemons for digital medicine.",
    )
    parser.add_argument("--version", action="version", version=f"medge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = sys.argv[1:] if argv is None else list(argv)
    chosen = next((word for word in words if not word.startswith("-")), None)
    modules = {COMMANDS[chosen][0]} if chosen in COMMANDS else set()
    registered: set[str] = set()
    for module_name in sorted(modules):
        before = set(subparsers.choices)
        importlib.import_module(module_name).register(subparsers)
        registered |= set(subparsers.choices) - before
    for name, (_, help_text) in COMMANDS.items():
        if name not in registered:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
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
