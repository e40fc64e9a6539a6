"""``medge console``: the sonographer's teleoperation console (docs/console.md).

Connects to the broker with the operator's own credentials or certificate, serves the console
page on loopback and opens it in the browser. The MQTT connection lives in this process; the
page only talks to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
import webbrowser
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.x509.oid import NameOID

from medge import log
from medge.console.server import ConsoleInfo, ConsoleServer
from medge.console.settings import SettingsError, SettingsStore
from medge.console.spacemouse import SpaceMouseError, SpaceMouseReader, find_devices
from medge.exitcodes import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from medge.teleop import Broker, RobotTopics, TeleopClient


class UsageError(Exception):
    """A bad option value: one sentence for the operator."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "console", help="the sonographer's teleoperation console (a local web page)",
        description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", type=_host_port)
    parser.add_argument("--robot", required=True, metavar="SITE/NODE",
                        help="the edge node beside the robot, e.g. clinic-3/us-cart-1")
    parser.add_argument("--device", default="probe-arm",
                        help="the robot's device level (default probe-arm)")
    auth = parser.add_argument_group("operator identity (the broker's ACL is per operator)")
    auth.add_argument("--user", help="MQTT user name = the operator identity")
    auth.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    auth.add_argument("--cert", type=Path, help="client certificate (its CN is the operator)")
    auth.add_argument("--key", type=Path, help="the certificate's private key")
    auth.add_argument("--cafile", type=Path, help="CA certificate of the broker (TLS)")
    parser.add_argument("--port", type=int, default=0,
                        help="loopback port for the page (default: any free port)")
    parser.add_argument("--no-browser", action="store_true",
                        help="print the URL only; do not open a browser")
    parser.add_argument("--pose", action="append", dest="poses", metavar="NAME",
                        help="a named pose offered on the page (repeatable; default home)")
    parser.add_argument("--spacemouse", default="auto", metavar="auto|off|/dev/hidrawN",
                        help="SpaceMouse input (default: the first one found)")
    parser.set_defaults(func=run)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    log.configure("info", stream="stderr", daemon="console")  # stdout carries the URL
    try:
        return asyncio.run(_serve(args))
    except (UsageError, SettingsError) as exc:
        print(f"medge console: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (aiomqtt.MqttError, OSError, SpaceMouseError) as exc:
        print(f"medge console: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def identity(args: argparse.Namespace) -> tuple[str, Broker]:
    """The operator identity and how to reach the broker as that operator."""
    host, port = args.broker
    tls = None
    if args.cert is not None or args.key is not None:
        if args.cert is None or args.key is None:
            raise UsageError("--cert and --key go together")
        tls = ssl.create_default_context(cafile=args.cafile)
        try:
            tls.load_cert_chain(args.cert, args.key)
            names = x509.load_pem_x509_certificate(args.cert.read_bytes()).subject
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise UsageError(f"--cert/--key: {exc}") from None
        common_names = names.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not common_names:
            raise UsageError(f"--cert {args.cert}: no common name (CN) to use as the operator")
        operator = str(common_names[0].value)
    elif args.cafile is not None:
        tls = ssl.create_default_context(cafile=args.cafile)
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--password-file {args.password_file}: {exc.strerror}") from None
    if tls is None or args.cert is None:
        if not args.user:
            raise UsageError("give --user (with --password-file) or --cert/--key: the console "
                             "acts as one named operator")
        operator = args.user
    return operator, Broker(host, port, username=args.user, password=password, tls=tls)


@contextlib.asynccontextmanager
async def _spacemouse(choice: str) -> AsyncIterator[SpaceMouseReader | None]:
    if choice == "off":
        yield None
        return
    if choice == "auto":
        devices = find_devices()
        if not devices:
            yield None
            return
        path, combined = devices[0].path, devices[0].combined
    else:
        path, combined = Path(choice), False
    async with SpaceMouseReader(path, combined) as reader:
        yield reader


async def _serve(args: argparse.Namespace) -> int:
    operator, broker = identity(args)
    site, sep, node = args.robot.partition("/")
    if not sep:
        raise UsageError(f"--robot {args.robot!r}: expected SITE/NODE")
    try:
        topics = RobotTopics(site, node, args.device)
        store = SettingsStore(operator)
    except ValueError as exc:
        raise UsageError(f"--robot/--device/operator: {exc}") from None
    info = ConsoleInfo(operator, f"{broker.host}:{broker.port}", topics.prefix,
                       tuple(args.poses or ("home",)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with TeleopClient(broker, topics, operator) as client, \
            _spacemouse(args.spacemouse) as mouse, \
            ConsoleServer(client, info, store, spacemouse=mouse, port=args.port) as server:
        print(f"medge console for {operator} on {topics.prefix}: {server.url}", flush=True)
        if not args.no_browser:
            await asyncio.to_thread(webbrowser.open, server.url)
        await stop.wait()
    return EXIT_OK
