"""ASTM E1381 (CLSI LIS1-A) low level, receiver side: what a host does for an analyzer.

The analyzer (sender) opens a session with ENQ, sends frames ``STX FN text ETB|ETX C1 C2 CR LF``
and closes with EOT. The host ACKs every good frame exactly once (an extra ACK desynchronises
the sender), NAKs a bad checksum, an unexpected frame number, restricted characters or a frame
that does not complete in time, and ACKs-but-ignores a repeated frame (the sender re-sends the
same number when our ACK was lost). Frame numbers run mod 8 from 1; a sender wrapping 7 → 1
(OpenELIS reading of the standard) is accepted too. Timers follow the standard and are
configurable so tests run fast. See docs/urine-analyzers.md.

The ACK of a message's last frame (ETX, ending with the terminator record L) is held back until
the consumer asks for the next message: an analyzer deletes a result once that ACK arrives, so
it must not leave before the gateway has stored the result (a power cut in between would lose
it). A consumer that never asks again (crash) leaves the result with the analyzer, which sends
it again in a later session: at least once, never lost.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from drivers.serial_link import SerialLink

ENQ, ACK, NAK, EOT = b"\x05", b"\x06", b"\x15", b"\x04"
STX, ETX, ETB, CR, LF = b"\x02", b"\x03", b"\x17", b"\r", b"\n"
MAX_FRAME = 247
"""Longest frame on the wire: 240 text characters plus STX, FN, ETB/ETX, C1, C2, CR, LF."""
RESTRICTED = frozenset(b"\x01\x02\x03\x04\x05\x06\x10\x15\x16\x17\x0a\x11\x12\x13\x14")
"""Characters never allowed in frame text (SOH STX ETX EOT ENQ ACK DLE NAK SYN ETB LF DC1-4)."""

log = structlog.get_logger(__name__)


class AstmFrameError(ValueError):
    """A frame is malformed; the message says which rule it breaks."""


@dataclass(frozen=True)
class Frame:
    number: int
    text: bytes
    final: bool
    """True for an ETX (last) frame, False for an ETB (intermediate) frame."""


def checksum(body: bytes) -> bytes:
    """E1381 checksum of FN..ETX/ETB inclusive: the byte sum mod 256 as two uppercase hex digits."""
    return b"%02X" % (sum(body) & 0xFF)


def decode_frame(data: bytes) -> Frame:
    """Check and decode one complete frame (STX through LF)."""
    if len(data) > MAX_FRAME:
        raise AstmFrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    if len(data) < 7 or data[:1] != STX or data[-2:] != CR + LF:
        raise AstmFrameError(f"not framed as STX … CR LF: {data[:16]!r}…")
    body, sent_sum = data[1:-4], data[-4:-2]
    terminator = body[-1:]
    if terminator not in (ETX, ETB):
        raise AstmFrameError(f"frame ends with {terminator!r}, expected ETX or ETB")
    if checksum(body) != sent_sum.upper():
        raise AstmFrameError(f"checksum {sent_sum!r} != computed {checksum(body)!r}")
    number = body[:1]
    if not number.isdigit() or int(number) > 7:
        raise AstmFrameError(f"frame number {number!r} is not 0-7")
    text = body[1:-1]
    if bad := RESTRICTED.intersection(text):
        raise AstmFrameError(f"restricted character(s) {sorted(bad)} in frame text")
    return Frame(int(number), text, terminator == ETX)


@dataclass(frozen=True)
class AstmTimers:
    """Receiver timers in seconds (E1381 defaults)."""

    frame: float = 30.0
    """A session with no frame (or EOT) for this long is abandoned, its partial message dropped."""
    frame_complete: float = 15.0
    """A frame started (STX) but not ended (LF) within this is NAKed as a half frame."""


class AstmReceiver:
    """Host side of the E1381 link over a composed :class:`SerialLink`."""

    def __init__(self, link: SerialLink, timers: AstmTimers | None = None) -> None:
        self._link = link
        self.timers = timers or AstmTimers()
        self.rejected_frames = 0
        self.garbage_bytes = 0
        self._session_open = False
        """True when a new session's ENQ was already acknowledged while finishing the last."""
        self._held_frame: int | None = None
        """Number of the terminator frame returned to the consumer but not yet acknowledged."""

    async def receive_message(self) -> bytes:
        """Run sessions until one delivers a complete message; return its text (records + CR).

        Calling it again is the consumer's word that the previous message is stored: only then
        is its last frame acknowledged. Raises ``LinkError`` when the link is lost; bad frames
        and garbage never escape.
        """
        while True:
            if self._held_frame is not None:
                held, self._held_frame = self._held_frame, None
                message = await self._receive_session(last_number=held, holding=True)
            else:
                if not self._session_open:
                    await self._wait_for_enq()
                self._session_open = False
                message = await self._receive_session()
            if message:
                return message

    async def _wait_for_enq(self) -> None:
        while (byte := await self._link.read_exactly(1)) != ENQ:
            self.garbage_bytes += 1
            if byte == STX:  # a frame outside a session (senaite answers NAK)
                await self._link.write(NAK)
        await self._link.write(ACK)

    async def _receive_session(self, last_number: int | None = None, holding: bool = False
                               ) -> bytes:
        """Collect frames until EOT or a terminator frame; return the message, or b"" if the
        session broke off. ``last_number`` resumes a session after the held terminator frame.

        While ``holding``, what the sender did as we stored the message decides about the held
        ACK: nothing yet → ACK now; it repeated the frame → the repeat is ACKed (once) below;
        it gave up with EOT → no ACK, the result stays in its memory and comes again (a
        duplicate, never a loss)."""
        parts: list[bytes] = []
        complete = False
        while True:
            try:
                byte = await self._link.read_exactly(1, timeout=0 if holding else self.timers.frame)
            except TimeoutError:
                if holding:
                    holding = False
                    await self._link.write(ACK)
                    continue
                # a lost EOT must not lose a message whose last frame came
                if not complete:
                    log.warning("astm_session_timeout", dropped_frames=len(parts))
                return b"".join(parts) if complete else b""
            if byte in (EOT, ENQ, STX):  # noise alone does not tell what the sender did
                holding = False
            if byte == EOT:
                if parts and not complete:
                    log.warning("astm_session_aborted", dropped_frames=len(parts))
                return b"".join(parts) if complete else b""
            if byte == ENQ:  # a new session: the EOT was lost, or the sender restarted
                await self._link.write(ACK)
                if complete:
                    self._session_open = True
                    return b"".join(parts)
                parts, last_number = [], None
                continue
            if byte != STX:
                self.garbage_bytes += 1
                continue
            frame = await self._read_frame()
            if frame is None:
                await self._link.write(NAK)
                continue
            if frame.number == last_number:  # our ACK was lost; the sender repeated itself
                await self._link.write(ACK)
                continue
            if not _follows(last_number, frame.number):
                self.rejected_frames += 1
                log.warning("astm_frame_out_of_sequence", got=frame.number, last=last_number)
                await self._link.write(NAK)
                continue
            parts.append(frame.text)
            last_number, complete = frame.number, frame.final
            if complete and _ends_with_terminator(frame.text):
                self._held_frame = frame.number
                return b"".join(parts)
            await self._link.write(ACK)

    async def _read_frame(self) -> Frame | None:
        """Read the rest of a frame after its STX; None (already counted) when it is bad."""
        data = bytearray(STX)
        try:
            async with asyncio.timeout(self.timers.frame_complete):
                while not data.endswith(LF) and len(data) <= MAX_FRAME:
                    byte = await self._link.read_exactly(1)
                    if byte == STX:  # the end of the previous frame was lost: resynchronise
                        self.garbage_bytes += len(data)
                        data = bytearray(STX)
                        continue
                    data += byte
        except TimeoutError:
            self.rejected_frames += 1
            log.warning("astm_half_frame", received=len(data))
            return None
        try:
            return decode_frame(bytes(data))
        except AstmFrameError as exc:
            self.rejected_frames += 1
            log.warning("astm_bad_frame", reason=str(exc))
            return None


def _ends_with_terminator(text: bytes) -> bool:
    """True when the last record in a frame's text is the message terminator record (L)."""
    records = [record for record in text.split(CR) if record]
    return bool(records) and records[-1].startswith(b"L")


def _follows(last: int | None, number: int) -> bool:
    if last is None:
        return number == 1
    return number == (last + 1) % 8 or (last == 7 and number == 1)
