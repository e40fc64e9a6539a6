"""``medge config check PATH...``: validate daemon configs without starting anything."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from medge import config
from medge.exitcodes import EXIT_OK, EXIT_USAGE
from medge.runcli import DAEMONS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="work with configuration files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate config files (the daemon is taken from [daemon] kind or --daemon)"
    )
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.add_argument("--daemon", choices=sorted(DAEMONS),
                       help="daemon whose schema to check against (default: from the file name)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=check_configs)


def _daemon_for(path: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    return next((name for name in DAEMONS if stem.startswith(name)), None)


def check_configs(args: argparse.Namespace) -> int:
    results: list[dict[str, str]] = []
    for path in args.paths:
        daemon = _daemon_for(path, args.daemon)
        if daemon is None:
            results.append({"path": path, "ok": "false",
                            "error": f"{path}: cannot tell which daemon it configures; "
                                     f"name it <daemon>*.toml or pass --daemon"})
            continue
        schema = importlib.import_module(DAEMONS[daemon]).CONFIG
        try:
            config.load(path, schema)
        except config.ConfigError as exc:
            results.append({"path": path, "ok": "false", "error": str(exc)})
        else:
            results.append({"path": path, "ok": "true", "daemon": daemon})
    failed = [r for r in results if r["ok"] == "false"]
    if args.json:
        print(json.dumps([{**r, "ok": r["ok"] == "true"} for r in results]))
    else:
        for r in results:
            print(f"{r['path']}: ok ({r['daemon']})" if r["ok"] == "true" else r["error"],
                  file=sys.stdout if r["ok"] == "true" else sys.stderr)
    return EXIT_USAGE if failed else EXIT_OK
