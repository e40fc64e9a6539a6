"""The probe's axial load cell (protocol MLC1, docs/force-sensor.md) on its own serial port.

Streams ``$F,<seq>,<force_mN>,<flags>*<xor>`` lines at the configured rate and answers the
``I`` / ``T`` / ``R,<hz>`` commands. Written independently of ``drivers/force_sensor.py``.

The force comes from a callable: in one process (tests) the :class:`~firmware_sim.probe_world.
ProbeWorld` driven by the Dynamixel simulator's joints, so pressing the probe into the patient
surface reads as force; ``medge sim force`` on its own has no joints and plays a simple profile
(a constant, or a slow triangle wave up to ``--force``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from functools import reduce

from firmware_sim.link import DeviceLink, Handler, HostDisconnected

HELP = "probe force sensor (axial load cell, MLC1 line protocol) for the ultrasound manipulator"

MODEL = "MLC1"
FIRMWARE = "1.0"
FLAG_OVER_RANGE = 0x01
FLAG_BRIDGE_FAULT = 0x02


def line(body: str) -> bytes:
    checksum = reduce(lambda acc, char: acc ^ ord(char), body, 0)
    return f"${body}*{checksum:02X}\r\n".encode("ascii")


class ForceSim:
    """One load cell: tare offset, range, noise, stream rate, injectable bridge fault."""

    def __init__(
        self,
        source: Callable[[], float],
        *,
        rate_hz: float = 200.0,
        range_n: float = 100.0,
        noise_n: float = 0.02,
        seed: int | None = None,
    ) -> None:
        self.source = source
        self.rate_hz = rate_hz
        self.range_n = range_n
        self.noise_n = noise_n
        self.tare_n = 0.0
        self.bridge_fault = False
        """A broken strain-gauge bridge: the reading rails and the fault flag is set."""
        self.spike_n = 0.0
        """Added to every reading (tests inject a force spike here)."""
        self.sequence = 0
        self._rng = random.Random(seed)

    def sample(self) -> bytes:
        raw = self.source() + self.spike_n + self._rng.gauss(0.0, self.noise_n)
        flags = 0
        if self.bridge_fault:
            raw, flags = self.range_n * 1.5, FLAG_BRIDGE_FAULT
        force = raw - self.tare_n
        if abs(force) > self.range_n:
            flags |= FLAG_OVER_RANGE
            force = max(-self.range_n, min(self.range_n, force))
        self.sequence = (self.sequence + 1) % 65536
        return line(f"F,{self.sequence},{round(force * 1000)},{flags:02X}")

    def command(self, text: str) -> bytes:
        name, _, argument = text.strip().partition(",")
        if name == "I":
            return line(f"I,{MODEL},{FIRMWARE},{self.range_n:g}")
        if name == "T":
            self.tare_n = self.source()
            return line(f"T,{round(self.tare_n * 1000)}")
        if name == "R":
            try:
                rate = float(argument)
            except ValueError:
                return line("E,BAD_RATE")
            if not 1 <= rate <= 1000:
                return line("E,BAD_RATE")
            self.rate_hz = rate
            return line(f"R,{rate:g}")
        return line("E,UNKNOWN")

    async def serve(self, link: DeviceLink) -> None:
        """Stream samples while answering commands, for one host connection."""
        streamer = asyncio.create_task(self._stream(link), name="force-sim-stream")
        buffer = b""
        try:
            while True:
                buffer += await link.read()
                while b"\n" in buffer:
                    request, buffer = buffer.split(b"\n", 1)
                    await link.write(self.command(request.decode("ascii", "replace")))
        except HostDisconnected:
            pass
        finally:
            streamer.cancel()
            with contextlib.suppress(asyncio.CancelledError, HostDisconnected):
                await streamer

    async def _stream(self, link: DeviceLink) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await link.write(self.sample())
            next_at = max(next_at + 1.0 / self.rate_hz, loop.time())
            await asyncio.sleep(next_at - loop.time())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", type=float, default=0.0, metavar="N",
                        help="standalone model: the force reported, in newtons (default 0)")
    parser.add_argument("--wave-period", type=float, default=0.0, metavar="S",
                        help="if > 0, a triangle wave 0..--force with this period (default 0)")
    parser.add_argument("--rate", type=float, default=200.0, metavar="HZ",
                        help="stream rate in Hz, 1..1000 (default 200)")


def triangle(peak: float, period: float, clock: Callable[[], float]) -> Callable[[], float]:
    """A source rising from 0 to ``peak`` and back every ``period`` seconds."""
    def source() -> float:
        phase = (clock() / period) % 1.0
        return peak * (1 - abs(2 * phase - 1))
    return source


def create(args: argparse.Namespace) -> Handler:
    if not 1 <= args.rate <= 1000:
        raise SystemExit(f"--rate {args.rate}: must be within 1..1000 Hz")
    if args.wave_period < 0:
        raise SystemExit(f"--wave-period {args.wave_period}: must be >= 0")
    peak: float = args.force
    source = triangle(peak, args.wave_period, time.monotonic) if args.wave_period else None
    return ForceSim(source or (lambda: peak), rate_hz=args.rate).serve
