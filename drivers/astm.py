"""Urine strip analyzer speaking ASTM E1381/E1394 (lab-grade and some home analyzers).

One order (O record) with its results (R records) becomes one :class:`Measurement`. Patient
records are read past but never used: patient identity comes from the gateway's enrolment,
not from a field typed on a device. Results for pads this driver does not know (colour,
clarity, ascorbate…) are skipped and logged; a result it cannot understand rejects the
whole message, since a half-understood strip is not a trustworthy one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import datetime

import structlog

from drivers.astm_link import ACK, ENQ, EOT, NAK, AstmReceiver, AstmTimers
from drivers.astm_records import AstmRecordError, Record, parse_records, parse_timestamp
from drivers.measurement import (
    DeviceIdentity,
    Measurement,
    MeasurementDevice,
    Reading,
    utc_now,
)
from drivers.serial_link import LinkError, SerialLink, SerialSettings
from drivers.urinalysis import PADS_BY_CODE, UrinalysisError, parse_pad, ucum_unit

log = structlog.get_logger(__name__)

SERIAL_SETTINGS = SerialSettings(baudrate=9600)
"""The usual line settings of ASTM analyzers (9600 8N1); configurable per device."""

NORMAL_FLAGS = frozenset({"", "N"})
"""E1394 R field 7 values meaning "not abnormal"; anything else (L, H, A, >, …) is abnormal."""


def measurements_from_message(
    message: bytes, received_at: datetime, device_kind: str = "urine-astm"
) -> list[Measurement]:
    """Decode one E1394 message into one measurement per order that has results.

    Raises :class:`AstmRecordError` (or :class:`UrinalysisError`) naming the record at fault.
    """
    records = parse_records(message)
    device_id = _device_id(records[0])
    header_time = parse_timestamp(records[0].field(14), "H field 14")
    measurements: list[Measurement] = []
    order: Record | None = None
    readings: list[Reading] = []

    def close_order() -> None:
        if order is not None and readings:
            measurements.append(Measurement(
                device_kind=device_kind,
                device_id=device_id,
                readings=tuple(readings),
                received_at=received_at,
                device_time=parse_timestamp(order.field(8), "O field 8") or header_time,
                raw=message,
            ))

    for index, record in enumerate(records, 1):
        if record.type in ("H", "P", "O", "L"):
            close_order()
            readings = []
            order = record if record.type == "O" else None
        elif record.type == "R":
            if order is None:
                raise AstmRecordError(f"record {index}: result outside an order")
            reading = _reading(record, index)
            if reading is not None:
                readings.append(reading)
    close_order()
    return measurements


def _device_id(header: Record) -> str:
    """Serial number from the sender field ``name^version^serial``, else the name."""
    sender = header.components(5)
    return next((part for part in reversed(sender) if part), "")


def _reading(record: Record, index: int) -> Reading | None:
    where = f"record {index} (R {record.field(2)})"
    test_id = record.components(3)
    code = test_id[3] if len(test_id) > 3 else test_id[-1]
    pad = PADS_BY_CODE.get(code.strip().upper())
    if pad is None:
        log.info("astm_result_skipped", test=code)
        return None
    if record.field(9) == "X":  # the analyzer could not run this pad
        return None
    flag = record.text(7)
    flags = frozenset() if flag in NORMAL_FLAGS else frozenset({"abnormal", f"astm:{flag}"})
    tokens = [t for part in record.components(4) for t in part.split()]
    try:
        unit = ucum_unit(record.text(5)) if record.text(5) else ""
        return parse_pad(
            pad,
            tokens,
            unit=unit,
            device_time=parse_timestamp(record.field(13), f"{where} field 13"),
            flags=flags,
        )
    except UrinalysisError as exc:
        raise AstmRecordError(f"{where}: {exc}") from None


class AstmUrineAnalyzer(MeasurementDevice):
    """Host end of an ASTM urine analyzer; ``async for m in analyzer.measurements()``."""

    device_kind = "urine-astm"

    def __init__(
        self,
        link: SerialLink,
        *,
        timers: AstmTimers | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(clock=clock)
        self._receiver = AstmReceiver(link, timers)
        self._ready: deque[Measurement] = deque()

    @property
    def link_stats(self) -> dict[str, int]:
        return {
            "rejected_frames": self._receiver.rejected_frames,
            "garbage_bytes": self._receiver.garbage_bytes,
            "rejected_messages": self.rejected,
        }

    async def _do_next_measurement(self) -> Measurement:
        while not self._ready:
            message = await self._receiver.receive_message()
            try:
                self._ready.extend(measurements_from_message(message, self._clock()))
            except (AstmRecordError, UrinalysisError) as exc:
                self.rejected += 1
                log.warning("astm_message_rejected", reason=str(exc))
        return self._ready.popleft()


async def probe(
    url: str, answer_within: float = 2.0, settings: SerialSettings = SERIAL_SETTINGS
) -> DeviceIdentity | None:
    """Confirm an E1381 instrument: to our ENQ it answers ACK (ready) or NAK (busy), or ENQ when
    it wants to send itself. We end at once (EOT after an ACK, NAK to its ENQ so that it sends
    later, to the driver); results are never taken by the probe."""
    try:
        async with SerialLink.open(url, settings) as link:
            await link.write(ENQ)
            async with asyncio.timeout(answer_within):
                while (answer := await link.read_exactly(1)) not in (ACK, NAK, ENQ):
                    pass
            if reply := {ACK: EOT, ENQ: NAK}.get(answer):
                await link.write(reply)
            return DeviceIdentity("astm-e1381")
    except (TimeoutError, LinkError):
        return None
