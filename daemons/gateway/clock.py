"""Device clocks: give naive device times a zone, estimate each device's clock error, flag skew.

Home devices keep their own clocks and they drift by months (clinical-data.md §2.3). The
gateway never corrects the times it stores (the device's reading is kept verbatim in the
Observation); it estimates the device's clock error and publishes it as the offset that maps
device time onto gateway time. Measurements are emitted in arrival order whatever their
device time says, so a wrong clock can neither reorder nor drop data.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from datetime import datetime, tzinfo

from drivers.measurement import Measurement


def localize(measurement: Measurement, zone: tzinfo) -> Measurement:
    """The measurement with every naive device time read as wall time in ``zone``."""

    def fix(moment: datetime | None) -> datetime | None:
        if moment is None or moment.tzinfo is not None:
            return moment
        return moment.replace(tzinfo=zone)

    return dataclasses.replace(
        measurement,
        device_time=fix(measurement.device_time),
        readings=tuple(dataclasses.replace(r, device_time=fix(r.device_time))
                       for r in measurement.readings),
        samples=tuple(dataclasses.replace(s, start=fix(s.start)) for s in measurement.samples),
    )


def device_time_of(measurement: Measurement) -> datetime | None:
    """The event's device time: the measurement's own, else its first reading's."""
    if measurement.device_time is not None:
        return measurement.device_time
    return next((r.device_time for r in measurement.readings if r.device_time), None)


class ClockTracker:
    """Estimates one device's clock error from (receipt − device time) over recent events.

    A result can only reach the gateway after it was measured, so the smallest recent
    difference is the best estimate of the clock error; a device sending stored results
    later keeps their true spacing. A short window follows a clock that was reset.
    """

    def __init__(self, skew_threshold_s: float, window: int = 5) -> None:
        self.skew_threshold_s = skew_threshold_s
        self._recent: deque[float] = deque(maxlen=window)
        self.offset_s = 0.0

    def observe(self, measurement: Measurement) -> float:
        """Update with one measurement; return the offset to apply to its device times."""
        device_time = device_time_of(measurement)
        if device_time is None or device_time.tzinfo is None:
            return self.offset_s
        self._recent.append((measurement.received_at - device_time).total_seconds())
        self.offset_s = min(self._recent)
        return self.offset_s

    @property
    def skewed(self) -> bool:
        return abs(self.offset_s) > self.skew_threshold_s
