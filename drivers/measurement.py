"""The one measurement type every home-gateway driver yields.

Drivers speak many wire formats (ASTM, printouts, load-cell streams, oximeter packets,
Modbus registers) but the gateway downstream (FHIR Observations, outbox, alerts) should see a
single shape. A :class:`Measurement` is one event on one device (a test strip, a void, an
oximeter sample) holding one or more :class:`Reading` values. Both the device's own clock and
the gateway's receive time are kept: a device clock may be years off and must never reorder
or drop data, so neither timestamp is corrected here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar

COMPARATORS = (None, "<", "<=", ">=", ">")


class MeasurementError(ValueError):
    """A measurement object was built with inconsistent fields."""


@dataclass(frozen=True)
class Reading:
    """One observed quantity.

    ``quantity`` is a stable key (``"urine.ph"``, ``"urine.nitrite"``, ``"uroflow.qmax"``,
    ``"spo2"``, ``"pulse_rate"`` …) that the gateway maps to LOINC/MDC codes. Semi-quantitative
    results carry the device's wording in ``text`` (``"neg"``, ``"1+"``) and its grade in
    ``ordinal`` (0 = negative), plus ``value`` when the device also reports a concentration.
    """

    quantity: str
    value: float | None
    unit: str
    """UCUM unit (``"1"`` for dimensionless, ``""`` when the reading has no numeric value)."""
    text: str | None = None
    ordinal: int | None = None
    device_time: datetime | None = None
    """When the device says it measured this reading, as reported (may be far off)."""
    flags: frozenset[str] = frozenset()
    """Device or driver flags, e.g. ``"abnormal"``, ``"finger_out"``, ``"artefact"``."""
    comparator: str | None = None
    """``"<"``, ``"<="``, ``">="`` or ``">"`` when the device reports a bound (``SG >=1.030``),
    exactly like FHIR ``Quantity.comparator``."""

    def __post_init__(self) -> None:
        if not self.quantity:
            raise MeasurementError("Reading.quantity must not be empty")
        if self.value is None and self.text is None and self.ordinal is None:
            raise MeasurementError(f"Reading {self.quantity}: needs a value, text or ordinal")
        if self.value is not None and not math.isfinite(self.value):
            raise MeasurementError(f"Reading {self.quantity}: value {self.value} is not finite")
        if self.comparator not in COMPARATORS:
            raise MeasurementError(f"Reading {self.quantity}: bad comparator {self.comparator!r}")


@dataclass(frozen=True)
class Samples:
    """A regularly sampled waveform (uroflow curve, pleth) attached to a measurement.

    Maps to a FHIR ``SampledData``: ``values[i]`` was taken at ``start + i * period``.
    """

    quantity: str
    unit: str
    period: timedelta
    values: tuple[float, ...]
    start: datetime | None = None
    """Device time of the first sample, when known."""

    def __post_init__(self) -> None:
        if self.period <= timedelta(0):
            raise MeasurementError(f"Samples {self.quantity}: period must be positive")


@dataclass(frozen=True)
class Measurement:
    """One event on one device, as the gateway received it."""

    device_kind: str
    """Driver family, e.g. ``"urine-astm"``, ``"urine-printout"``, ``"uroflow"``, ``"cms50"``."""
    device_id: str
    """The device's own identity (serial number or instrument ID), ``""`` if it has none."""
    readings: tuple[Reading, ...]
    received_at: datetime
    """Gateway time (timezone-aware UTC) when the measurement was complete."""
    device_time: datetime | None = None
    """Device time of the event, as reported; naive when the device gives no zone."""
    raw: bytes | None = None
    """The wire bytes the measurement was decoded from, kept for audit and re-parsing."""
    samples: tuple[Samples, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.received_at.tzinfo is None:
            raise MeasurementError("Measurement.received_at must be timezone-aware (UTC)")

    def reading(self, quantity: str) -> Reading | None:
        """The reading for ``quantity``, or ``None`` if the device did not report it."""
        return next((r for r in self.readings if r.quantity == quantity), None)


@dataclass(frozen=True)
class DeviceIdentity:
    """What a protocol probe learnt about the device on a port (discovery confirms candidates
    with it, since a USB VID:PID names only the bridge chip)."""

    model: str
    device_id: str = ""


def utc_now() -> datetime:
    return datetime.now(UTC)


class MeasurementDevice(ABC):
    """Base of every home-gateway device driver: a source of :class:`Measurement` objects.

    Subclasses compose a link (``drivers.serial_link.SerialLink``) and implement
    :meth:`_do_next_measurement`, resynchronising by themselves after garbage or a broken frame.
    A lost link surfaces as ``LinkError``: reconnecting is the caller's decision (hot-plug).
    ``clock`` gives the gateway time stamped into ``received_at``; tests may replace it.
    """

    device_kind: ClassVar[str]

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock
        self.rejected = 0
        """Frames/reports/lines dropped as malformed since start (a link-quality metric)."""

    async def next_measurement(self) -> Measurement:
        """Wait for the device's next complete measurement."""
        return await self._do_next_measurement()

    async def measurements(self) -> AsyncIterator[Measurement]:
        """Yield measurements as the device produces them, until the link fails."""
        while True:
            yield await self.next_measurement()

    @abstractmethod
    async def _do_next_measurement(self) -> Measurement: ...
