"""What bench/chaos and bench/soak run: one ``Part`` per daemon (gateway, scanner, robot), each
with its simulators, its own faults, its workload and its end-of-run invariants, sharing one
mosquitto, one Orthanc and one hospital subscriber (``Shared``).

A part's daemon runs as its own process (``medge run NAME --config ...``), as under systemd, so
that SIGKILL, prlimit and /proc sampling hit it and nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from medge.localbroker import Mosquitto
from medge.localpacs import Orthanc

Recovered = Callable[[], Awaitable[None]]
"""Returns once the part works again after a fault (e.g. measurements reach the hospital, the
scan job progresses, the robot follows setpoints); the rig times it, with a timeout."""

Fault = Callable[[argparse.Namespace], Awaitable[tuple[Recovered, float]]]
"""Injects one fault and ends it; returns how to see recovery and how long the fault lasted."""


@dataclass(frozen=True)
class Shared:
    """What every part connects to; owned and started by the rig before any part."""

    work: Path
    broker: Mosquitto
    pacs: Orthanc
    rate: float
    """Times the realistic pace (soak: 10; chaos: higher, for many messages)."""


@dataclass(frozen=True)
class Check:
    """One end-of-run invariant, printed as a row of the report."""

    part: str
    name: str
    ok: bool
    detail: str


class Part(Protocol):
    name: str

    def start(self, shared: Shared) -> None:
        """Start the simulators and the daemon process (blocking until they listen)."""

    def stop(self) -> None:
        """Stop everything this part started, even after a failed start; never raises."""

    def daemon_pid(self) -> int | None:
        """The daemon process, for sampling RSS/fds/threads/CPU; None while it is down."""

    @property
    def outbox_path(self) -> Path:
        """The daemon's outbox file, for draining and loss accounting (by stream and seq)."""

    def faults(self) -> Sequence[tuple[str, Fault]]:
        """This part's own faults, in schedule order (kind, fault)."""

    async def load(self) -> None:
        """The workload (scan jobs, teleoperation, ...) until cancelled; tolerates faults."""

    async def settle(self, timeout: float) -> None:
        """Bring the workload to rest at the end of the run: jobs finished or failed, the robot
        disarmed; returns at ``timeout`` at the latest."""

    async def check(self) -> list[Check]:
        """The part's invariants, after ``settle`` and the outbox drain."""
