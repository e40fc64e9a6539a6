"""``medge us``: sweeps and recordings of the robotic ultrasound (docs/ultrasound.md).

Each command is one MQTT 5 request on the robot's ``cmd/{operator}/us`` topic, answered on the
operator's reply topic (the envelope of docs/teleop.md); the CLI prints the reply's detail as
JSON and exits 0 if the daemon granted it, 1 with the reason if it refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiomqtt

from daemons.manipulator.teleop_protocol import Reply
from daemons.manipulator.ultrasound import US_COMMANDS
from medge import log
from medge.consolecli import UsageError, _host_port, identity
from medge.exitcodes import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from medge.mqtt import PublishRefused
from medge.teleop import RequestTimeout, RobotTopics, TeleopClient

EXIT_REFUSED = 1
SWEEP_ACTIONS = {"start": "sweep_start", "pause": "sweep_pause", "resume": "sweep_resume",
                 "abort": "sweep_abort", "take-over": "take_over", "hand-back": "hand_back"}


@dataclass(frozen=True)
class UsTopics(RobotTopics):
    """The robot's topics with requests going to ``cmd/{operator}/us``."""

    def request(self, operator: str) -> str:
        return super().request(operator).removesuffix("/request") + "/us"


@dataclass(frozen=True)
class _CommandName:
    """Stands in for a teleoperation :class:`Command`: the request envelope is the same, only
    the command names (``daemons.manipulator.ultrasound.US_COMMANDS``) differ."""

    value: str


async def us_request(client: TeleopClient, command: str, args: dict[str, Any] | None = None,
                     timeout: float = 10.0) -> Reply:
    """One ultrasound request through a client made with :class:`UsTopics`."""
    if command not in US_COMMANDS:
        raise UsageError(f"unknown ultrasound command {command!r}")
    return await client.request(cast(Any, _CommandName(command)), args, timeout)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "us", help="robotic ultrasound: sweeps, recordings, listing",
        description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", type=_host_port)
    parser.add_argument("--robot", required=True, metavar="SITE/NODE")
    parser.add_argument("--device", default="probe-arm")
    parser.add_argument("--user", help="MQTT user name = the operator identity")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--cert", type=Path, help="client certificate (CN = operator)")
    parser.add_argument("--key", type=Path)
    parser.add_argument("--cafile", type=Path)
    parser.add_argument("--timeout", type=float, default=10.0)
    commands = parser.add_subparsers(dest="us_command", required=True)
    sweep = commands.add_parser("sweep", help="start a named sweep, or steer the running one")
    sweep.add_argument("action", choices=sorted(SWEEP_ACTIONS))
    sweep.add_argument("name", nargs="?", help="the sweep's name (for start)")
    record = commands.add_parser("record", help="start or stop a manual recording")
    record.add_argument("action", choices=["start", "stop"])
    record.add_argument("--label", default="manual")
    commands.add_parser("list", help="sweeps, the running sweep and recording, files written")
    parser.set_defaults(func=run)


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.us_command == "list":
        return "list", {}
    if args.us_command == "record":
        return ("record_start", {"label": args.label}) if args.action == "start" \
            else ("record_stop", {})
    if args.action == "start":
        if not args.name:
            raise UsageError("sweep start needs the sweep's NAME (see `medge us list`)")
        return "sweep_start", {"name": args.name}
    return SWEEP_ACTIONS[args.action], {}


def run(args: argparse.Namespace) -> int:
    log.configure("warning", stream="stderr", daemon="us")  # stdout carries the reply
    try:
        return asyncio.run(_run(args))
    except UsageError as exc:
        print(f"medge us: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (aiomqtt.MqttError, OSError, RequestTimeout, PublishRefused) as exc:
        print(f"medge us: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


async def _run(args: argparse.Namespace) -> int:
    command, command_args = request_of(args)
    operator, broker = identity(args)
    site, sep, node = args.robot.partition("/")
    try:
        if not sep:
            raise ValueError("expected SITE/NODE")
        topics = UsTopics(site, node, args.device)
    except ValueError as exc:
        raise UsageError(f"--robot/--device: {exc}") from None
    async with TeleopClient(broker, topics, operator) as client:
        reply = await us_request(client, command, command_args, args.timeout)
    print(json.dumps({"ok": reply.ok, "reason": reply.reason, **reply.detail}, indent=2))
    return EXIT_OK if reply.ok else EXIT_REFUSED
