"""An asyncio byte link to a device: a real tty, a pty, or a ``socket://host:port`` URL.

Drivers compose a :class:`SerialLink` (they never inherit from it), so the same driver
talks to hardware and to the simulators in ``firmware_sim`` without knowing which.
Reads are non-blocking through the event loop (``add_reader`` on the file descriptor,
or an asyncio stream for sockets): no helper threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from dataclasses import dataclass
from urllib.parse import urlparse

import serial


class LinkError(OSError):
    """The link to the device failed (unplugged, refused, closed)."""


class LinkTimeout(TimeoutError):
    """The device did not answer within the allotted time."""


@dataclass(frozen=True)
class SerialSettings:
    """Line settings; ignored for ``socket://`` links."""

    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1


class SerialLink:
    """One open connection to a device. Use ``async with SerialLink.open(url) as link``."""

    def __init__(self, url: str, settings: SerialSettings | None = None) -> None:
        self.url = url
        self.settings = settings or SerialSettings()
        self._buffer = bytearray()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._serial: serial.Serial | None = None
        self._data_ready = asyncio.Event()
        self._eof = False

    @classmethod
    def open(cls, url: str, settings: SerialSettings | None = None) -> SerialLink:
        return cls(url, settings)

    async def __aenter__(self) -> SerialLink:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        """False once the device is gone: end of file, or a connection reset (the transport
        closes without an end of file)."""
        if self._writer is not None:
            return not self._eof and not self._writer.transport.is_closing()
        return self._serial is not None and not self._eof

    async def connect(self) -> None:
        """Open the link; raise :class:`LinkError` naming the URL on failure."""
        self._buffer.clear()
        self._eof = False
        if self.url.startswith("socket://"):
            parsed = urlparse(self.url)
            if parsed.hostname is None or parsed.port is None:
                raise LinkError(f"{self.url}: expected socket://HOST:PORT")
            try:
                self._reader, self._writer = await asyncio.open_connection(
                    parsed.hostname, parsed.port
                )
            except OSError as exc:
                raise LinkError(f"{self.url}: cannot connect: {exc.strerror or exc}") from exc
            return
        try:
            port = serial.Serial(
                self.url,
                baudrate=self.settings.baudrate,
                bytesize=self.settings.bytesize,
                parity=self.settings.parity,
                stopbits=self.settings.stopbits,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, ValueError, termios.error) as exc:
            raise LinkError(f"{self.url}: cannot open: {exc}") from exc
        self._serial = port
        asyncio.get_running_loop().add_reader(port.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self._serial is not None
        try:
            data = os.read(self._serial.fileno(), 65536)
        except OSError:
            data = b""
        if not data:
            self._eof = True
            asyncio.get_running_loop().remove_reader(self._serial.fileno())
        self._buffer.extend(data)
        self._data_ready.set()

    async def _fill(self) -> None:
        """Wait for more bytes (or end of file)."""
        if self._eof:
            raise LinkError(f"{self.url}: device disconnected")
        if self._reader is not None:
            try:
                data = await self._reader.read(65536)
            except ConnectionError as exc:  # a reset: the device end vanished with bytes unread
                self._eof = True
                raise LinkError(f"{self.url}: device disconnected ({exc})") from exc
            if not data:
                self._eof = True
                raise LinkError(f"{self.url}: device disconnected")
            self._buffer.extend(data)
            return
        if self._serial is None:
            raise LinkError(f"{self.url}: link is closed")
        self._data_ready.clear()
        await self._data_ready.wait()
        if self._eof and not self._buffer:
            raise LinkError(f"{self.url}: device disconnected")

    async def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Return at least one byte (up to ``max_bytes``)."""
        async with asyncio.timeout(timeout):
            while not self._buffer:
                await self._fill()
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return data

    async def read_exactly(self, count: int, timeout: float | None = None) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self._buffer) < count:
                await self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def read_until(
        self, separator: bytes = b"\n", timeout: float | None = None, limit: int = 65536
    ) -> bytes:
        """Return bytes up to and including ``separator``."""
        async with asyncio.timeout(timeout):
            while (index := self._buffer.find(separator)) < 0:
                if len(self._buffer) > limit:
                    raise LinkError(f"{self.url}: no {separator!r} within {limit} bytes")
                await self._fill()
        end = index + len(separator)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def pending(self) -> int:
        """Bytes received and not yet read."""
        return len(self._buffer)

    def discard_input(self) -> None:
        self._buffer.clear()

    async def write(self, data: bytes) -> None:
        if self._writer is not None:
            if self._eof or self._writer.transport.is_closing():
                # the device is gone: asyncio would drop the bytes and warn on every write
                raise LinkError(f"{self.url}: device disconnected")
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._eof = True
                raise LinkError(f"{self.url}: write failed: {exc}") from exc
            return
        if self._serial is None:
            raise LinkError(f"{self.url}: link is closed")
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._serial.fileno(), view)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            except OSError as exc:
                self._eof = True
                raise LinkError(f"{self.url}: write failed: {exc}") from exc
            view = view[written:]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
            self._reader = None
        if self._serial is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._serial.fileno())
            self._serial.close()
            self._serial = None
        self._eof = True
