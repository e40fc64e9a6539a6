"""Urine strip analyzer sending ASTM E1381/E1394 results, as the instrument (sender) does.

Every ``--every`` seconds the "patient" dips a strip; the result goes into the analyzer's memory
(a queue that survives disconnections, like a real device's result memory) and is sent as one
E1394 message (H, P, O, R×10, L) in an E1381 session: ENQ → frames → EOT. The sender follows
the standard: NAK or no answer to ENQ → retry after a pause; ENQ answered by ENQ (contention)
→ the instrument wins and retries after 1 s; a frame NAKed or unanswered is re-sent with the
same number, and after 6 failures the session is aborted with EOT and the result stays in
memory for the next session.

This codec is written independently of ``drivers/astm_link.py`` on purpose (both are checked
against the golden vectors of protocols.md §4.4).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

from firmware_sim.link import DeviceLink, Handler
from firmware_sim.sim_options import ends_on_unplug, non_negative
from firmware_sim.urine_strip import PadResult, StripAnalyzer, add_strip_arguments

HELP = "urine strip analyzer sending ASTM E1381/E1394 results (instrument side)"

ENQ, ACK, NAK, EOT = 0x05, 0x06, 0x15, 0x04
STX, ETX, ETB = 0x02, 0x03, 0x17
FRAME_TEXT_MAX = 240
MAX_FAILURES = 6


def frame_checksum(frame_body: bytes) -> bytes:
    """Two uppercase hex digits of the byte sum of FN..ETX/ETB, modulo 256."""
    total = 0
    for byte in frame_body:
        total = (total + byte) % 256
    return format(total, "02X").encode()


def build_frames(records: list[bytes], one_record_per_frame: bool = True) -> list[bytes]:
    """Frame a message: each record (ending in CR) or the whole message, split at 240 chars."""
    chunks: list[tuple[bytes, bool]] = []
    groups = records if one_record_per_frame else [b"".join(records)]
    for group in groups:
        pieces = [group[i : i + FRAME_TEXT_MAX] for i in range(0, len(group), FRAME_TEXT_MAX)]
        chunks += [(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    frames = []
    for index, (text, last) in enumerate(chunks):
        body = str((index + 1) % 8).encode() + text + bytes([ETX if last else ETB])
        frames.append(bytes([STX]) + body + frame_checksum(body) + b"\r\n")
    return frames


TIME_FORMAT = "%Y%m%d%H%M%S"
"""E1394 date and time, as the H, O and R records carry it."""


def device_timestamp(moment: datetime) -> bytes:
    return moment.strftime(TIME_FORMAT).encode()


def astm_value(pad: PadResult) -> str:
    """R field 4: the grade, the amount, or both as components (``1+^70``)."""
    return "^".join(part for part in (pad.grade, pad.amount) if part)


def strip_message(
    serial: str, specimen: int, moment: datetime, pads: list[PadResult]
) -> list[bytes]:
    """The E1394 records (each ending in CR) for one strip, in the layout of protocols.md §4.4."""
    stamp = device_timestamp(moment)
    records = [
        b"H|\\^&|||UA-SIM^1.0^" + serial.encode() + b"|||||||P|LIS2-A2|" + stamp,
        b"P|1||PAT-0001",
        b"O|1|S%04d||^^^UA10|R||" % specimen + stamp + b"||||N||||URINE",
    ]
    for seq, pad in enumerate(pads, 1):
        flag = b"A" if pad.abnormal else b"N"
        records.append(b"R|%d|^^^%s|%s|%s||%s||F||||%s" % (
            seq, pad.code.encode(), astm_value(pad).encode(), pad.unit.encode(), flag, stamp))
    records.append(b"L|1|N")
    return [record + b"\r" for record in records]


@dataclass
class SenderTimers:
    ack: float = 15.0
    """How long to wait for ACK/NAK to ENQ or to a frame."""
    busy_retry: float = 10.0
    """Pause before a new ENQ after a NAK or silence."""
    contention: float = 1.0
    """Pause before a new ENQ after contention (the instrument wins)."""


class _Inbox:
    """Byte-at-a-time view of what the host sends."""

    def __init__(self, link: DeviceLink) -> None:
        self._link = link
        self._buffer = bytearray()

    async def next_byte(self, within: float) -> int | None:
        if not self._buffer:
            try:
                async with asyncio.timeout(max(within, 0.0)):
                    self._buffer += await self._link.read()
            except TimeoutError:
                return None
        byte = self._buffer[0]
        del self._buffer[0]
        return byte


class AstmUrineDevice:
    """The analyzer: its result memory, its clock and its sending behaviour."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.serial: str = args.serial
        self.one_record_per_frame: bool = args.frames == "record"
        self.timers = SenderTimers(args.ack_timeout, args.busy_retry, args.contention_delay)
        self.strips = StripAnalyzer(args, self._message, TIME_FORMAT)
        self.aborted_sessions = 0

    def _message(self, pads: list[PadResult], moment: datetime, number: int) -> list[bytes]:
        return strip_message(self.serial, number, moment, pads)

    @ends_on_unplug
    async def serve(self, link: DeviceLink) -> None:
        inbox = _Inbox(link)
        memory = self.strips.memory
        while True:
            self.strips.read_due_strips()
            if not memory:
                await self._idle(link, inbox, self.strips.seconds_to_next())
                continue
            if await self._send_session(link, inbox, memory[0].rendered):
                self.strips.handed_over(memory.popleft())  # every frame acknowledged

    async def _idle(self, link: DeviceLink, inbox: _Inbox, seconds: float) -> None:
        """Wait, refusing any host attempt to send (this analyzer takes no orders)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if await inbox.next_byte(left) == ENQ:
                await link.write(bytes([NAK]))

    async def _send_session(self, link: DeviceLink, inbox: _Inbox, records: list[bytes]) -> bool:
        """One E1381 session; True when every frame was acknowledged."""
        await self._establish(link, inbox)
        for frame in build_frames(records, self.one_record_per_frame):
            if not await self._send_frame(link, inbox, frame):
                await link.write(bytes([EOT]))
                self.aborted_sessions += 1
                await self._idle(link, inbox, self.timers.busy_retry)
                return False
        await link.write(bytes([EOT]))
        return True

    async def _establish(self, link: DeviceLink, inbox: _Inbox) -> None:
        while True:
            await link.write(bytes([ENQ]))
            answer = await self._answer(inbox)
            if answer == ACK:
                return
            pause = self.timers.contention if answer == ENQ else self.timers.busy_retry
            await self._idle(link, inbox, pause)

    async def _send_frame(self, link: DeviceLink, inbox: _Inbox, frame: bytes) -> bool:
        for _attempt in range(MAX_FAILURES):
            await link.write(frame)
            if await self._answer(inbox) in (ACK, EOT):  # EOT = ACK + "please stop soon"
                return True
        return False

    async def _answer(self, inbox: _Inbox) -> int | None:
        """The host's ACK/NAK/ENQ/EOT, skipping noise; None after the ACK timeout."""
        deadline = time.monotonic() + self.timers.ack
        while (left := deadline - time.monotonic()) > 0:
            byte = await inbox.next_byte(left)
            if byte in (ACK, NAK, ENQ, EOT):
                return byte
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_strip_arguments(parser)
    parser.add_argument("--serial", default="SN0001",
                        help="analyzer serial number (default SN0001)")
    parser.add_argument("--frames", choices=("record", "message"), default="record",
                        help="one record per frame, or the whole message split at 240 characters"
                        " (default record)")
    parser.add_argument("--ack-timeout", type=non_negative, default=15.0, metavar="SECONDS",
                        help="wait for ACK/NAK before re-sending (default 15, E1381)")
    parser.add_argument("--busy-retry", type=non_negative, default=10.0, metavar="SECONDS",
                        help="pause after a refused ENQ or an aborted session (default 10)")
    parser.add_argument("--contention-delay", type=non_negative, default=1.0, metavar="SECONDS",
                        help="pause after ENQ contention; the instrument wins (default 1)")


def create(args: argparse.Namespace) -> Handler:
    return AstmUrineDevice(args).serve
