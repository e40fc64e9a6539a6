"""Process lifecycle for a daemon: sd_notify, the systemd watchdog, and graceful SIGTERM.

sd_notify is a datagram to ``$NOTIFY_SOCKET`` (no libsystemd). Watchdog pings come from a task
on the daemon's own event loop, so a hung loop stops them and systemd restarts the unit.
On SIGTERM/SIGINT the daemon's main coroutine is cancelled and given ``stop_timeout`` seconds
to flush, publish ``offline`` and close its ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from medge.aio import cancel_and_wait


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (``$WATCHDOG_USEC``), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Service:
    """What a daemon's main coroutine gets to talk to systemd and to learn it should stop."""

    def __init__(self, name: str, stop_timeout: float = 10.0) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.stopping = asyncio.Event()
        self._log = structlog.get_logger()

    def ready(self, status: str = "running") -> None:
        sd_notify(f"READY=1\nSTATUS={status}")
        self._log.info("service ready", status=status)

    def status(self, status: str) -> None:
        sd_notify(f"STATUS={status}")

    async def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self, main: Callable[[Service], Coroutine[Any, Any, None]]) -> int:
        """Run ``main(self)`` until it returns or a stop signal arrives; return the exit status."""
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(main(self), name=f"{self.name}-main")

        def request_stop(signame: str) -> None:
            if not self.stopping.is_set():
                self._log.info("stop requested", signal=signame)
                self.stopping.set()
                sd_notify("STOPPING=1")
                loop.call_later(self.stop_timeout, task.cancel)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop, sig.name)
        interval = watchdog_interval()
        watchdog = asyncio.create_task(self._watchdog(interval)) if interval else None
        try:
            await task
            return 0
        except asyncio.CancelledError:
            self._log.error("stop timeout exceeded; cancelled", timeout=self.stop_timeout)
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await cancel_and_wait([watchdog])
            sd_notify("STOPPING=1")
