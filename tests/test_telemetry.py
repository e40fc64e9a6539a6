"""FHIR Observation bodies validate as FHIR (R4B model of fhir.resources: the Observation resource
is unchanged between R4 and R4B) and carry stable identifiers, both times and the clock offset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fhir.resources.R4B.observation import Observation

from medge.telemetry import (
    LOINC,
    MDC,
    SNOMED,
    Code,
    Quantity,
    Sampled,
    observation,
)

SPO2 = [Code(LOINC, "2708-6", "Oxygen saturation in Arterial blood"),
        Code(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
        Code(MDC, "150456", "MDC_PULS_OXIM_SAT_O2")]
RECEIVED = datetime(2026, 11, 22, 8, 30, 5, tzinfo=UTC)


def test_spo2_observation_validates_and_keeps_both_times() -> None:
    device_time = datetime(2026, 11, 22, 8, 29, 0, tzinfo=UTC)  # device clock 60 s behind
    body = observation(codes=SPO2, value=Quantity(94, "%"), device_id="cms50-ABC123",
                       received_at=RECEIVED, device_time=device_time, clock_offset_s=60.0,
                       patient="pseudo-7f3a")
    parsed = Observation.model_validate(body)
    assert parsed.valueQuantity.value == 94
    assert parsed.valueQuantity.system == "http://unitsofmeasure.org"
    assert body["effectiveDateTime"] == "2026-11-22T08:30:00.000Z"  # corrected by the offset
    assert body["issued"] == "2026-11-22T08:30:05.000Z"
    assert body["extension"][0]["valueDateTime"] == "2026-11-22T08:29:00.000Z"  # raw device time
    assert body["subject"] == {"reference": "Patient/pseudo-7f3a"}
    assert [c["code"] for c in body["code"]["coding"]] == ["2708-6", "59408-5", "150456"]


def test_identifier_is_stable_for_the_same_reading_and_differs_otherwise() -> None:
    device_time = datetime(2026, 1, 1, tzinfo=UTC)

    def make(value: float, received: datetime, when: datetime = device_time) -> str:
        body = observation(codes=SPO2, value=Quantity(value, "%"), device_id="d1",
                           received_at=received, device_time=when)
        return str(body["identifier"][0]["value"])

    same = make(97, RECEIVED)
    assert make(97, RECEIVED + timedelta(hours=5)) == same, "a retransmission upserts"
    assert make(96, RECEIVED) != same
    assert make(97, RECEIVED, device_time + timedelta(seconds=1)) != same


def test_coded_string_and_sampled_values_validate() -> None:
    nitrite = observation(codes=[Code(LOINC, "5802-4", "Nitrite in Urine by Test strip")],
                          value=Code(SNOMED, "10828004", "Positive"), device_id="u1",
                          received_at=RECEIVED, category="laboratory")
    curve = observation(codes=[Code("urn:medge:code", "uroflow-curve", "Urine flow curve")],
                        value=Sampled(period_ms=100, values=[0, 1.5, 12.25, 3], unit="mL/s"),
                        device_id="scale-1", received_at=RECEIVED, category="laboratory",
                        components=[([Code(LOINC, "9279-1")], Quantity(16, "/min"))])
    text = observation(codes=[Code(LOINC, "5803-2")], value="1+", device_id="u1",
                       received_at=RECEIVED, category="laboratory")
    for body in (nitrite, curve, text):
        Observation.model_validate(body)
    assert curve["valueSampledData"]["data"] == "0 1.5 12.25 3"
    assert nitrite["valueCodeableConcept"]["coding"][0]["code"] == "10828004"


def test_naive_times_and_missing_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        observation(codes=SPO2, value=Quantity(1, "%"), device_id="d",
                    received_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="at least one code"):
        observation(codes=[], value=None, device_id="d", received_at=RECEIVED)


def test_a_device_clock_years_off_is_kept_not_dropped() -> None:
    device_time = datetime(2019, 3, 1, tzinfo=UTC)
    offset = (RECEIVED - device_time).total_seconds()
    body = observation(codes=SPO2, value=Quantity(95, "%"), device_id="d", received_at=RECEIVED,
                       device_time=device_time, clock_offset_s=offset)
    Observation.model_validate(body)
    assert body["effectiveDateTime"] == "2026-11-22T08:30:05.000Z"
    assert body["extension"][0]["valueDateTime"].startswith("2019-03-01")
