"""``medge gateway pair`` and ``medge gateway status``: enrolment and the patient-facing view.

``pair`` writes the enrolment file in the gateway's state directory (the running daemon picks
it up within a tick). ``status`` reads the status file the daemon keeps up to date and shows,
per device, when the last reading was taken and when it reached the clinic; it never shows
clinical values.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from medge import config
from medge.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

STALE_STATUS_S = 120.0
"""A status file older than this means the daemon is not running (it rewrites every few s)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("gateway", help="home gateway: pairing and status")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pair = actions.add_parser("pair", help="pair this gateway with a pseudonymous patient id")
    pair.add_argument("--config", required=True, metavar="PATH", help="the gateway's TOML config")
    pair.add_argument("--patient", required=True, metavar="PSEUDONYM",
                      help="pseudonymous patient id from the clinic (never a name or MRN)")
    pair.add_argument("--device", action="append", default=[], metavar="KIND:SERIAL",
                      help="pair only these devices (repeatable); default: every device")
    pair.add_argument("--json", action="store_true", help="machine-readable output")
    pair.set_defaults(func=pair_command)
    status = actions.add_parser("status", help="last reading taken / delivered, per device")
    status.add_argument("--config", required=True, metavar="PATH")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=status_command)


def _load(path: str) -> Any:
    from daemons.gateway.daemon import CONFIG

    return config.load(path, CONFIG)


def pair_command(args: argparse.Namespace) -> int:
    from daemons.gateway import enrolment

    try:
        cfg = _load(args.config)
        record = enrolment.make(args.patient, args.device)
        where = enrolment.save(cfg.node.state_dir, record)
    except (config.ConfigError, enrolment.EnrolmentError) as exc:
        print(f"medge gateway pair: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"medge gateway pair: cannot write the enrolment: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({**record.as_dict(), "path": str(where)}))
    else:
        devices = ", ".join(record.devices) or "all devices"
        print(f"paired with patient {record.patient} ({devices}); written to {where}")
    return EXIT_OK


def status_command(args: argparse.Namespace) -> int:
    from daemons.gateway.status_page import read_status

    try:
        cfg = _load(args.config)
    except config.ConfigError as exc:
        print(f"medge gateway status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    snapshot = read_status(cfg.node.state_dir)
    if snapshot is None:
        print("medge gateway status: no status yet (is the gateway running?)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    updated = datetime.fromisoformat(snapshot["updated_at"])
    age = (datetime.now(UTC) - updated).total_seconds()
    snapshot["running"] = age <= STALE_STATUS_S and not snapshot.get("stopped", False)
    if args.json:
        print(json.dumps(snapshot))
    else:
        print(_human(snapshot, age))
    return EXIT_OK if snapshot["running"] else EXIT_UNAVAILABLE


def _human(snapshot: dict[str, Any], age: float) -> str:
    lines = [f"gateway {snapshot['node']}: "
             + ("running" if snapshot["running"] else f"NOT RUNNING (last update {age:.0f} s ago)")
             + f"; clinic link {snapshot['clinic_link']}; "
             + ("paired" if snapshot["paired"] else "NOT PAIRED with a patient")]
    for d in snapshot["devices"]:
        lines.append(f"  {d['device']:<16} {d['connection']:<10} taken {d['last_taken'] or '—'}"
                     f"  delivered {d['last_delivered'] or '—'}"
                     + ("  (waiting to send)" if d["waiting"] else "")
                     + ("" if d["stale"] == "ok" else f"  NO DATA ({d['stale']})"))
    return "\n".join(lines)
