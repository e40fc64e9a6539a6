"""Urine strip analyzers that send their printout: a plain-text report between STX and ETX.

Two dialects are recognised from the report itself (protocols.md §5):

* **Clinitek 50** — ``STX CR LF``, an ID line ``6510  01.02 YYMMDDhhmm``, a sequence/colour
  line, fixed-width pad lines in the German locale (``NEGATIV``, ``Ca 10 Ery/uL``, ``OBL*``),
  then a two-hex-digit checksum and ``ETX``. The reference calls the checksum a byte sum, but
  only the XOR of the bytes from the ID line through the last CR LF reproduces the published
  capture's ``4C``, so that is what is checked (inference). A report with a bad checksum, or one
  that cannot be parsed (XOR misses two flips of the same bit), is answered with NAK, which
  makes the analyzer print again; should a report come back byte-identical and still fail the
  checksum, the line is fine and the algorithm is not, so it is accepted (and logged) rather
  than refused for ever.
* **McKesson Consult 120** — ``ID:``, ``Date:DD-MM-YYYY HH:MM``, ``Operator:``, ``No.`` lines,
  then ``[*]LABEL [grade] value [unit]`` lines; no checksum.

A report without ETX within ``report_timeout`` seconds or ``max_report`` bytes is dropped and
the reader resynchronises on the next STX. The ``ID:`` typed on the keypad is never used as
patient identity.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import datetime

import structlog

from drivers.measurement import Measurement, MeasurementDevice, Reading, utc_now
from drivers.serial_link import SerialLink
from drivers.urinalysis import PADS_BY_CODE, UrinalysisError, parse_pad

STX, ETX, NAK = b"\x02", b"\x03", b"\x15"
DEVICE_KIND = "urine-printout"

log = structlog.get_logger(__name__)


class PrintoutError(ValueError):
    """A report could not be understood; the message names the line and the reason."""


class PrintoutChecksumError(PrintoutError):
    """The Clinitek checksum does not match the report (the line garbled it)."""


_CLINITEK_ID = re.compile(r"^(\d{4})\s+(\S+)\s+(\d{10})$")
_CHECKSUM = re.compile(rb"([0-9A-Fa-f]{2})\s*$")
_PAD_LINE = re.compile(r"^(\*)?([A-Za-z][A-Za-z.]*?)(\*)?(?:\s+|(?=[<>=]))(.+)$")
_HEADER_PREFIXES = ("id:", "operator:", "no.", "date:")


def clinitek_checksum(data: bytes) -> bytes:
    value = 0
    for byte in data:
        value ^= byte
    return b"%02X" % value


def two_digit_year(yy: int) -> int:
    """Clinitek dates carry YY: 70–99 → 19YY, 00–69 → 20YY (the analyzer dates from the 1990s)."""
    return 1900 + yy if yy >= 70 else 2000 + yy


def parse_report(
    body: bytes, received_at: datetime, *, verify_checksum: bool = True
) -> Measurement:
    """Decode the bytes between STX and ETX into one measurement (either dialect)."""
    text = body.decode("latin-1")
    lines = [line for line in (raw.strip() for raw in text.split("\n")) if line]
    if not lines:
        raise PrintoutError("empty report")
    clinitek = _CLINITEK_ID.match(lines[0])
    device_time: datetime | None
    if clinitek:
        if verify_checksum:
            _check_clinitek_checksum(body)
        device_time = _clinitek_time(clinitek[3])
        pad_lines = lines[2:-1]  # skip sequence/colour and checksum
    else:
        device_time = _consult_time(lines)
        pad_lines = [line for line in lines if not line.lower().startswith(_HEADER_PREFIXES)]
    readings = [r for r in (_pad_reading(line, device_time) for line in pad_lines) if r]
    if not readings:
        raise PrintoutError(f"no pad results in report starting {lines[0]!r}")
    return Measurement(
        device_kind=DEVICE_KIND,
        device_id="",
        readings=tuple(readings),
        received_at=received_at,
        device_time=device_time,
        raw=body,
    )


def _check_clinitek_checksum(body: bytes) -> None:
    found = _CHECKSUM.search(body)
    if found is None:
        raise PrintoutError("Clinitek report without its checksum line")
    covered = body[: found.start()].removeprefix(b"\r\n")
    if clinitek_checksum(covered) != found[1].upper():
        raise PrintoutChecksumError(
            f"Clinitek checksum {found[1]!r} != computed {clinitek_checksum(covered)!r}")


def _clinitek_time(stamp: str) -> datetime:
    try:
        return datetime(two_digit_year(int(stamp[:2])), int(stamp[2:4]), int(stamp[4:6]),
                        int(stamp[6:8]), int(stamp[8:10]))
    except ValueError:
        raise PrintoutError(f"Clinitek ID line: bad date/time {stamp!r}") from None


def _consult_time(lines: list[str]) -> datetime | None:
    for line in lines:
        if line.lower().startswith("date:"):
            stamp = line[5:].strip()
            try:
                return datetime.strptime(stamp, "%d-%m-%Y %H:%M")
            except ValueError:
                raise PrintoutError(f"line {line!r}: bad date/time {stamp!r}") from None
    return None


def _pad_reading(line: str, device_time: datetime | None) -> Reading | None:
    match = _PAD_LINE.match(line)
    if match is None:
        raise PrintoutError(f"line {line!r}: not a `LABEL value` result line")
    star_before, label, star_after, rest = match.groups()
    pad = PADS_BY_CODE.get(label.upper())
    if pad is None:
        log.info("printout_line_skipped", line=line)
        return None
    flags = frozenset({"abnormal"}) if star_before or star_after else frozenset()
    try:
        return parse_pad(pad, rest.split(), device_time=device_time, flags=flags)
    except UrinalysisError as exc:
        raise PrintoutError(f"line {line!r}: {exc}") from None


class PrintoutUrineAnalyzer(MeasurementDevice):
    """Host end of a printout-style urine analyzer (Clinitek 50, Consult 120 …)."""

    device_kind = DEVICE_KIND

    def __init__(
        self,
        link: SerialLink,
        *,
        report_timeout: float = 5.0,
        max_report: int = 4096,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(clock=clock)
        self._link = link
        self.report_timeout = report_timeout
        self.max_report = max_report
        self.garbage_bytes = 0
        self._refused: bytes | None = None
        """The last report NAKed for its checksum, to recognise an identical re-print."""

    async def _do_next_measurement(self) -> Measurement:
        while True:
            body = await self._read_report()
            if body is None:
                continue
            reprinted = body == self._refused
            try:
                measurement = parse_report(body, self._clock(), verify_checksum=not reprinted)
            except PrintoutError as exc:
                self._refused = body if isinstance(exc, PrintoutChecksumError) else None
                self.rejected += 1
                log.warning("printout_report_naked", reason=str(exc))
                await self._link.write(NAK)  # a Clinitek prints it again; others ignore it
            else:
                if reprinted:
                    log.warning("printout_checksum_disagrees_on_identical_reprint")
                self._refused = None
                return measurement

    async def _read_report(self) -> bytes | None:
        """Bytes between STX and ETX; None (counted) if the report broke off or overflowed."""
        while (byte := await self._link.read_exactly(1)) != STX:
            self.garbage_bytes += 1
        body = bytearray()
        try:
            async with asyncio.timeout(self.report_timeout):
                while (byte := await self._link.read_exactly(1)) != ETX:
                    if byte == STX:  # the previous report lost its end: start again here
                        self.garbage_bytes += len(body) + 1
                        body.clear()
                        continue
                    body += byte
                    if len(body) > self.max_report:
                        raise PrintoutError(f"no ETX within {self.max_report} bytes")
        except (TimeoutError, PrintoutError) as exc:
            self.rejected += 1
            log.warning("printout_report_dropped", received=len(body), reason=str(exc) or "timeout")
            return None
        return bytes(body)
