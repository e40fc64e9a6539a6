"""Contec CMS50D+ / CMS50E / CMS50F pulse oximeters, both protocol generations.

*Legacy* firmware (19200 8O1) streams 5-byte packets at 60 Hz by itself; the first byte has
bit 7 set, the other four have it clear, which is what lets the decoder resynchronise after
garbage. *Current* firmware (v4.6+, 115200 8N1) is silent until asked: the host sends 9-byte
commands ``7D 81 <cmd> 80 80 80 80 80 80``; frames start with a type byte with bit 7 clear and
continue with bytes with bit 7 set, and the device stops streaming unless it hears from the host
now and then (keep-alive). Byte layouts: docs/pulse-oximeter.md.

:class:`PulseOximeter` is the family base: :meth:`PulseOximeter.measurements` turns the 60 Hz
sample stream into one :class:`~drivers.measurement.Measurement` per window (SpO2, pulse rate,
pleth waveform, finger-out / searching / artefact flags), runs the keep-alive and the stall
watchdog, and leaves the wire format to the ``_do_*`` hooks of :class:`Cms50Legacy` and
:class:`Cms50V46`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from drivers.measurement import Measurement, Reading, Samples
from drivers.serial_link import LinkError, SerialLink, SerialSettings

SAMPLE_RATE_HZ = 60
LEGACY_MODEL = "CMS50D+ (legacy firmware)"
USB_IDS = frozenset({(0x10C4, 0xEA60)})
"""Silicon Labs CP210x: a hint only, the same bridge sits in scales and other devices."""

LEGACY_SETTINGS = SerialSettings(baudrate=19200, bytesize=8, parity="O", stopbits=1)
V46_SETTINGS = SerialSettings(baudrate=115200, bytesize=8, parity="N", stopbits=1)

LEGACY_PACKET_SIZE = 5
V46_FRAME_SIZE = 9
MAX_FRAME_SIZE = 9

# v4.6+ command codes (third byte of a command).
CMD_LIVE_START = 0xA1
CMD_HELLO = 0xA7
CMD_HELLO_2 = 0xA2
CMD_MODEL = 0xA8
CMD_VENDOR = 0xA9
CMD_DEVICE_ID = 0xAA
CMD_KEEPALIVE = 0xAF

# v4.6+ frame types (first byte of a frame).
FRAME_LIVE = 0x01
FRAME_MODEL = 0x02
FRAME_VENDOR = 0x03
FRAME_DEVICE_ID = 0x04
FRAME_HELLO_ACK = 0x0C
V46_FRAME_LENGTHS = {
    FRAME_LIVE: 9, FRAME_MODEL: 9, FRAME_VENDOR: 9, FRAME_DEVICE_ID: 9, 0x05: 9, 0x06: 4,
    0x07: 8, 0x08: 8, 0x09: 6, 0x0A: 4, 0x0B: 4, FRAME_HELLO_ACK: 2, 0x0E: 3, 0x0F: 8,
    0x10: 3, 0x11: 9, 0x12: 8, 0x13: 9, 0x14: 9,
}
"""Frame length by type (OSCAR ``cms50f37_loader.cpp``), so unknown answers are skipped whole."""

SPO2_PLAUSIBLE = range(35, 101)
PULSE_PLAUSIBLE = range(25, 251)

FLAG_FINGER_OUT = "finger_out"
FLAG_SEARCHING = "searching"
FLAG_ARTEFACT = "artefact"
FLAG_PROBE_ERROR = "probe_error"
FLAG_SPO2_DROPPING = "spo2_dropping"
NO_SIGNAL_FLAGS = frozenset({FLAG_FINGER_OUT, FLAG_SEARCHING, FLAG_PROBE_ERROR})


class Cms50Error(Exception):
    """The oximeter misbehaved (not a link failure: those are :class:`LinkError`)."""


class OximeterSilent(Cms50Error, TimeoutError):
    """No valid sample for longer than the watchdog allows (unplugged, stalled firmware)."""


@dataclass(frozen=True)
class OximeterSample:
    """One 60 Hz sample as the device reported it; ``None`` where it reported no value."""

    spo2: int | None
    pulse_rate: int | None
    pleth: int
    flags: frozenset[str]
    beat: bool = False
    raw: bytes = b""


@dataclass(frozen=True)
class DeviceInfo:
    model: str
    device_id: str


def command(code: int, argument: int = 0) -> bytes:
    """A v4.6+ command frame; ``argument`` (7 bit) goes in byte 4 as OSCAR sends it."""
    if not 0x80 <= code <= 0xFF:
        raise ValueError(f"CMS50 command code {code:#04x} outside 0x80..0xFF")
    frame = bytearray(b"\x7d\x81" + bytes([code]) + b"\x80" * 6)
    frame[4] |= argument & 0x7F
    return bytes(frame)


def _screen(
    spo2: int | None, pulse: int | None, flags: set[str]
) -> tuple[int | None, int | None, frozenset[str]]:
    """Blank values the device cannot mean (no signal, implausible) and flag the latter."""
    if flags & NO_SIGNAL_FLAGS:
        return None, None, frozenset(flags)
    if spo2 is not None and spo2 not in SPO2_PLAUSIBLE:
        spo2 = None
        flags.add(FLAG_ARTEFACT)
    if pulse is not None and pulse not in PULSE_PLAUSIBLE:
        pulse = None
        flags.add(FLAG_ARTEFACT)
    return spo2, pulse, frozenset(flags)


def decode_legacy_packet(packet: bytes) -> OximeterSample:
    """Decode one 5-byte legacy packet (sync bit already checked by :class:`LegacyFramer`)."""
    b0, b1, b2, b3, b4 = packet
    flags: set[str] = set()
    if b0 & 0x10:
        flags.add(FLAG_FINGER_OUT)
    if b0 & 0x20:
        flags.add(FLAG_SPO2_DROPPING)
    if b2 & 0x10:
        flags.update((FLAG_PROBE_ERROR, FLAG_ARTEFACT))
    if b2 & 0x20:
        flags.add(FLAG_SEARCHING)
    pulse = ((b2 & 0x40) << 1) | (b3 & 0x7F)
    spo2 = b4 & 0x7F
    spo2_shown, pulse_shown, all_flags = _screen(
        None if spo2 == 0x7F else spo2, None if pulse == 0xFF else pulse, flags
    )
    return OximeterSample(spo2_shown, pulse_shown, b1 & 0x7F, all_flags, bool(b0 & 0x40), packet)


def decode_live_frame(frame: bytes) -> OximeterSample:
    """Decode one 9-byte v4.6+ live frame (type 0x01)."""
    if len(frame) != V46_FRAME_SIZE or frame[0] != FRAME_LIVE:
        raise Cms50Error(f"not a live frame: {frame.hex(' ')}")
    flags: set[str] = set()
    if frame[1] & 0x01:
        flags.add(FLAG_FINGER_OUT)
    if frame[1] & 0x02:
        flags.add(FLAG_SEARCHING)
    pulse = frame[5] & 0x7F
    spo2 = frame[6] & 0x7F
    spo2_shown, pulse_shown, all_flags = _screen(
        None if spo2 in (0, 0x7F) else spo2, None if pulse in (0, 0x7F) else pulse, flags
    )
    return OximeterSample(
        spo2_shown, pulse_shown, frame[3] & 0x7F, all_flags, bool(frame[2] & 0x40), frame
    )


def unstuff(frame: bytes) -> bytes:
    """Restore the high bits of a v4.6+ response: byte 1 holds the MSBs of bytes 2, 3, …"""
    if len(frame) < 2:
        return bytes(frame)
    high_bits = frame[1]
    body = bytes(
        (byte & 0x7F) | (0x80 if high_bits >> index & 1 else 0)
        for index, byte in enumerate(frame[2:])
    )
    return bytes(frame[:2]) + body


class Framer(Protocol):
    discarded: int

    def feed(self, data: bytes) -> list[bytes]: ...


class LegacyFramer:
    """Splits the legacy stream into 5-byte packets, resynchronising on the sync bit."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self.discarded = 0
        """Bytes thrown away while hunting for a sync byte (garbage, half packets)."""

    def feed(self, data: bytes) -> list[bytes]:
        self._pending.extend(data)
        packets: list[bytes] = []
        buffer, pos = self._pending, 0  # one cut at the end keeps garbage linear, not quadratic
        while pos < len(buffer):
            if not buffer[pos] & 0x80:
                pos += 1
                self.discarded += 1
                continue
            # A sync bit inside the next four bytes means this packet was cut short.
            end = min(len(buffer), pos + LEGACY_PACKET_SIZE)
            cut = next((i for i in range(pos + 1, end) if buffer[i] & 0x80), None)
            if cut is not None:
                self.discarded += cut - pos
                pos = cut
                continue
            if end - pos < LEGACY_PACKET_SIZE:
                break
            packets.append(bytes(buffer[pos:end]))
            pos = end
        del buffer[:pos]
        return packets


class V46Framer:
    """Splits the v4.6+ stream into frames: a type byte (bit 7 clear), then bytes with bit 7 set."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self.discarded = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._pending.extend(data)
        frames: list[bytes] = []
        buffer, pos = self._pending, 0  # one cut at the end keeps garbage linear, not quadratic
        while pos < len(buffer):
            length = V46_FRAME_LENGTHS.get(buffer[pos]) if not buffer[pos] & 0x80 else None
            if length is None:  # continuation byte or unknown type: hunt for the next start
                pos += 1
                self.discarded += 1
                continue
            end = min(len(buffer), pos + length)
            cut = next((i for i in range(pos + 1, end) if not buffer[i] & 0x80), None)
            if cut is not None:
                self.discarded += cut - pos
                pos = cut
                continue
            if end - pos < length:
                break
            frames.append(bytes(buffer[pos:end]))
            pos = end
        del buffer[:pos]
        return frames


class PulseOximeter(ABC):
    """A pulse oximeter on a composed :class:`SerialLink`; subclasses speak one wire format.

    :meth:`measurements` yields one Measurement per ``window`` seconds of device samples. If no
    valid packet arrives for ``silence_timeout`` seconds the driver tries ``_do_recover`` once
    and then raises :class:`OximeterSilent`; link failures propagate as :class:`LinkError`.
    """

    device_kind = "cms50"
    protocol = ""

    def __init__(
        self,
        link: SerialLink,
        *,
        device_id: str = "",
        window: float = 1.0,
        silence_timeout: float = 5.0,
        keepalive_interval: float = 5.0,
    ) -> None:
        if window <= 0 or silence_timeout <= 0 or keepalive_interval <= 0:
            raise ValueError("window, silence_timeout and keepalive_interval must be positive")
        self.link = link
        self.device_id = device_id
        self.samples_per_window = max(1, round(window * SAMPLE_RATE_HZ))
        self.silence_timeout = silence_timeout
        self.keepalive_interval = keepalive_interval
        self._framer = self._do_new_framer()

    @property
    def discarded_bytes(self) -> int:
        """Bytes dropped while resynchronising (a link-quality figure for health metrics)."""
        return self._framer.discarded

    async def identify(self, answer_within: float = 2.0) -> DeviceInfo:
        """Ask the device who it is (legacy firmware cannot say: the configured id is used)."""
        info = await self._do_identify(answer_within)
        if info.device_id and not self.device_id:
            self.device_id = info.device_id
        return info

    async def samples(self) -> AsyncIterator[OximeterSample]:
        """The raw 60 Hz samples, with keep-alive and stall watchdog."""
        await self._do_start()
        last_valid = last_keepalive = time.monotonic()
        recovered = False
        while True:
            now = time.monotonic()
            if now - last_keepalive >= self.keepalive_interval:
                await self._do_keepalive()
                last_keepalive = now
            if now - last_valid >= self.silence_timeout:
                if recovered:
                    raise OximeterSilent(
                        f"{self.link.url}: no oximeter data for {self.silence_timeout:g} s"
                    )
                await self._do_recover()
                recovered = True
                last_valid = now
            wait = min(self.keepalive_interval - (now - last_keepalive),
                       self.silence_timeout - (now - last_valid))
            try:
                data = await self.link.read(timeout=max(wait, 0.001))
            except TimeoutError:
                continue
            decoded = self._do_decode(data)
            if decoded:
                last_valid = time.monotonic()
                recovered = False
            for sample in decoded:
                yield sample

    async def measurements(self) -> AsyncIterator[Measurement]:
        """One Measurement per window: the last SpO2 and pulse shown, the pleth, all flags seen."""
        window: list[OximeterSample] = []
        async for sample in self.samples():
            window.append(sample)
            if len(window) >= self.samples_per_window:
                yield self._summarise(window)
                window = []

    def _summarise(self, window: list[OximeterSample]) -> Measurement:
        flags = frozenset().union(*(s.flags for s in window))
        last = window[-1]
        received_at = datetime.now(UTC)
        period = timedelta(seconds=1 / SAMPLE_RATE_HZ)

        def reading(quantity: str, value: int | None, unit: str) -> Reading:
            if value is None:
                return Reading(quantity, None, unit, text="no signal", flags=flags)
            return Reading(quantity, float(value), unit, flags=flags)

        return Measurement(
            device_kind=self.device_kind,
            device_id=self.device_id,
            readings=(reading("spo2", last.spo2, "%"),
                      reading("pulse_rate", last.pulse_rate, "/min")),
            received_at=received_at,
            raw=b"".join(s.raw for s in window),
            samples=(Samples("pleth", "1", period, tuple(float(s.pleth) for s in window)),),
        )

    @abstractmethod
    async def _do_start(self) -> None:
        """Make the device stream live data."""

    @abstractmethod
    def _do_decode(self, data: bytes) -> list[OximeterSample]:
        """Decode received bytes (any split) into samples, keeping partial frames."""

    @abstractmethod
    def _do_new_framer(self) -> Framer: ...

    @abstractmethod
    async def _do_identify(self, answer_within: float) -> DeviceInfo: ...

    @abstractmethod
    async def _do_keepalive(self) -> None:
        """Tell the device the host is still there."""

    @abstractmethod
    async def _do_recover(self) -> None:
        """One attempt to restart a silent device before giving up."""


class Cms50Legacy(PulseOximeter):
    """Legacy CMS50D+: a continuous 60 Hz stream that needs no commands."""

    protocol = "legacy"
    settings = LEGACY_SETTINGS

    def _do_new_framer(self) -> Framer:
        return LegacyFramer()

    async def _do_start(self) -> None:
        """The legacy device streams unasked; a packet cut by opening the port is resynced."""

    def _do_decode(self, data: bytes) -> list[OximeterSample]:
        return [decode_legacy_packet(p) for p in self._framer.feed(data)]

    async def _do_identify(self, answer_within: float) -> DeviceInfo:
        return DeviceInfo(LEGACY_MODEL, self.device_id)

    async def _do_keepalive(self) -> None:
        """The legacy stream never stops, and the device ignores what the host sends."""

    async def _do_recover(self) -> None:
        """Nothing can restart a legacy device from the host: the watchdog just gives up."""


class Cms50V46(PulseOximeter):
    """CMS50D+ v4.6+, CMS50E/EW/F: command-driven, with keep-alives."""

    protocol = "v46"
    settings = V46_SETTINGS

    def _do_new_framer(self) -> Framer:
        return V46Framer()

    async def _do_start(self) -> None:
        await self.link.write(command(CMD_LIVE_START))

    async def _do_keepalive(self) -> None:
        await self.link.write(command(CMD_KEEPALIVE))

    async def _do_recover(self) -> None:
        await self.link.write(command(CMD_HELLO) + command(CMD_LIVE_START))

    def _do_decode(self, data: bytes) -> list[OximeterSample]:
        return [
            decode_live_frame(frame)
            for frame in self._framer.feed(data)
            if frame[0] == FRAME_LIVE
        ]

    async def _do_identify(self, answer_within: float) -> DeviceInfo:
        await self.link.write(command(CMD_HELLO) + command(CMD_MODEL) + command(CMD_DEVICE_ID))
        model_parts: dict[int, str] = {}
        device_id: str | None = None
        try:
            async with asyncio.timeout(answer_within):
                while len(model_parts) < 2 or device_id is None:
                    for frame in self._framer.feed(await self.link.read()):
                        text = unstuff(frame)
                        if frame[0] == FRAME_MODEL:
                            model_parts[text[2]] = _ascii(text[3:])
                        elif frame[0] == FRAME_DEVICE_ID:
                            device_id = _ascii(text[2:])
        except TimeoutError:
            if not model_parts:
                raise Cms50Error(f"{self.link.url}: no answer to the model query") from None
        model = "".join(model_parts[k] for k in sorted(model_parts))
        return DeviceInfo(model, device_id or self.device_id)


def _ascii(data: bytes) -> str:
    return data.decode("ascii", errors="replace").replace("\x00", "").strip()


async def probe_legacy(url: str, answer_within: float = 2.0) -> DeviceInfo | None:
    """Listen for three well-formed legacy packets in a row (the device talks unasked)."""
    try:
        async with SerialLink.open(url, LEGACY_SETTINGS) as link:
            framer = LegacyFramer()
            good = 0
            async with asyncio.timeout(answer_within):
                while good < 3:
                    good += len(framer.feed(await link.read()))
            return DeviceInfo(LEGACY_MODEL, "")
    except (TimeoutError, LinkError):
        return None


async def probe_v46(url: str, answer_within: float = 2.0) -> DeviceInfo | None:
    """Ask for the model name (protocols.md §13: ``7D 81 A8 …`` is the CMS50 probe)."""
    try:
        async with SerialLink.open(url, V46_SETTINGS) as link:
            return await Cms50V46(link).identify(answer_within)
    except (Cms50Error, TimeoutError, LinkError):
        return None
