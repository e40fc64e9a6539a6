"""``medge sim DEVICE``: run one device simulator in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from types import ModuleType
from typing import Any

from firmware_sim import SIMULATORS
from firmware_sim.link import Endpoint, Faults, SimulatorServer
from medge.aio import cancel_and_wait
from medge.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be between 0 and 1")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sim",
        help="run a device simulator (firmware_sim) in the foreground",
        description="Run a device simulator. The first line printed is the address a host opens "
        "(a socket:// URL or a pty path).",
    )
    devices = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    for name, module_name in sorted(SIMULATORS.items()):
        module = importlib.import_module(module_name)
        sub = devices.add_parser(name, help=module.HELP, description=module.HELP)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--listen", metavar="tcp://HOST:PORT", type=Endpoint.parse,
                           help="serve on a TCP port (one host at a time)")
        where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal")
        faults = sub.add_argument_group("fault injection")
        faults.add_argument("--drop-rate", type=_probability, default=0.0, metavar="P",
                            help="probability of dropping each byte sent to the host (default 0)")
        faults.add_argument("--corrupt-rate", type=_probability, default=0.0, metavar="P",
                            help="probability of flipping a bit in each byte sent (default 0)")
        faults.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
        module.add_arguments(sub)
        sub.set_defaults(func=run, sim_module=module)


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"medge sim {args.device}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:  # an option the simulator itself found inconsistent
        print(f"medge sim {args.device}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


async def _serve(args: argparse.Namespace) -> None:
    module: ModuleType = args.sim_module
    endpoint = Endpoint("pty") if args.pty else args.listen
    faults = Faults(drop_rate=args.drop_rate, corrupt_rate=args.corrupt_rate, seed=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimulatorServer(module.create(args), endpoint, faults) as server:
        print(server.address, flush=True)
        background = getattr(module, "background", None)
        task = asyncio.create_task(background(args, server)) if background else None
        await stop.wait()
        await cancel_and_wait([task])
