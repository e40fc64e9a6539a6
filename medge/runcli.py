"""``medge run DAEMON --config PATH``: run a daemon in the foreground (systemd's ExecStart)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from typing import Any

from medge import config, log
from medge.exitcodes import EXIT_USAGE
from medge.service import Service

DAEMONS: dict[str, str] = {
    "gateway": "daemons.gateway.daemon",
    "microscope": "daemons.microscope.daemon",
    "manipulator": "daemons.manipulator.daemon",
}
"""Daemon name -> module providing ``CONFIG`` (a DaemonConfig schema) and
``async main(cfg, service)``."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run a daemon in the foreground")
    parser.add_argument("daemon", choices=sorted(DAEMONS), metavar="DAEMON",
                        help=f"one of: {', '.join(sorted(DAEMONS)) or '(none yet)'}")
    parser.add_argument("--config", required=True, metavar="PATH", help="the daemon's TOML config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(DAEMONS[args.daemon])
    try:
        cfg = config.load(args.config, module.CONFIG)
    except config.ConfigError as exc:
        print(f"medge run {args.daemon}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.configure(cfg.log.level, cfg.log.format, daemon=args.daemon, device=cfg.node.node)
    service = Service(args.daemon)
    status: int = asyncio.run(service.run(lambda svc: module.main(cfg, svc)))
    return status
