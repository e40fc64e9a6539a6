"""The device side of a serial line, reachable over TCP or a pty, with fault injection.

A simulator implements ``handler(link)``: it reads the host's bytes from ``link`` and writes
the device's answers back, exactly as the firmware would on its UART. :func:`serve` exposes
that handler on ``tcp://HOST:PORT`` (one host connection at a time, like a serial port) or on
a pseudo-terminal, so both medge's drivers and any third-party host program can open it.

This module deliberately shares no code with ``drivers/``: a simulator is an independent
implementation of the wire protocol, so a bug cannot hide on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import termios
import tty
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse


@dataclass
class Faults:
    """Switches for injected line faults; they may be changed while a simulator runs."""

    drop_rate: float = 0.0
    """Probability that one byte sent to the host is dropped."""
    corrupt_rate: float = 0.0
    """Probability that one byte sent to the host is flipped."""
    stalled: bool = False
    """While set, the device neither reads nor answers (a hung firmware)."""
    seed: int | None = None
    rng: random.Random = field(init=False, repr=False)
    disconnect_requested: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        for name in ("drop_rate", "corrupt_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        self.rng = random.Random(self.seed)

    def stall(self, on: bool = True) -> None:
        self.stalled = on

    def disconnect(self) -> None:
        """Drop the current host connection (a cable pulled out)."""
        self.disconnect_requested.set()

    def mangle(self, data: bytes) -> bytes:
        if not self.drop_rate and not self.corrupt_rate:
            return data
        out = bytearray()
        for byte in data:
            if self.rng.random() < self.drop_rate:
                continue
            if self.rng.random() < self.corrupt_rate:
                byte ^= 1 << self.rng.randrange(8)
            out.append(byte)
        return bytes(out)


class HostDisconnected(ConnectionError):
    """The host closed the line (or a disconnect fault was injected)."""


class DeviceLink:
    """The simulator's end of one host connection."""

    def __init__(
        self,
        read_raw: Callable[[], Coroutine[Any, Any, bytes]],
        write_raw: Callable[[bytes], Coroutine[Any, Any, None]],
        faults: Faults,
    ) -> None:
        self._read_raw = read_raw
        self._write_raw = write_raw
        self.faults = faults
        self.closed = False

    async def read(self) -> bytes:
        """Return the next bytes from the host; raise :class:`HostDisconnected` at the end."""
        while True:
            if self.closed:
                raise HostDisconnected("host link closed")
            try:
                data = await self._read_raw()
            except (ConnectionError, OSError) as exc:
                self.closed = True
                raise HostDisconnected(f"host line failed: {exc}") from exc
            if not data:
                self.closed = True
                raise HostDisconnected("host closed the line")
            if self.faults.stalled:
                continue  # a hung device loses what arrives while it is hung
            return data

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise HostDisconnected("host link closed")
        if self.faults.stalled:
            return
        data = self.faults.mangle(data)
        if data:
            try:
                await self._write_raw(data)
            except (ConnectionError, OSError) as exc:
                self.closed = True
                raise HostDisconnected(f"host line failed: {exc}") from exc


Handler = Callable[[DeviceLink], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Endpoint:
    """Where a simulator listens: ``tcp://HOST:PORT`` or a pty."""

    kind: str
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if text == "pty":
            return cls("pty")
        parsed = urlparse(text)
        if parsed.scheme != "tcp" or not parsed.hostname or parsed.port is None:
            raise ValueError(f"--listen {text!r}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:7000)")
        return cls("tcp", parsed.hostname, parsed.port)


class SimulatorServer:
    """Serves a handler on an endpoint; ``address`` is what a host opens (URL or pty path)."""

    def __init__(self, handler: Handler, endpoint: Endpoint, faults: Faults | None = None) -> None:
        self.handler = handler
        self.endpoint = endpoint
        self.faults = faults or Faults()
        self.address = ""
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pty_task: asyncio.Task[None] | None = None
        self._pty_fds: tuple[int, int] | None = None
        self._active: asyncio.Task[Any] | None = None

    async def start(self) -> str:
        if self.endpoint.kind == "tcp":
            self._server = await asyncio.start_server(
                self._on_tcp_client, self.endpoint.host, self.endpoint.port
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            self.address = f"socket://{host}:{port}"
        else:
            master, slave = os.openpty()
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            self._pty_fds = (master, slave)
            self.address = os.ttyname(slave)
            self._pty_task = asyncio.create_task(self._run_pty(master))
        return self.address

    async def _on_tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._active is not None and not self._active.done():
            writer.close()  # a serial port has one host at a time
            return

        async def write_raw(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def read_raw() -> bytes:
            return await reader.read(4096)

        self._active = asyncio.current_task()
        try:
            await self._run_session(DeviceLink(read_raw, write_raw, self.faults))
        except asyncio.CancelledError:
            pass  # the server is closing; this callback task is ours to end quietly
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _run_pty(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[bytes] = asyncio.Queue()

        def on_readable() -> None:
            try:
                incoming.put_nowait(os.read(master, 4096))
            except BlockingIOError:
                pass
            except OSError:
                loop.remove_reader(master)

        async def write_raw(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(master, view) :]
                except BlockingIOError:
                    await asyncio.sleep(0.001)

        loop.add_reader(master, on_readable)
        try:
            while True:  # the pty stays "plugged in"; a disconnect fault restarts the session
                await self._run_session(DeviceLink(incoming.get, write_raw, self.faults))
                while not incoming.empty():
                    incoming.get_nowait()
        finally:
            loop.remove_reader(master)

    async def _run_session(self, link: DeviceLink) -> None:
        self.connections += 1
        self.faults.disconnect_requested.clear()
        session = asyncio.create_task(self.handler(link))
        unplug = asyncio.create_task(self.faults.disconnect_requested.wait())
        try:
            await asyncio.wait({session, unplug}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.closed = True
            for task in (session, unplug):
                task.cancel()
            for task in (session, unplug):
                with contextlib.suppress(asyncio.CancelledError, HostDisconnected):
                    await task

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if self._active is not None:
                self._active.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._active
            await self._server.wait_closed()
            self._server = None
        if self._pty_task is not None:
            self._pty_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pty_task
            self._pty_task = None
        if self._pty_fds is not None:
            for fd in self._pty_fds:
                os.close(fd)
            self._pty_fds = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
