"""Clinical alert rules: each rule with the data that triggers it and the data that must not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemons.gateway.alerts import Alert, AlertEngine, RulesSection
from drivers.measurement import Measurement, Reading
from drivers.urinalysis import Grade
from medge import config

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)  # a Monday, 07:00 in Berlin


def engine(**rules: object) -> AlertEngine:
    return AlertEngine(config.from_mapping(rules, RulesSection), clock=lambda: T0)


def measure(*readings: Reading, at: datetime = T0) -> Measurement:
    return Measurement("test", "SN1", readings, received_at=at)


def oximetry(spo2: float | None, pulse: float = 70.0, flags: frozenset[str] = frozenset()
             ) -> Measurement:
    return measure(Reading("spo2", spo2, "%", text=None if spo2 else "no signal", flags=flags),
                   Reading("pulse_rate", pulse, "/min", flags=flags))


def run_oximetry(eng: AlertEngine, samples: list[tuple[float | None, float, frozenset[str]]],
                 start: datetime = T0) -> list[tuple[int, Alert]]:
    """Feed one sample per second; return (second, alert) pairs."""
    out = []
    for second, (spo2, pulse, flags) in enumerate(samples):
        at = start + timedelta(seconds=second)
        out += [(second, a) for a in eng.feed("oxi", oximetry(spo2, pulse, flags), at)]
    return out


OK, ARTEFACT = frozenset[str](), frozenset({"artefact"})
FINGER_OUT = frozenset({"finger_out"})


def test_spo2_low_sustained_raises_after_the_sustain_time_then_clears_with_hysteresis() -> None:
    eng = engine(spo2_low=88, spo2_sustain_s=60, spo2_clear_margin=2, spo2_clear_s=30)
    samples = [(85.0, 70.0, OK)] * 70 + [(89.0, 70.0, OK)] * 60 + [(91.0, 70.0, OK)] * 40
    alerts = run_oximetry(eng, samples)
    assert [(s, a.rule, a.state) for s, a in alerts] == [
        (60, "spo2-low", "active"), (160, "spo2-low", "cleared")]
    assert alerts[0][1].priority == "high"
    assert alerts[0][1].value == 85.0 and alerts[0][1].threshold == 88


def test_spo2_dips_shorter_than_the_sustain_time_do_not_alert() -> None:
    eng = engine(spo2_low=88, spo2_sustain_s=60)
    samples = ([(85.0, 70.0, OK)] * 50 + [(90.0, 70.0, OK)]) * 4
    assert run_oximetry(eng, samples) == []


def test_spo2_hovering_just_above_the_threshold_does_not_clear() -> None:
    eng = engine(spo2_low=88, spo2_sustain_s=10, spo2_clear_margin=2, spo2_clear_s=10)
    samples = [(85.0, 70.0, OK)] * 15 + [(89.0, 70.0, OK)] * 200  # 89 < 88 + 2
    alerts = run_oximetry(eng, samples)
    assert [(a.rule, a.state) for _, a in alerts] == [("spo2-low", "active")]


def test_low_values_flagged_as_artefact_or_finger_out_never_alert() -> None:
    eng = engine(spo2_low=88, spo2_sustain_s=30)
    samples = [(70.0, 70.0, ARTEFACT)] * 100 + [(60.0, 200.0, FINGER_OUT)] * 100
    assert run_oximetry(eng, samples) == []


def test_artefact_gap_longer_than_allowed_restarts_the_sustained_count() -> None:
    eng = engine(spo2_low=88, spo2_sustain_s=60, artefact_gap_s=15)
    samples = [(85.0, 70.0, OK)] * 40 + [(85.0, 70.0, ARTEFACT)] * 20 + [(85.0, 70.0, OK)] * 40
    assert run_oximetry(eng, samples) == []
    # the same gap within the allowance keeps counting the valid low samples
    eng = engine(spo2_low=88, spo2_sustain_s=60, artefact_gap_s=15)
    samples = [(85.0, 70.0, OK)] * 40 + [(85.0, 70.0, ARTEFACT)] * 10 + [(85.0, 70.0, OK)] * 40
    assert [(s, a.state) for s, a in run_oximetry(eng, samples)] == [(60, "active")]


def test_pulse_out_of_range_high_and_low() -> None:
    eng = engine(pulse_low=40, pulse_high=140, pulse_sustain_s=30, pulse_clear_margin=5)
    samples = ([(95.0, 150.0, OK)] * 40 + [(95.0, 137.0, OK)] * 40 + [(95.0, 80.0, OK)] * 40
               + [(95.0, 35.0, OK)] * 40)
    alerts = [(s, a.rule, a.state) for s, a in run_oximetry(eng, samples)]
    assert alerts == [(30, "pulse-high", "active"), (110, "pulse-high", "cleared"),
                      (150, "pulse-low", "active")]
    # 137 is below 140 but not below 140 - 5: it does not clear (hysteresis)


def test_pulse_spike_under_artefact_flag_is_ignored() -> None:
    eng = engine(pulse_high=140, pulse_sustain_s=5)
    assert run_oximetry(eng, [(95.0, 220.0, ARTEFACT)] * 60) == []


def test_no_valid_signal_for_too_long_raises_then_clears_on_valid_data() -> None:
    eng = engine(no_signal_s=300)
    eng.feed("oxi", oximetry(95.0), T0)
    assert eng.tick(T0 + timedelta(seconds=200)) == []
    for second in range(1, 400, 10):
        eng.feed("oxi", oximetry(None, 0, FINGER_OUT), T0 + timedelta(seconds=second))
    raised = eng.tick(T0 + timedelta(seconds=301))
    assert [(a.rule, a.state) for a in raised] == [("no-valid-signal", "active")]
    assert eng.tick(T0 + timedelta(seconds=500)) == []  # raised once, not every tick
    cleared = eng.feed("oxi", oximetry(96.0), T0 + timedelta(seconds=501))
    assert [(a.rule, a.state) for a in cleared] == [("no-valid-signal", "cleared")]


def test_no_valid_signal_counts_from_the_first_data_when_the_probe_was_never_worn() -> None:
    eng = engine(no_signal_s=300)
    eng.feed("oxi", oximetry(None, 0, FINGER_OUT), T0)
    assert eng.tick(T0 + timedelta(seconds=299)) == []
    assert [a.rule for a in eng.tick(T0 + timedelta(seconds=300))] == ["no-valid-signal"]


def vent(leak: float = 20.0, alarms: str = "none", at: datetime = T0) -> Measurement:
    return measure(Reading("vent.leak", leak, "L/min"),
                   Reading("vent.alarms", 0.0, "1", text=alarms), at=at)


def test_ventilator_alarm_bits_raise_and_clear_each_alarm() -> None:
    eng = engine()
    assert eng.feed("vent", vent(alarms="none"), T0) == []
    raised = eng.feed("vent", vent(alarms="disconnection,high_leak"), T0)
    assert sorted((a.rule, a.state, a.priority) for a in raised) == [
        ("device-alarm:disconnection", "active", "high"),
        ("device-alarm:high_leak", "active", "medium")]
    assert eng.feed("vent", vent(alarms="disconnection,high_leak"), T0) == []  # no repeats
    changed = eng.feed("vent", vent(alarms="apnoea,high_leak"), T0)
    assert sorted((a.rule, a.state) for a in changed) == [
        ("device-alarm:apnoea", "active"), ("device-alarm:disconnection", "cleared")]


def test_high_leak_must_be_sustained_and_clears_below_ninety_percent() -> None:
    eng = engine(leak_high=60, leak_sustain_s=30)
    seen = []
    for second, leak in enumerate([70.0] * 20 + [20.0] + [70.0] * 40 + [57.0] * 40 + [50.0] * 40):
        seen += [(second, a.state) for a in eng.feed("vent", vent(leak), T0 + timedelta(
            seconds=second))]
    assert seen == [(51, "active"), (131, "cleared")]


def strip(ph: float | None = 6.2, nitrite: int = 0, leukocytes: int = 0, sg: float = 1.010,
          sg_comparator: str | None = None) -> Measurement:
    readings = [Reading("urine.nitrite", None, "", text="pos" if nitrite else "neg",
                        ordinal=nitrite),
                Reading("urine.leukocytes", None, "{Leu}/uL", text="x", ordinal=leukocytes),
                Reading("urine.sg", sg, "1", comparator=sg_comparator)]
    if ph is not None:
        readings.append(Reading("urine.ph", ph, "[pH]"))
    return measure(*readings)


def test_urine_ph_out_of_band_needs_consecutive_readings_and_clears_in_band() -> None:
    eng = engine(stone_type="uric_acid", ph_consecutive=2)  # band 6.0-6.5
    noon = T0 + timedelta(hours=6)
    states = []
    for ph in (5.5, 6.0, 5.5, 5.0, 5.0, 6.5):
        states += [(ph, a.rule, a.state) for a in eng.feed("urine", strip(ph), noon)]
    assert states == [(5.0, "urine-ph-out-of-band", "active"),
                      (6.5, "urine-ph-out-of-band", "cleared")]


def test_urine_ph_band_follows_the_stone_type_and_explicit_limits() -> None:
    cystine = engine(stone_type="cystine", ph_consecutive=1)
    assert cystine.feed("urine", strip(7.0), T0)[0].threshold == "7.5-8"
    custom = engine(stone_type="cystine", ph_low=7.0, ph_consecutive=1)
    assert [a.rule for a in custom.feed("urine", strip(7.0), T0)
            if a.rule.startswith("urine-ph")] == []
    assert [a for a in engine().feed("urine", strip(4.5), T0) if "ph" in a.rule] == []


def test_nitrite_positive_or_leukocytes_from_one_plus_alert_on_every_such_strip() -> None:
    eng = engine()
    later = T0 + timedelta(hours=8)
    assert [a.rule for a in eng.feed("u", strip(nitrite=int(Grade.ONE_PLUS)), later)] == [
        "urine-nitrite-positive"]
    assert [a.rule for a in eng.feed("u", strip(leukocytes=int(Grade.ONE_PLUS)), later)] == [
        "urine-leukocytes"]
    assert eng.feed("u", strip(leukocytes=int(Grade.TRACE)), later) == []
    assert [a.state for a in eng.feed("u", strip(nitrite=2), later)] == ["event"]


@pytest.mark.parametrize(("hour_utc", "sg", "comparator", "expected"), [
    (6, 1.025, None, ["urine-sg-high-morning"]),   # 07:00 Berlin: morning
    (6, 1.030, ">=", ["urine-sg-high-morning"]),
    (6, 1.015, None, []),
    (6, 1.025, "<", []),
    (13, 1.025, None, []),                         # 14:00 Berlin: not a morning void
])
def test_sg_high_only_on_a_morning_void(hour_utc: int, sg: float, comparator: str | None,
                                       expected: list[str]) -> None:
    eng = engine(timezone="Europe/Berlin", sg_morning_high=1.020)
    at = T0.replace(hour=hour_utc)
    assert [a.rule for a in eng.feed("u", strip(sg=sg, sg_comparator=comparator), at)] \
        == expected


def test_sg_only_the_first_morning_void_of_a_day_counts() -> None:
    eng = engine(timezone="Europe/Berlin")
    assert eng.feed("u", strip(sg=1.010), T0) == []
    assert eng.feed("u", strip(sg=1.030), T0 + timedelta(hours=1)) == []


def void(ml: float, at: datetime) -> Measurement:
    return measure(Reading("uroflow.voided_volume", ml, "mL"), at=at)


def test_daily_voided_volume_below_target_is_reported_after_the_day_ends() -> None:
    eng = engine(timezone="Europe/Berlin", daily_volume_low_ml=2000)
    day = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    for hour in (0, 4, 8, 12):
        eng.feed("flow", void(300, day + timedelta(hours=hour)), day + timedelta(hours=hour))
    assert eng.tick(day + timedelta(hours=14)) == []  # 21:00 local: the day is not over
    alerts = eng.tick(day + timedelta(hours=17, minutes=1))  # 00:01 local next day
    assert [(a.rule, a.value) for a in alerts] == [("daily-voided-volume-low", 1200)]
    assert eng.tick(day + timedelta(hours=20)) == []  # once per day


def test_daily_voided_volume_meeting_the_target_is_quiet() -> None:
    eng = engine(daily_volume_low_ml=2000)
    day = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    for hour in range(8):
        eng.feed("flow", void(300, day + timedelta(hours=hour)), day + timedelta(hours=hour))
    assert eng.tick(day + timedelta(days=1)) == []


@pytest.mark.parametrize(("rules", "key"), [
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"pulse_low": 150, "pulse_high": 100}, "pulse_low"),
    ({"ph_low": 7.0, "ph_high": 6.0}, "ph_low"),
    ({"spo2_low": 120}, "spo2_low"),
    ({"stone_type": "diamond"}, "stone_type"),
    ({"morning_start": "7 am"}, "morning_start"),
])
def test_bad_rule_settings_are_refused_with_the_reason(rules: dict[str, object],
                                                       key: str) -> None:
    with pytest.raises(config.ConfigError, match=key):
        config.from_mapping(rules, RulesSection, source="gateway.toml")
