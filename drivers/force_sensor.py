"""The probe's axial load cell on its own serial port (line protocol MLC1, docs/force-sensor.md).

The sensor streams readings; :meth:`ForceSensor.run` keeps :attr:`ForceSensor.latest` current,
stamped with the host's monotonic clock at receipt, so the safety supervisor can tell a silent
sensor (stale stamp) and an implausible one (flags, out of range) from a real force. Lines with
a bad checksum or shape are counted and skipped, never raised into the control loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce

from drivers.serial_link import LinkError, SerialLink

FLAG_OVER_RANGE = 0x01
FLAG_BRIDGE_FAULT = 0x02


class ForceSensorError(Exception):
    """The load cell misbehaved: bad line, refused command, no answer, link lost."""


@dataclass(frozen=True)
class ForceReading:
    force_n: float
    """Axial force, compression (probe pressed into the patient) positive."""
    sequence: int
    flags: int
    received_at: float
    """Host monotonic clock when the line arrived."""

    @property
    def faulted(self) -> bool:
        return bool(self.flags)


def checksum(body: str) -> int:
    return reduce(lambda acc, char: acc ^ ord(char), body, 0)


def parse_line(raw: bytes) -> tuple[str, list[str]]:
    """``$BODY*CS`` → (kind, fields); raise :class:`ForceSensorError` naming the line."""
    text = raw.decode("ascii", "replace").strip()
    if not text.startswith("$") or len(text) < 5 or text[-3] != "*":
        raise ForceSensorError(f"malformed line {text!r}")
    body, sent = text[1:-3], text[-2:]
    try:
        sent_value = int(sent, 16)
    except ValueError:
        raise ForceSensorError(f"bad checksum field in {text!r}") from None
    if sent_value != checksum(body):
        raise ForceSensorError(f"checksum {sent} != {checksum(body):02X} in {text!r}")
    kind, *fields = body.split(",")
    return kind, fields


class ForceSensor:
    """Reader for one MLC1 load cell over a composed :class:`SerialLink`."""

    def __init__(self, link: SerialLink, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.clock = clock
        self.latest: ForceReading | None = None
        self.bad_lines = 0
        self.range_n: float | None = None
        self._reply: asyncio.Future[list[str]] | None = None
        self._reply_kind = ""
        self._new_reading = asyncio.Event()

    async def run(self) -> None:
        """Read lines until cancelled or the link fails (then :class:`ForceSensorError`)."""
        try:
            while True:
                self._handle(await self.link.read_until(b"\n", limit=256))
        except (LinkError, ConnectionError) as exc:
            if self._reply is not None and not self._reply.done():
                self._reply.set_exception(ForceSensorError(f"{self.link.url}: {exc}"))
            raise ForceSensorError(f"{self.link.url}: {exc}") from exc

    def _handle(self, raw: bytes) -> None:
        try:
            kind, fields = parse_line(raw)
            if kind == "F":
                sequence, millinewtons, flags = int(fields[0]), int(fields[1]), int(fields[2], 16)
                self.latest = ForceReading(millinewtons / 1000, sequence, flags, self.clock())
                self._new_reading.set()
                self._new_reading.clear()
                return
        except (ForceSensorError, ValueError, IndexError):
            self.bad_lines += 1
            return
        if self._reply is not None and not self._reply.done() and kind in (self._reply_kind, "E"):
            if kind == "E":
                self._reply.set_exception(ForceSensorError(f"sensor refused: {','.join(fields)}"))
            else:
                self._reply.set_result(fields)

    async def wait_reading(self, timeout: float) -> ForceReading:
        """The next reading to arrive (needs :meth:`run` running)."""
        try:
            async with asyncio.timeout(timeout):
                await self._new_reading.wait()
        except TimeoutError:
            raise ForceSensorError(f"{self.link.url}: no reading within {timeout} s") from None
        assert self.latest is not None
        return self.latest

    async def _command(self, text: str, kind: str, timeout: float) -> list[str]:
        self._reply = asyncio.get_running_loop().create_future()
        self._reply_kind = kind
        await self.link.write(text.encode("ascii") + b"\r\n")
        try:
            async with asyncio.timeout(timeout):
                return await self._reply
        except TimeoutError:
            raise ForceSensorError(f"{self.link.url}: no answer to {text!r}") from None
        finally:
            self._reply = None

    async def identify(self, timeout: float = 0.5) -> tuple[str, str, float]:
        """(model, firmware, range in N); remembers the range for plausibility checks."""
        model, firmware, range_n = await self._command("I", "I", timeout)
        self.range_n = float(range_n)
        return model, firmware, self.range_n

    async def tare(self, timeout: float = 0.5) -> float:
        """Zero the sensor with the probe in free air; returns the offset removed, in N."""
        (offset,) = await self._command("T", "T", timeout)
        return int(offset) / 1000

    async def set_rate(self, rate_hz: float, timeout: float = 0.5) -> None:
        await self._command(f"R,{rate_hz:g}", "R", timeout)
