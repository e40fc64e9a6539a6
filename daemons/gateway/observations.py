"""Measurement → FHIR R4 Observation bodies (codes from clinical-data.md §1, conventions §2).

Every :class:`~drivers.measurement.Reading` becomes one Observation; every waveform
(:class:`~drivers.measurement.Samples`) one Observation with ``valueSampledData``. Quantities
the table does not know still become Observations under the local code system
(``urn:medge:code#<quantity>``), so a new register map or driver never loses data; a register
map's own ``code`` strings (``"LOINC:76248-4 MDC:152720"``) extend the table at start-up.

Semi-quantitative strip results keep the raw token, the grade (SNOMED qualifier) and the
concentration apart (clinical-data.md §5: block values differ by strip brand).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from drivers.measurement import Measurement, Reading, Samples
from medge.telemetry import LOINC, MDC, MEDGE_CODES, SNOMED, Code, Quantity, Sampled, observation

INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
FLAG_SYSTEM = "urn:medge:flag"
"""``meta.tag`` system for gateway flags (``unpaired``, ``clock-skew``, device flags)."""


@dataclass(frozen=True)
class CodeSpec:
    codes: tuple[Code, ...]
    category: str


def _loinc(code: str, display: str = "") -> Code:
    return Code(LOINC, code, display)


def _mdc(code: str, display: str = "") -> Code:
    return Code(MDC, code, display)


VITAL, LAB, THERAPY, PROCEDURE = "vital-signs", "laboratory", "therapy", "procedure"

CODE_TABLE: dict[str, CodeSpec] = {
    "spo2": CodeSpec((_loinc("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
                      _loinc("2708-6", "Oxygen saturation in Arterial blood"),
                      _mdc("150456", "MDC_PULS_OXIM_SAT_O2")), VITAL),
    "pulse_rate": CodeSpec((_loinc("8867-4", "Heart rate"),
                            _mdc("149530", "MDC_PULS_OXIM_PULS_RATE")), VITAL),
    "resp_rate": CodeSpec((_loinc("9279-1", "Respiratory rate"),
                           _mdc("151562", "MDC_RESP_RATE")), VITAL),
    "pleth": CodeSpec((_mdc("150452", "MDC_PULS_OXIM_PLETH"),), VITAL),
    "vent.resp_rate": CodeSpec((_loinc("33438-3", "Breath rate mechanical --on ventilator"),
                                _loinc("9279-1", "Respiratory rate"),
                                _mdc("151586", "MDC_VENT_RESP_RATE")), VITAL),
    "vent.tidal_volume": CodeSpec((_loinc("76007-4"), _mdc("151868", "MDC_VOL_AWAY_TIDAL")),
                                  THERAPY),
    "vent.minute_volume": CodeSpec((_mdc("151880", "MDC_VOL_MINUTE_AWAY"),), THERAPY),
    "vent.leak": CodeSpec((_mdc("152432", "MDC_VENT_VOL_LEAK"),), THERAPY),
    "vent.peep": CodeSpec((_loinc("76248-4"), _mdc("152720", "MDC_VENT_PRESS_AWAY_DELTA")),
                          THERAPY),
    "vent.fio2": CodeSpec((_loinc("3150-0", "Inhaled oxygen concentration"),), THERAPY),
    "vent.o2_flow": CodeSpec((_loinc("3151-8", "Inhaled oxygen flow rate"),), THERAPY),
    "vent.set.ipap": CodeSpec((_mdc("8410976", "MDC_SABTE_PRESS_IPAP_SET"),), THERAPY),
    "vent.set.epap": CodeSpec((_loinc("20077-4"),), THERAPY),
    "vent.set.resp_rate": CodeSpec((_loinc("19834-1"),), THERAPY),
    "vent.set.tidal_volume": CodeSpec(
        (_loinc("20112-9"), _mdc("16929196", "MDC_VENT_VOL_TIDAL_SETTING")), THERAPY),
    "urine.ph": CodeSpec((_loinc("5803-2", "pH of Urine by Test strip"),), LAB),
    "urine.sg": CodeSpec((_loinc("5811-5", "Specific gravity of Urine by Test strip"),), LAB),
    "urine.leukocytes": CodeSpec((_loinc("5799-2", "Leukocyte esterase in Urine by Test strip"),),
                                 LAB),
    "urine.nitrite": CodeSpec((_loinc("5802-4", "Nitrite in Urine by Test strip"),), LAB),
    "urine.blood": CodeSpec((_loinc("5794-3", "Hemoglobin in Urine by Test strip"),), LAB),
    "urine.protein": CodeSpec((_loinc("5804-0", "Protein in Urine by Test strip"),), LAB),
    "urine.glucose": CodeSpec((_loinc("5792-7", "Glucose in Urine by Test strip"),), LAB),
    "urine.ketones": CodeSpec((_loinc("2514-8", "Ketones in Urine by Test strip"),), LAB),
    "urine.bilirubin": CodeSpec((_loinc("5770-3", "Bilirubin in Urine by Test strip"),), LAB),
    "urine.urobilinogen": CodeSpec((_loinc("5818-0", "Urobilinogen in Urine by Test strip"),),
                                   LAB),
    "uroflow.voided_volume": CodeSpec((_loinc("9187-6", "Urine output"),
                                       Code(MEDGE_CODES, "uroflow.voided_volume")), PROCEDURE),
}
"""Known quantities; ``uroflow.*`` other than the volume have no LOINC (clinical-data.md §1.2)
and fall back to local codes."""

CATEGORY_BY_PREFIX = {"urine.": LAB, "uroflow.": PROCEDURE, "vent.": THERAPY}

GRADE_CODES: dict[int, Code] = {
    0: Code(SNOMED, "260385009", "Negative"),
    1: Code(SNOMED, "260405006", "Trace"),
    2: Code(SNOMED, "260347006", "+"),
    3: Code(SNOMED, "260348001", "++"),
    4: Code(SNOMED, "260349009", "+++"),
    5: Code(SNOMED, "260350009", "++++"),
}
"""Strip grades (drivers.urinalysis.Grade) as SNOMED CT qualifier values (US Core examples)."""
POSITIVE_ONLY = Code(SNOMED, "10828004", "Positive")
POSITIVE_ONLY_PADS = frozenset({"urine.nitrite"})
ABNORMAL = Code(INTERPRETATION, "A", "Abnormal")


def parse_code_string(text: str) -> tuple[Code, ...]:
    """``"LOINC:76248-4 MDC:152720"`` (register-map notation) → codes; unknown systems raise."""
    systems = {"LOINC": LOINC, "MDC": MDC, "SNOMED": SNOMED}
    codes = []
    for token in text.split():
        prefix, _, code = token.partition(":")
        if prefix.upper() not in systems or not code:
            raise ValueError(f"code {token!r}: expected LOINC:<code>, MDC:<code> or SNOMED:<code>")
        codes.append(Code(systems[prefix.upper()], code))
    return tuple(codes)


def code_for(quantity: str, extra: Mapping[str, CodeSpec] | None = None) -> CodeSpec:
    """Codes for a quantity: the device's own map first, then the table, then a local code."""
    if extra and quantity in extra:
        return extra[quantity]
    if quantity in CODE_TABLE:
        return CODE_TABLE[quantity]
    category = next((c for p, c in CATEGORY_BY_PREFIX.items() if quantity.startswith(p)), VITAL)
    return CodeSpec((Code(MEDGE_CODES, quantity),), category)


@dataclass(frozen=True)
class Context:
    """What the gateway adds to a device's measurement: identity, enrolment, clock offset."""

    device_ref: str
    """Stable device identity for ``Observation.device`` and the de-duplication identifier."""
    patient: str | None
    """Pseudonymous patient id from the enrolment, or None when the device is not paired."""
    clock_offset_s: float = 0.0
    """Gateway time minus device time (estimated clock error), applied to device times."""
    clock_skewed: bool = False
    extra_codes: Mapping[str, CodeSpec] | None = None


def observations(
    measurement: Measurement, ctx: Context, *, with_samples: bool = True
) -> list[dict[str, Any]]:
    """One Observation per reading (and per waveform when ``with_samples``)."""
    bodies = [_reading_observation(measurement, reading, ctx)
              for reading in measurement.readings]
    if with_samples:
        bodies += [_samples_observation(measurement, samples, ctx)
                   for samples in measurement.samples]
    return bodies


def _reading_observation(m: Measurement, r: Reading, ctx: Context) -> dict[str, Any]:
    spec = code_for(r.quantity, ctx.extra_codes)
    device_time = r.device_time or m.device_time
    value, components = _value(r)
    body = observation(
        codes=spec.codes, value=value, device_id=ctx.device_ref, received_at=m.received_at,
        device_time=device_time, clock_offset_s=ctx.clock_offset_s, category=spec.category,
        patient=ctx.patient, components=components,
        interpretation=ABNORMAL if "abnormal" in r.flags else None,
        status="final" if ctx.patient else "preliminary",
        note=f"device reported: {r.text}" if r.text and value is None else None,
    )
    if value is None:
        body["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT, "code": "error"}], "text": r.text or "no value"}
    elif r.comparator and "valueQuantity" in body:
        body["valueQuantity"]["comparator"] = r.comparator
    elif r.text and "valueCodeableConcept" in body:
        body["valueCodeableConcept"]["text"] = r.text  # the device's own token, e.g. "+/-"
    _tag(body, ctx, r.flags - {"abnormal"})
    return body


Component = tuple[tuple[Code, ...], Quantity | Code | str]


def _value(r: Reading) -> tuple[Quantity | Code | str | None, list[Component]]:
    """The main value, plus a concentration component for graded strip pads."""
    if r.ordinal is not None:
        grade = POSITIVE_ONLY if (r.quantity in POSITIVE_ONLY_PADS and r.ordinal > 0) else \
            GRADE_CODES.get(r.ordinal, Code(MEDGE_CODES, f"grade-{r.ordinal}"))
        components: list[Component] = []
        if r.value is not None and r.unit:
            components.append(((Code(MEDGE_CODES, f"{r.quantity}.concentration"),),
                               Quantity(r.value, r.unit)))
        return grade, components
    if r.value is not None and r.text is None:
        return Quantity(r.value, r.unit or "1"), []
    if r.text is not None and r.value is not None:
        return r.text, []  # e.g. alarm bits: the active alarm names
    return None, []


def _samples_observation(m: Measurement, s: Samples, ctx: Context) -> dict[str, Any]:
    spec = code_for(s.quantity, ctx.extra_codes)
    body = observation(
        codes=spec.codes, device_id=ctx.device_ref, received_at=m.received_at,
        value=Sampled(period_ms=s.period / timedelta(milliseconds=1), values=s.values,
                      unit=s.unit),
        device_time=s.start or m.device_time, clock_offset_s=ctx.clock_offset_s,
        category=spec.category, patient=ctx.patient,
        status="final" if ctx.patient else "preliminary",
    )
    _tag(body, ctx, frozenset())
    return body


def _tag(body: dict[str, Any], ctx: Context, flags: Iterable[str]) -> None:
    """Flags a receiver must see: unpaired (no subject), clock skew, device flags."""
    tags = sorted(set(flags))
    if ctx.patient is None:
        tags.append("unpaired")
    if ctx.clock_skewed:
        tags.append("clock-skew")
    if tags:
        body["meta"] = {"tag": [{"system": FLAG_SYSTEM, "code": t} for t in tags]}


def effective_time(device_time: datetime | None, received_at: datetime,
                   clock_offset_s: float) -> datetime:
    """When the reading was taken, on the gateway's clock (what alert rules reason about)."""
    if device_time is None:
        return received_at
    return device_time + timedelta(seconds=clock_offset_s)


def codes_from_strings(pairs: Iterable[tuple[str, str]]) -> dict[str, CodeSpec]:
    """A device's own code table from (quantity, ``"LOINC:… MDC:…"``) pairs (register maps),
    added to what :data:`CODE_TABLE` already says about the quantity."""
    table: dict[str, CodeSpec] = {}
    for quantity, text in pairs:
        if not text.strip():
            continue
        known = CODE_TABLE.get(quantity)
        base = known.codes if known else ()
        merged = base + tuple(c for c in parse_code_string(text)
                              if (c.system, c.code) not in {(b.system, b.code) for b in base})
        table[quantity] = CodeSpec(merged, code_for(quantity).category)
    return table
