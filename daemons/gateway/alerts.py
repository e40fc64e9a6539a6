"""Clinical alert rules, evaluated on the gateway per patient (defaults: docs/clinical-rules.md).

Pure logic: the engine is fed measurements with the time they were taken (gateway clock) and
ticked with the current time; it returns :class:`Alert` objects and does no I/O, so every rule
is tested with the data that must trigger it and the data that must not. Stateful rules
(SpO2, pulse, leak, pH band) report transitions only (``active`` then ``cleared``), with
hysteresis so a value hovering at a threshold does not flap; per-strip findings (infection
markers, morning SG) are ``event`` alerts, one per strip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo

from drivers.measurement import Measurement, Reading
from medge.config import bounds

State = Literal["active", "cleared", "event"]
Priority = Literal["high", "medium", "low"]

INVALID_OXIMETRY_FLAGS = frozenset({"finger_out", "searching", "artefact", "probe_error",
                                    "low_perfusion", "no_signal"})
"""Oximeter samples carrying any of these are neither evidence of desaturation nor recovery."""


@dataclass(frozen=True)
class Alert:
    rule: str
    device: str
    state: State
    priority: Priority
    at: datetime
    message: str
    value: float | str | None = None
    threshold: float | str | None = None

    def body(self, patient: str | None, category: str = "clinical") -> dict[str, Any]:
        """The published alert body (docs/gateway.md "Alerts")."""
        out: dict[str, Any] = {
            "alert": self.rule, "category": category, "state": self.state,
            "priority": self.priority, "device": self.device,
            "at": self.at.astimezone(UTC).isoformat(timespec="seconds"),
            "message": self.message,
            "patient": patient,
        }
        if self.value is not None:
            out["value"] = self.value
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


STONE_PH_BANDS: dict[str, tuple[float, float]] = {
    "uric_acid": (6.0, 6.5),
    "cystine": (7.5, 8.0),
    "calcium_oxalate": (6.0, 6.5),
    "struvite": (5.5, 6.5),
}
"""Urine pH target bands by stone type (clinical-data.md §6.4; edges on the strip's 0.5 steps,
see docs/clinical-rules.md for the rounding)."""


@dataclass(frozen=True)
class RulesSection:
    """Per-patient thresholds; every default and its source is in docs/clinical-rules.md."""

    timezone: str = "UTC"
    """The patient's time zone: "morning void" and "daily volume" are local notions."""
    spo2_low: float = field(default=88.0, metadata=bounds(min=50, max=100))
    spo2_sustain_s: float = field(default=60.0, metadata=bounds(min=0, max=3600))
    spo2_clear_margin: float = field(default=2.0, metadata=bounds(min=0, max=10))
    spo2_clear_s: float = field(default=30.0, metadata=bounds(min=0, max=3600))
    artefact_gap_s: float = field(default=15.0, metadata=bounds(min=0, max=3600))
    """An artefact gap longer than this restarts the sustained-time count."""
    pulse_low: float = field(default=40.0, metadata=bounds(min=10, max=300))
    pulse_high: float = field(default=140.0, metadata=bounds(min=10, max=300))
    pulse_sustain_s: float = field(default=30.0, metadata=bounds(min=0, max=3600))
    pulse_clear_margin: float = field(default=5.0, metadata=bounds(min=0, max=50))
    no_signal_s: float = field(default=300.0, metadata=bounds(min=1, max=86400))
    leak_high: float = field(default=60.0, metadata=bounds(min=0, max=300))
    """L/min of total leak above which the mask/circuit leak is reported."""
    leak_sustain_s: float = field(default=30.0, metadata=bounds(min=0, max=3600))
    stone_type: Literal["uric_acid", "cystine", "calcium_oxalate", "struvite", "none"] = "none"
    ph_low: float | None = field(default=None, metadata=bounds(min=4, max=9))
    ph_high: float | None = field(default=None, metadata=bounds(min=4, max=9))
    ph_consecutive: int = field(default=2, metadata=bounds(min=1, max=20))
    leukocytes_min_grade: int = field(default=2, metadata=bounds(min=1, max=5))
    """Grade (drivers.urinalysis.Grade) from which leukocytes alert: 2 = 1+."""
    sg_morning_high: float = field(default=1.020, metadata=bounds(min=1.0, max=1.05))
    morning_start: str = "05:00"
    morning_end: str = "10:00"
    daily_volume_low_ml: float = field(default=2000.0, metadata=bounds(min=0, max=10000))

    def validate(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"timezone {self.timezone!r} is not a known IANA zone") from exc
        for name in ("morning_start", "morning_end"):
            try:
                time.fromisoformat(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name} must be HH:MM, got {getattr(self, name)!r}") from None
        if self.pulse_low >= self.pulse_high:
            raise ValueError("pulse_low must be below pulse_high")
        low, high = self.ph_band or (0.0, 14.0)
        if low >= high:
            raise ValueError("ph_low must be below ph_high")

    @property
    def ph_band(self) -> tuple[float, float] | None:
        """The patient's pH band: explicit limits override the stone type's defaults."""
        base = STONE_PH_BANDS.get(self.stone_type)
        if base is None and self.ph_low is None and self.ph_high is None:
            return None
        low = self.ph_low if self.ph_low is not None else (base[0] if base else 4.0)
        high = self.ph_high if self.ph_high is not None else (base[1] if base else 9.0)
        return low, high


class Sustained:
    """A condition that must hold for ``sustain_s`` to raise and its clear condition for
    ``clear_s`` to clear; evidence gaps longer than ``max_gap_s`` restart the count."""

    def __init__(self, sustain_s: float, clear_s: float, max_gap_s: float) -> None:
        self.sustain_s, self.clear_s, self.max_gap_s = sustain_s, clear_s, max_gap_s
        self.active = False
        self._since: datetime | None = None
        self._last: datetime | None = None

    def update(self, at: datetime, bad: bool, good: bool) -> bool | None:
        """Feed one valid sample; True = raised now, False = cleared now, None = no change."""
        if self._last is not None and (at - self._last).total_seconds() > self.max_gap_s:
            self._since = None
        self._last = at
        moving_away = good if self.active else bad
        if not moving_away:
            self._since = None
            return None
        if self._since is None:
            self._since = at
        needed = self.clear_s if self.active else self.sustain_s
        if (at - self._since).total_seconds() < needed:
            return None
        self.active = not self.active
        self._since = None
        return self.active


class AlertEngine:
    """All rules for one patient. ``feed(device, measurement, taken_at)`` and ``tick(now)``."""

    def __init__(self, rules: RulesSection, clock: Callable[[], datetime]) -> None:
        self.rules = rules
        self.zone: tzinfo = ZoneInfo(rules.timezone)
        self._clock = clock
        self._spo2: dict[str, Sustained] = {}
        self._pulse_low: dict[str, Sustained] = {}
        self._pulse_high: dict[str, Sustained] = {}
        self._leak: dict[str, Sustained] = {}
        self._device_alarms: dict[str, frozenset[str]] = {}
        self._last_valid_oximetry: dict[str, datetime] = {}
        self._no_signal: set[str] = set()
        self._ph_out_run = 0
        self._ph_alert_active = False
        self._morning_checked: set[date] = set()
        self._daily_volume: dict[date, float] = {}
        self._volume_checked: set[date] = set()

    def feed(self, device: str, m: Measurement, taken_at: datetime) -> list[Alert]:
        """Evaluate every rule a measurement can affect."""
        alerts: list[Alert] = []
        by_quantity = {r.quantity: r for r in m.readings}
        if "spo2" in by_quantity or "pulse_rate" in by_quantity:
            alerts += self._oximetry(device, by_quantity, taken_at)
        alerts += self._ventilator(device, m.readings, taken_at)
        if "urine.ph" in by_quantity or "urine.nitrite" in by_quantity:
            alerts += self._urine(device, by_quantity, taken_at)
        volume = by_quantity.get("uroflow.voided_volume")
        if volume is not None and volume.value is not None:
            day = taken_at.astimezone(self.zone).date()
            self._daily_volume[day] = self._daily_volume.get(day, 0.0) + volume.value
        return alerts

    def tick(self, now: datetime | None = None) -> list[Alert]:
        """Time-driven rules: no valid oximetry signal, daily voided volume of past days."""
        now = now or self._clock()
        alerts: list[Alert] = []
        for device, last_valid in self._last_valid_oximetry.items():
            silent = (now - last_valid).total_seconds()
            if silent >= self.rules.no_signal_s and device not in self._no_signal:
                self._no_signal.add(device)
                alerts.append(Alert("no-valid-signal", device, "active", "medium", now,
                                    f"no valid oximetry for {silent / 60:.0f} min "
                                    "(finger out, searching or artefact)",
                                    round(silent), self.rules.no_signal_s))
        today = now.astimezone(self.zone).date()
        for day in sorted(self._daily_volume):
            if day >= today or day in self._volume_checked:
                continue
            self._volume_checked.add(day)
            total = self._daily_volume[day]
            if total < self.rules.daily_volume_low_ml:
                alerts.append(Alert("daily-voided-volume-low", "uroflow", "event", "low", now,
                                    f"voided {total:.0f} mL on {day.isoformat()}, below the "
                                    f"{self.rules.daily_volume_low_ml:.0f} mL target",
                                    round(total), self.rules.daily_volume_low_ml))
        return alerts

    # -- oximetry ------------------------------------------------------------------------

    def _oximetry(self, device: str, q: dict[str, Reading], at: datetime) -> list[Alert]:
        rules = self.rules
        spo2, pulse = q.get("spo2"), q.get("pulse_rate")
        flags = frozenset().union(*(r.flags for r in (spo2, pulse) if r is not None))
        if flags & INVALID_OXIMETRY_FLAGS or spo2 is None or spo2.value is None:
            # a probe never worn counts from the oximeter's first data, not from never
            self._last_valid_oximetry.setdefault(device, at)
            return []
        alerts: list[Alert] = []
        self._last_valid_oximetry[device] = at
        if device in self._no_signal:
            self._no_signal.discard(device)
            alerts.append(Alert("no-valid-signal", device, "cleared", "medium", at,
                                "valid oximetry again"))
        tracker = self._spo2.setdefault(device, Sustained(
            rules.spo2_sustain_s, rules.spo2_clear_s, rules.artefact_gap_s))
        change = tracker.update(at, bad=spo2.value < rules.spo2_low,
                                good=spo2.value >= rules.spo2_low + rules.spo2_clear_margin)
        if change is not None:
            alerts.append(Alert(
                "spo2-low", device, "active" if change else "cleared", "high", at,
                f"SpO2 {spo2.value:g} % below the target {rules.spo2_low:g} % for "
                f"{rules.spo2_sustain_s:g} s" if change else f"SpO2 back to {spo2.value:g} %",
                spo2.value, rules.spo2_low))
        if pulse is not None and pulse.value is not None:
            alerts += self._pulse(device, pulse.value, at)
        return alerts

    def _pulse(self, device: str, rate: float, at: datetime) -> list[Alert]:
        rules, alerts = self.rules, []
        margin = rules.pulse_clear_margin
        for name, trackers, bad, good, limit in (
            ("pulse-low", self._pulse_low, rate < rules.pulse_low,
             rate >= rules.pulse_low + margin, rules.pulse_low),
            ("pulse-high", self._pulse_high, rate > rules.pulse_high,
             rate <= rules.pulse_high - margin, rules.pulse_high),
        ):
            tracker = trackers.setdefault(device, Sustained(
                rules.pulse_sustain_s, rules.pulse_sustain_s, rules.artefact_gap_s))
            change = tracker.update(at, bad=bad, good=good)
            if change is not None:
                alerts.append(Alert(name, device, "active" if change else "cleared", "medium",
                                    at, f"pulse {rate:g} /min" + (
                                        f" outside the limit {limit:g} /min" if change else ""),
                                    rate, limit))
        return alerts

    # -- ventilator ----------------------------------------------------------------------

    def _ventilator(self, device: str, readings: tuple[Reading, ...],
                    at: datetime) -> list[Alert]:
        alerts: list[Alert] = []
        for r in readings:
            if r.quantity.endswith(".alarms") and r.text is not None:
                alerts += self._alarm_bits(device, r, at)
            elif r.quantity.endswith(".leak") and r.value is not None:
                tracker = self._leak.setdefault(device, Sustained(
                    self.rules.leak_sustain_s, self.rules.leak_sustain_s, 60.0))
                change = tracker.update(at, bad=r.value > self.rules.leak_high,
                                        good=r.value <= self.rules.leak_high * 0.9)
                if change is not None:
                    alerts.append(Alert("high-leak", device, "active" if change else "cleared",
                                        "medium", at, f"leak {r.value:g} L/min", r.value,
                                        self.rules.leak_high))
        return alerts

    def _alarm_bits(self, device: str, r: Reading, at: datetime) -> list[Alert]:
        """Each device alarm bit is its own alert, raised and cleared with the bit."""
        now_on = frozenset(n for n in (r.text or "").split(",") if n and n != "none")
        before = self._device_alarms.get(device, frozenset())
        self._device_alarms[device] = now_on
        urgent = {"disconnection", "apnoea", "power_failure", "high_pressure"}
        transitions: tuple[tuple[list[str], State], ...] = (
            (sorted(now_on - before), "active"), (sorted(before - now_on), "cleared"))
        return [
            Alert(f"device-alarm:{name}", device, state,
                  "high" if name in urgent else "medium", at,
                  f"ventilator alarm {name}" + (" cleared" if state == "cleared" else ""))
            for names, state in transitions
            for name in names
        ]

    # -- urine -----------------------------------------------------------------------------

    def _urine(self, device: str, q: dict[str, Reading], at: datetime) -> list[Alert]:
        alerts: list[Alert] = []
        alerts += self._ph_band(device, q.get("urine.ph"), at)
        nitrite, leukocytes = q.get("urine.nitrite"), q.get("urine.leukocytes")
        if nitrite is not None and (nitrite.ordinal or 0) >= 2:
            alerts.append(Alert("urine-nitrite-positive", device, "event", "medium", at,
                                "nitrite positive: possible urinary infection",
                                nitrite.text or "pos"))
        if leukocytes is not None and (leukocytes.ordinal or 0) >= self.rules.leukocytes_min_grade:
            alerts.append(Alert("urine-leukocytes", device, "event", "medium", at,
                                f"leukocytes {leukocytes.text or leukocytes.ordinal}",
                                leukocytes.text or leukocytes.ordinal))
        sg = q.get("urine.sg")
        local = at.astimezone(self.zone)
        morning = (time.fromisoformat(self.rules.morning_start) <= local.time()
                   < time.fromisoformat(self.rules.morning_end))
        if sg is not None and sg.value is not None and morning \
                and local.date() not in self._morning_checked:
            self._morning_checked.add(local.date())
            high = sg.value >= self.rules.sg_morning_high and sg.comparator not in ("<", "<=")
            if high:
                alerts.append(Alert("urine-sg-high-morning", device, "event", "low", at,
                                    f"morning urine specific gravity {sg.value:g}: drink more",
                                    sg.value, self.rules.sg_morning_high))
        return alerts

    def _ph_band(self, device: str, ph: Reading | None, at: datetime) -> list[Alert]:
        band = self.rules.ph_band
        if band is None or ph is None or ph.value is None:
            return []
        low, high = band
        outside = ph.value < low or ph.value > high
        self._ph_out_run = self._ph_out_run + 1 if outside else 0
        if outside and self._ph_out_run >= self.rules.ph_consecutive \
                and not self._ph_alert_active:
            self._ph_alert_active = True
            return [Alert("urine-ph-out-of-band", device, "active", "medium", at,
                          f"urine pH {ph.value:g} outside {low:g}-{high:g} "
                          f"({self.rules.stone_type.replace('_', ' ')}) on "
                          f"{self._ph_out_run} consecutive readings", ph.value,
                          f"{low:g}-{high:g}")]
        if not outside and self._ph_alert_active:
            self._ph_alert_active = False
            return [Alert("urine-ph-out-of-band", device, "cleared", "medium", at,
                          f"urine pH {ph.value:g} back in band", ph.value, f"{low:g}-{high:g}")]
        return []
