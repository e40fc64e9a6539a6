"""Contec CMS50D+ pulse oximeter simulator: legacy stream or v4.6+ command protocol.

A synthetic patient (SpO2 around ``--spo2``, pulse around ``--pulse``, a pleth wave with a
dicrotic notch, optional desaturation episodes) is sampled at 60 Hz; finger-out episodes are
followed by a few seconds of "searching", as on the real device. Episode timings are in device
seconds (60 samples); with the default ``--every`` they equal wall-clock seconds.

The byte encoding here is written from protocols.md §6 independently of ``drivers/cms50.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from dataclasses import dataclass, field

from firmware_sim.link import DeviceLink, Handler, HostDisconnected
from firmware_sim.scenario import episode, non_negative, positive

HELP = "Contec CMS50D+ pulse oximeter (legacy 60 Hz stream or v4.6+ commands)"
RATE_HZ = 60
MAX_BURST = 600
"""At most this many samples are sent at once after the host or the machine lagged."""


@dataclass
class Vitals:
    """What the simulated device measures at one instant."""

    spo2: int
    pulse: int
    pleth: int
    beat: bool
    finger_out: bool
    searching: bool


@dataclass
class Patient:
    """A deterministic synthetic patient, advanced one 60 Hz sample at a time."""

    spo2: float = 96.0
    pulse: float = 72.0
    finger_out_every: float = 120.0
    finger_out_for: float = 4.0
    searching_for: float = 3.0
    desaturation_every: float = 0.0
    desaturation_depth: float = 8.0
    desaturation_for: float = 40.0
    sample: int = 0
    phase: float = 0.0

    def next(self) -> Vitals:
        t = self.sample / RATE_HZ
        self.sample += 1
        pulse = self.pulse + 3.0 * math.sin(2 * math.pi * t / 20.0)
        self.phase += pulse / 60.0 / RATE_HZ
        beat = self.phase >= 1.0
        self.phase %= 1.0
        spo2 = self.spo2 + 0.6 * math.sin(2 * math.pi * t / 33.0)
        desat = episode(self.desaturation_every, self.desaturation_for, t)
        if desat is not None:  # fall over a third, hold, recover over a third
            third = self.desaturation_for / 3
            depth = min(desat / third, 1.0, (self.desaturation_for - desat) / third)
            spo2 -= self.desaturation_depth * depth
        off = episode(self.finger_out_every, self.finger_out_for + self.searching_for, t)
        finger_out = off is not None and off < self.finger_out_for
        searching = off is not None and not finger_out
        wave = math.exp(-((self.phase - 0.18) / 0.07) ** 2)
        wave += 0.35 * math.exp(-((self.phase - 0.45) / 0.08) ** 2)  # dicrotic wave
        pleth = 0 if finger_out else round(10 + 90 * wave / 1.1)
        return Vitals(round(min(spo2, 100.0)), round(pulse), pleth, beat, finger_out, searching)


def encode_legacy(v: Vitals) -> bytes:
    """5 bytes: sync|beep|finger-out|strength, pleth, searching|PR bit 7|bar, PR, SpO2."""
    no_value = v.finger_out or v.searching
    pulse = 0xFF if no_value else v.pulse
    spo2 = 0x7F if no_value else v.spo2
    strength = 0 if v.finger_out else 8
    first = 0x80 | (0x40 if v.beat else 0) | (0x10 if v.finger_out else 0) | strength
    third = (0x20 if v.searching else 0) | (0x40 if pulse & 0x80 else 0) | (v.pleth >> 4 & 0x0F)
    return bytes([first, v.pleth & 0x7F, third, pulse & 0x7F, spo2 & 0x7F])


def encode_v46_live(v: Vitals) -> bytes:
    """9 bytes starting 0x01; every byte after the first has bit 7 set."""
    no_value = v.finger_out or v.searching
    status = 0xE0 | (0x01 if v.finger_out else 0) | (0x02 if v.searching else 0)
    pulse = 0x7F if no_value else min(v.pulse, 0x7E)
    spo2 = 0x7F if no_value else v.spo2
    return bytes([
        0x01, status, 0x80 | (0x40 if v.beat else 0), 0x80 | v.pleth, 0x80 | v.pleth,
        0x80 | pulse, 0x80 | spo2, 0xFF, 0xFF,
    ])


def v46_response(kind: int, payload: bytes) -> bytes:
    """A response frame: type, a byte carrying the payload's high bits, payload with bit 7 set."""
    high = 0x80
    for index, byte in enumerate(payload):
        if byte & 0x80:
            high |= 1 << index
    return bytes([kind, high]) + bytes(b | 0x80 for b in payload)


def _text(value: str, size: int) -> bytes:
    return value.encode("ascii", errors="replace")[:size].ljust(size)


@dataclass
class Cms50Simulator:
    protocol: str = "v46"
    every: float = 1 / RATE_HZ
    model: str = "CMS50D+"
    device_id: str = "SIM0001"
    keepalive_timeout: float = 15.0
    patient: Patient = field(default_factory=Patient)
    commands: list[int] = field(default_factory=list)
    """Every command code received, for tests and ``--verbose`` style inspection."""

    async def handle(self, link: DeviceLink) -> None:
        try:
            if self.protocol == "legacy":
                await self._legacy(link)
            else:
                await self._v46(link)
        except* HostDisconnected:
            pass  # the host closed the line: this session is over

    async def _send_live(self, link: DeviceLink, legacy: bool) -> None:
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while True:
            due = int((loop.time() - start) / self.every) + 1
            count = min(due - sent, MAX_BURST)
            encode = encode_legacy if legacy else encode_v46_live
            await link.write(b"".join(encode(self.patient.next()) for _ in range(count)))
            sent = due
            await asyncio.sleep(max(start + due * self.every - loop.time(), 0.002))

    async def _legacy(self, link: DeviceLink) -> None:
        async def ignore_host() -> None:
            while True:
                await link.read()

        async with asyncio.TaskGroup() as group:
            group.create_task(ignore_host())
            group.create_task(self._send_live(link, legacy=True))

    async def _v46(self, link: DeviceLink) -> None:
        buffer = bytearray()
        streaming: asyncio.Task[None] | None = None
        heard = asyncio.Event()

        async def keepalive_watch() -> None:
            nonlocal streaming
            while True:
                heard.clear()
                try:
                    async with asyncio.timeout(self.keepalive_timeout or None):
                        await heard.wait()
                except TimeoutError:
                    if streaming is not None:  # host went quiet: the device stops streaming
                        streaming.cancel()
                        streaming = None

        async with asyncio.TaskGroup() as group:
            group.create_task(keepalive_watch())
            while True:
                buffer.extend(await link.read())
                while (start := buffer.find(0x7D)) >= 0 and len(buffer) - start >= 9:
                    code = buffer[start + 2]
                    del buffer[: start + 9]
                    self.commands.append(code)
                    heard.set()
                    if code == 0xA1 and streaming is None:
                        streaming = group.create_task(self._send_live(link, legacy=False))
                    elif code in (0xA2, 0xA7):
                        if streaming is not None:
                            streaming.cancel()
                            streaming = None
                        await link.write(bytes([0x0C, 0x80]))
                    elif (answer := self._answer(code)) is not None:
                        await link.write(answer)
                if buffer.find(0x7D) < 0:
                    buffer.clear()  # noise between commands

    def _answer(self, code: int) -> bytes | None:
        if code == 0xA8:
            model = _text(self.model, 12)
            return v46_response(0x02, b"\x00" + model[:6]) + v46_response(0x02, b"\x01" + model[6:])
        if code == 0xA9:
            return v46_response(0x03, _text("CONTEC", 7))
        if code == 0xAA:
            return v46_response(0x04, _text(self.device_id, 7))
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=("legacy", "v46"), default="v46",
                        help="legacy: 19200 8O1 continuous 5-byte stream; v46: 115200 8N1, "
                        "streams after the start command (default v46)")
    parser.add_argument("--every", type=positive, default=1 / RATE_HZ, metavar="SECONDS",
                        help="seconds between live packets (default 1/60: the device's 60 Hz)")
    parser.add_argument("--spo2", type=positive, default=96.0, help="baseline SpO2 %% (default 96)")
    parser.add_argument("--pulse", type=positive, default=72.0,
                        help="baseline pulse /min (default 72)")
    parser.add_argument("--finger-out-every", type=non_negative, default=120.0, metavar="S",
                        help="a finger-out episode every S device seconds, 0 = never (default 120)")
    parser.add_argument("--finger-out-for", type=non_negative, default=4.0, metavar="S",
                        help="finger-out episode length (default 4)")
    parser.add_argument("--searching-for", type=non_negative, default=3.0, metavar="S",
                        help="'searching' after the finger is back (default 3)")
    parser.add_argument("--desaturation-every", type=non_negative, default=0.0, metavar="S",
                        help="a desaturation episode every S device seconds, 0 = never (default 0)")
    parser.add_argument("--desaturation-depth", type=non_negative, default=8.0, metavar="PCT",
                        help="SpO2 points lost at the bottom of an episode (default 8)")
    parser.add_argument("--desaturation-for", type=non_negative, default=40.0, metavar="S",
                        help="desaturation episode length (default 40)")
    parser.add_argument("--device-id", default="SIM0001",
                        help="ID answered to the v46 device-ID query (default SIM0001)")
    parser.add_argument("--keepalive-timeout", type=non_negative, default=15.0, metavar="S",
                        help="v46: stop streaming after S seconds without a host command, "
                        "0 = never (default 15)")


def create(args: argparse.Namespace) -> Handler:
    patient = Patient(
        spo2=args.spo2, pulse=args.pulse, finger_out_every=args.finger_out_every,
        finger_out_for=args.finger_out_for, searching_for=args.searching_for,
        desaturation_every=args.desaturation_every, desaturation_depth=args.desaturation_depth,
        desaturation_for=args.desaturation_for,
    )
    simulator = Cms50Simulator(
        protocol=args.protocol, every=args.every, device_id=args.device_id,
        keepalive_timeout=args.keepalive_timeout, patient=patient,
    )
    return simulator.handle
