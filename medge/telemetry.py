"""FHIR R4 Observation bodies for telemetry (LOINC + UCUM, IEEE 11073 MDC where one exists).

Conventions (docs/telemetry.md, clinical references there):

- ``effectiveDateTime`` is the best estimate of when the measurement was taken: the device's
  clock corrected by the measured offset, or the gateway's time when the device has no clock.
  ``issued`` is the gateway's receipt time. The device's own, uncorrected clock reading is kept
  in an extension, so a wrong device clock can be audited but never reorders or drops data.
- ``identifier`` is a SHA-256 of device, code, device time and value: the same reading sent
  twice (outbox replay, analyzer retransmission) gets the same identifier and a receiver upserts.
- ``subject`` comes only from the gateway's enrolment, never from a field typed on a device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
MDC = "urn:iso:std:iso:11073:10101"
SNOMED = "http://snomed.info/sct"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IDENTIFIER_SYSTEM = "urn:medge:observation"
DEVICE_CLOCK_EXTENSION = "urn:medge:fhir:extension:device-clock"
MEDGE_CODES = "urn:medge:code"
"""Local code system for quantities without a LOINC code (e.g. uroflow Qmax), until mapped."""


@dataclass(frozen=True)
class Code:
    system: str
    code: str
    display: str = ""

    def coding(self) -> dict[str, str]:
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass(frozen=True)
class Quantity:
    value: float
    unit: str
    """UCUM code, e.g. ``%``, ``/min``, ``mL/s``, ``cm[H2O]``."""

    def fhir(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "system": UCUM, "code": self.unit}


@dataclass(frozen=True)
class Sampled:
    """A waveform (uroflow curve, pleth) as FHIR SampledData."""

    period_ms: float
    values: Sequence[float]
    unit: str
    lower: float | None = None
    upper: float | None = None

    def fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "origin": {"value": 0, "unit": self.unit, "system": UCUM, "code": self.unit},
            "period": self.period_ms,
            "dimensions": 1,
            "data": " ".join(_number(v) for v in self.values) or "E",
        }
        if self.lower is not None:
            out["lowerLimit"] = self.lower
        if self.upper is not None:
            out["upperLimit"] = self.upper
        return out


Value = Quantity | Code | str | Sampled


def fhir_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("FHIR times need a time zone; got a naive datetime")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def observation_identifier(device_id: str, code: Code, device_time: str, value: Value) -> str:
    """Stable across retransmissions of the same reading (a receiver upserts on it)."""
    material = "|".join((device_id, code.system, code.code, device_time, _value_key(value)))
    return hashlib.sha256(material.encode()).hexdigest()


def observation(
    *,
    codes: Sequence[Code],
    value: Value | None,
    device_id: str,
    received_at: datetime,
    device_time: datetime | None = None,
    clock_offset_s: float = 0.0,
    category: str = "vital-signs",
    patient: str | None = None,
    components: Sequence[tuple[Sequence[Code], Value]] = (),
    interpretation: Code | None = None,
    status: str = "final",
    note: str | None = None,
) -> dict[str, Any]:
    """Build an R4 Observation as a JSON-ready dict.

    ``clock_offset_s`` is gateway time minus device time, as measured at receipt; the effective
    time is ``device_time + offset``. Without a device time the receipt time is used.
    """
    if not codes:
        raise ValueError("an Observation needs at least one code")
    if device_time is not None:
        effective = datetime.fromtimestamp(device_time.timestamp() + clock_offset_s, UTC)
        stamp_source = fhir_time(device_time)
    else:
        effective = received_at
        stamp_source = fhir_time(received_at)
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{
            "system": IDENTIFIER_SYSTEM,
            "value": observation_identifier(device_id, codes[0], stamp_source,
                                            value if value is not None else ""),
        }],
        "status": status,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [c.coding() for c in codes]},
        "effectiveDateTime": fhir_time(effective),
        "issued": fhir_time(received_at),
        "device": {"identifier": {"system": "urn:medge:device", "value": device_id}},
    }
    if device_time is not None:
        body["extension"] = [{"url": DEVICE_CLOCK_EXTENSION,
                              "valueDateTime": fhir_time(device_time)}]
    if patient is not None:
        body["subject"] = {"reference": f"Patient/{patient}"}
    if value is not None:
        body.update(_value_field(value))
    if components:
        body["component"] = [
            {"code": {"coding": [c.coding() for c in ccodes]}, **_value_field(cvalue)}
            for ccodes, cvalue in components
        ]
    if interpretation is not None:
        body["interpretation"] = [{"coding": [interpretation.coding()]}]
    if note:
        body["note"] = [{"text": note}]
    return body


def _value_field(value: Value) -> dict[str, Any]:
    if isinstance(value, Quantity):
        return {"valueQuantity": value.fhir()}
    if isinstance(value, Code):
        concept: dict[str, Any] = {"coding": [value.coding()]}
        if value.display:
            concept["text"] = value.display
        return {"valueCodeableConcept": concept}
    if isinstance(value, Sampled):
        return {"valueSampledData": value.fhir()}
    return {"valueString": value}


def _value_key(value: Value) -> str:
    if isinstance(value, Quantity):
        return f"{_number(value.value)} {value.unit}"
    if isinstance(value, Code):
        return f"{value.system}#{value.code}"
    if isinstance(value, Sampled):
        return hashlib.sha256(" ".join(_number(v) for v in value.values).encode()).hexdigest()
    return value


def _number(value: float) -> str:
    return format(value, ".6g")
