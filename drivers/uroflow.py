"""Gravimetric uroflowmetry scale: a load cell streaming weight lines, one void → one Measurement.

No open uroflowmeter protocol exists (clinical-data.md §1.2), so medge defines a small NMEA-like
line protocol, documented in docs/uroflow.md::

    $UFW,<tick_ms>,<grams>*HH                              weight sample, >= 10 per second
    $UFT,<tick_ms>,<YYYYMMDDhhmmss>,<serial>,<rate_hz>*HH  clock + identity, every 10 s

``HH`` is the XOR of the characters between ``$`` and ``*``. ``tick_ms`` is the scale's 32-bit
millisecond counter (it wraps); timing comes from it, never from arrival times, so a busy host or
a buffered USB link cannot distort the flow curve.

The streaming detector below cuts the endless weight stream into voids (start: despiked weight
rises ``start_grams`` over the baseline; end: no rise for ``end_quiet_s``) and hands each to
:func:`drivers.uroflow_analysis.analyse_void`. Knocks are removed by the running median, a
beaker taken away aborts the void, and a stream gap longer than ``max_gap_s`` drops it.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import structlog

from drivers.measurement import (
    DeviceIdentity,
    Measurement,
    MeasurementDevice,
    Reading,
    Samples,
    utc_now,
)
from drivers.serial_link import LinkError, SerialLink, SerialSettings
from drivers.uroflow_analysis import (
    FlowSettings,
    VoidAnalysis,
    VoidRejected,
    analyse_void,
    odd_window,
)

DEVICE_KIND = "uroflow"
TICK_WRAP = 1 << 32
SERIAL_SETTINGS = SerialSettings(baudrate=115200)

log = structlog.get_logger(__name__)


class UroflowLineError(ValueError):
    """A line from the scale is malformed; the message says how."""


@dataclass(frozen=True)
class WeightSample:
    tick_ms: int
    grams: float


@dataclass(frozen=True)
class ClockLine:
    tick_ms: int
    device_time: datetime
    serial: str
    rate_hz: float


def line_checksum(payload: bytes) -> bytes:
    value = 0
    for byte in payload:
        value ^= byte
    return b"%02X" % value


def parse_line(line: bytes) -> WeightSample | ClockLine:
    """Decode one line (with or without its CR LF); raise :class:`UroflowLineError`."""
    line = line.strip()
    if not line.startswith(b"$") or len(line) < 4 or line[-3:-2] != b"*":
        raise UroflowLineError(f"not a $…*HH line: {line[:24]!r}")
    payload, sent = line[1:-3], line[-2:].upper()
    if line_checksum(payload) != sent:
        raise UroflowLineError(f"checksum {sent!r} != computed {line_checksum(payload)!r}")
    fields = payload.decode("ascii", errors="replace").split(",")
    try:
        if fields[0] == "UFW" and len(fields) == 3:
            return WeightSample(_tick(fields[1]), float(fields[2]))
        if fields[0] == "UFT" and len(fields) == 5:
            rate = float(fields[4])
            if not 1.0 <= rate <= 1000.0:
                raise ValueError(f"rate {rate} Hz")
            when = datetime.strptime(fields[2], "%Y%m%d%H%M%S")
            return ClockLine(_tick(fields[1]), when, fields[3], rate)
    except ValueError as exc:
        raise UroflowLineError(f"{fields[0]} line {line[:40]!r}: {exc}") from None
    raise UroflowLineError(f"unknown line type {line[:24]!r}")


def _tick(text: str) -> int:
    tick = int(text)
    if not 0 <= tick < TICK_WRAP:
        raise ValueError(f"tick {tick} outside 0..2^32-1")
    return tick


@dataclass(frozen=True)
class VoidDetection:
    start_grams: float = 5.0
    """Despiked weight this far above the baseline starts a void."""
    end_quiet_s: float = 8.0
    """A void ends after this long without the weight rising by ``quiet_grams``."""
    quiet_grams: float = 2.0
    removed_grams: float = 20.0
    """Weight this far below the void's baseline: the beaker was lifted, the void is dropped."""
    max_void_s: float = 300.0
    max_gap_s: float = 2.0
    """Longer stream gaps inside a void drop it (the curve would be invented)."""
    pre_roll_s: float = 3.0
    flow: FlowSettings = field(default_factory=FlowSettings)


class UroflowScale(MeasurementDevice):
    """Host end of the uroflow scale; ``async for void in scale.measurements()``."""

    device_kind = DEVICE_KIND

    def __init__(
        self,
        link: SerialLink,
        *,
        detection: VoidDetection | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(clock=clock)
        self._link = link
        self.detection = detection or VoidDetection()
        self.rejected_voids = 0
        self.device_id = ""
        self.rate_hz = 10.0
        self._clock_anchor: tuple[float, datetime] | None = None
        """(stream seconds, device time) of the last clock line."""
        self._last_tick: int | None = None
        self._elapsed_ms = 0
        """Unwrapped tick of the last sample (the 32-bit counter wraps every 49.7 days)."""
        self._median: deque[float] = deque(maxlen=11)
        self._pre_roll: deque[tuple[float, float, float]] = deque()
        """(seconds, raw grams, despiked grams) of the last ``pre_roll_s``."""
        self._void: list[tuple[float, float]] | None = None
        self._void_baseline = 0.0
        self._highest = 0.0
        self._last_rise_s = 0.0

    async def _do_next_measurement(self) -> Measurement:
        while True:
            raw = await self._link.read_until(b"\n", limit=4096)
            raw = raw[max(raw.rfind(b"$"), 0):]  # garbage glued in front: keep the line start
            try:
                item = parse_line(raw)
            except UroflowLineError as exc:
                self.rejected += 1
                log.debug("uroflow_line_rejected", reason=str(exc))
                continue
            if isinstance(item, ClockLine):
                self._on_clock(item)
            elif (measurement := self._on_sample(item)) is not None:
                return measurement

    def _on_clock(self, line: ClockLine) -> None:
        if line.rate_hz != self.rate_hz:
            width = odd_window(self.detection.flow.median_window_s * line.rate_hz)
            self._median = deque(maxlen=width)
        self.device_id, self.rate_hz = line.serial, line.rate_hz
        if self._last_tick is None:
            self._last_tick = line.tick_ms
        seconds = (self._elapsed_ms + _signed_ms(line.tick_ms, self._last_tick)) / 1000.0
        self._clock_anchor = (seconds, line.device_time)

    def _on_sample(self, sample: WeightSample) -> Measurement | None:
        step_ms = 0 if self._last_tick is None else _signed_ms(sample.tick_ms, self._last_tick)
        if step_ms <= 0 and self._last_tick is not None:
            return None  # a repeated or out-of-order sample
        self._last_tick = sample.tick_ms
        self._elapsed_ms += step_ms
        now = self._elapsed_ms / 1000.0
        if step_ms > self.detection.max_gap_s * 1000:
            self._drop_void(f"stream gap of {step_ms / 1000:.1f} s")
            self._median.clear()
        self._median.append(sample.grams)
        steady = statistics.median(self._median)
        if self._void is None:
            self._idle(now, sample.grams, steady)
            return None
        self._void.append((now, sample.grams))
        if steady > self._highest + self.detection.quiet_grams:
            self._highest, self._last_rise_s = steady, now
        if steady < self._void_baseline - self.detection.removed_grams:
            self._drop_void("beaker removed during the void")
        elif now - self._void[0][0] > self.detection.max_void_s:
            self._drop_void("void longer than max_void_s")
        elif now - self._last_rise_s > self.detection.end_quiet_s:
            samples, self._void = self._void, None
            return self._finish(samples)
        return None

    def _idle(self, now: float, grams: float, steady: float) -> None:
        """Start a void when the despiked weight rose ``start_grams`` within the pre-roll."""
        self._pre_roll.append((now, grams, steady))
        while now - self._pre_roll[0][0] > self.detection.pre_roll_s:
            self._pre_roll.popleft()
        if len(self._median) < (self._median.maxlen or 1):
            return
        lowest = min(level for _, _, level in self._pre_roll)
        if steady > lowest + self.detection.start_grams:
            self._void = [(t, g) for t, g, _ in self._pre_roll]
            self._void_baseline = self._highest = lowest
            self._last_rise_s = now

    def _drop_void(self, reason: str) -> None:
        if self._void is not None:
            self.rejected_voids += 1
            log.warning("uroflow_void_dropped", reason=reason)
        self._void = None
        self._pre_roll.clear()

    def _finish(self, samples: list[tuple[float, float]]) -> Measurement | None:
        times = np.array([t for t, _ in samples])
        grams = np.array([g for _, g in samples])
        try:
            result = analyse_void(times, grams, self.rate_hz, self.detection.flow)
        except VoidRejected as exc:
            self.rejected_voids += 1
            log.warning("uroflow_void_rejected", reason=str(exc))
            return None
        finally:
            self._pre_roll.clear()
        return self._measurement(result)

    def _device_time(self, seconds: float) -> datetime | None:
        if self._clock_anchor is None:
            return None
        anchor_seconds, anchor_time = self._clock_anchor
        return anchor_time + timedelta(seconds=seconds - anchor_seconds)

    def _measurement(self, result: VoidAnalysis) -> Measurement:
        onset = self._device_time(result.flow_start_s)
        artefact = frozenset({"artefact_removed"}) if result.knocks else frozenset()

        def reading(quantity: str, value: float, unit: str, flags: frozenset[str] = frozenset()
                    ) -> Reading:
            return Reading(quantity, round(value, 2), unit, device_time=onset, flags=flags)

        return Measurement(
            device_kind=DEVICE_KIND,
            device_id=self.device_id,
            readings=(
                reading("uroflow.voided_volume", result.voided_volume_ml, "mL"),
                reading("uroflow.qmax", result.qmax_ml_s, "mL/s", artefact),
                reading("uroflow.qave", result.qave_ml_s, "mL/s"),
                reading("uroflow.voiding_time", result.voiding_time_s, "s"),
                reading("uroflow.flow_time", result.flow_time_s, "s"),
                reading("uroflow.time_to_qmax", result.time_to_qmax_s, "s"),
            ),
            received_at=self._clock(),
            device_time=onset,
            samples=(Samples(
                quantity="uroflow.flow",
                unit="mL/s",
                period=timedelta(seconds=result.period_s),
                values=result.curve_ml_s,
                start=self._device_time(result.curve_start_s),
            ),),
        )


def _signed_ms(tick: int, since: int) -> int:
    """Milliseconds from ``since`` to ``tick`` on the wrapping 32-bit counter (negative: before)."""
    delta = (tick - since) % TICK_WRAP
    return delta - TICK_WRAP if delta >= TICK_WRAP // 2 else delta


async def probe(
    url: str, answer_within: float = 2.0, settings: SerialSettings = SERIAL_SETTINGS
) -> DeviceIdentity | None:
    """Listen (the scale talks unasked): a clock line, or three good weight lines, confirm it;
    the clock line also names the scale's serial number."""
    weights = 0
    try:
        async with SerialLink.open(url, settings) as link, asyncio.timeout(answer_within):
            while weights < 3:
                try:
                    line = parse_line(await link.read_until(b"\n", limit=4096))
                except UroflowLineError:
                    continue
                if isinstance(line, ClockLine):
                    return DeviceIdentity("uroflow-scale", line.serial)
                weights += 1
            return DeviceIdentity("uroflow-scale")
    except (TimeoutError, LinkError):
        return None
