"""Small pieces shared by the home-gateway device simulators: option types, session ending."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from firmware_sim.link import DeviceLink

Device = TypeVar("Device")


def ends_on_unplug(
    session: Callable[[Device, DeviceLink], Coroutine[Any, Any, None]],
) -> Callable[[Device, DeviceLink], Coroutine[Any, Any, None]]:
    """Let a device session end quietly when the host goes away, even mid-write (a TCP reset
    surfaces as ConnectionResetError rather than HostDisconnected)."""

    @functools.wraps(session)
    async def serve(device: Device, link: DeviceLink) -> None:
        with contextlib.suppress(ConnectionError):
            await session(device, link)

    return serve


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def clock_offset(text: str) -> float:
    """Seconds the device clock is ahead (negative: behind); must keep the year in 1..9999."""
    value = float(text)
    try:
        datetime.now(UTC) + timedelta(seconds=value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text}: clock offset out of range") from None
    return value


def add_clock_offset(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--clock-offset", type=clock_offset, default=0.0, metavar="SECONDS",
                        help=f"device clock = UTC + SECONDS; may be years off (default 0{note})")
