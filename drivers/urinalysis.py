"""Urine test-strip pads and their semi-quantitative scales, shared by every urine dialect.

ASTM records and printouts spell the same result many ways (``neg``, ``NEGATIV``, ``-``;
``+/-``, ``+-``, ``trace``; ``1+``, ``++``; ``Ca 10 Ery/uL``; ``>=1.030``; ``0,2``). This module
turns the tokens of one pad into a :class:`~drivers.measurement.Reading` that keeps the device's
wording (``text``), the grade (``ordinal``, a :class:`Grade`) and the concentration (``value`` +
UCUM ``unit``) separately, because block values differ between strip brands
(clinical-data.md §5). Block tables are typical Multistix/Combur levels, used only to grade a
result that the device reports as a bare concentration (Clinitek ``LEU 0 Leu/uL``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from drivers.measurement import Reading


class UrinalysisError(ValueError):
    """A pad result could not be understood; the message names the pad and the token."""


class Grade(IntEnum):
    """Ordinal grade of a semi-quantitative pad; ``Reading.ordinal`` holds its value."""

    NEGATIVE = 0
    TRACE = 1
    ONE_PLUS = 2
    TWO_PLUS = 3
    THREE_PLUS = 4
    FOUR_PLUS = 5


POSITIVE = Grade.ONE_PLUS
"""Grade of a positive-only pad (nitrite ``pos`` / ``+``), so ``ordinal >= ONE_PLUS`` works."""


@dataclass(frozen=True)
class Pad:
    """One reagent pad: its reading key, default UCUM unit and block scale."""

    quantity: str
    unit: str
    blocks: tuple[tuple[float, Grade], ...] = ()
    """(lowest concentration of the block, grade), ascending; empty for pH and SG."""

    @property
    def graded(self) -> bool:
        return bool(self.blocks) or self.unit == ""

    def grade_of(self, value: float) -> Grade | None:
        if not self.blocks:
            return None
        grade = self.blocks[0][1]
        for lowest, block_grade in self.blocks:
            if value >= lowest:
                grade = block_grade
        return grade


_G = Grade
PH = Pad("urine.ph", "[pH]")
SG = Pad("urine.sg", "1")
LEUKOCYTES = Pad("urine.leukocytes", "{Leu}/uL", (
    (0, _G.NEGATIVE), (15, _G.TRACE), (70, _G.ONE_PLUS), (125, _G.TWO_PLUS), (500, _G.THREE_PLUS)))
NITRITE = Pad("urine.nitrite", "")
BLOOD = Pad("urine.blood", "{Ery}/uL", (
    (0, _G.NEGATIVE), (10, _G.TRACE), (25, _G.ONE_PLUS), (80, _G.TWO_PLUS), (200, _G.THREE_PLUS)))
PROTEIN = Pad("urine.protein", "mg/dL", (
    (0, _G.NEGATIVE), (15, _G.TRACE), (30, _G.ONE_PLUS), (100, _G.TWO_PLUS),
    (300, _G.THREE_PLUS), (2000, _G.FOUR_PLUS)))
GLUCOSE = Pad("urine.glucose", "mg/dL", (
    (0, _G.NEGATIVE), (100, _G.TRACE), (250, _G.ONE_PLUS), (500, _G.TWO_PLUS),
    (1000, _G.THREE_PLUS)))
KETONES = Pad("urine.ketones", "mg/dL", (
    (0, _G.NEGATIVE), (5, _G.TRACE), (15, _G.ONE_PLUS), (40, _G.TWO_PLUS), (80, _G.THREE_PLUS)))
BILIRUBIN = Pad("urine.bilirubin", "mg/dL", (
    (0, _G.NEGATIVE), (1, _G.ONE_PLUS), (2, _G.TWO_PLUS), (4, _G.THREE_PLUS)))
UROBILINOGEN = Pad("urine.urobilinogen", "mg/dL", (
    (0, _G.NEGATIVE), (1, _G.TRACE), (2, _G.ONE_PLUS), (4, _G.TWO_PLUS), (8, _G.THREE_PLUS)))

PADS_BY_CODE: dict[str, Pad] = {
    "PH": PH, "P.H": PH,
    "SG": SG, "S.G": SG, "S.G.": SG,
    "LEU": LEUKOCYTES, "WBC": LEUKOCYTES,
    "NIT": NITRITE,
    "BLD": BLOOD, "BLO": BLOOD, "ERY": BLOOD, "OBL": BLOOD,
    "PRO": PROTEIN,
    "GLU": GLUCOSE,
    "KET": KETONES,
    "BIL": BILIRUBIN,
    "UBG": UROBILINOGEN, "URO": UROBILINOGEN,
}
"""Test codes and printout labels (ASTM, Clinitek incl. German ``OBL``, Consult 120, URiSCAN)."""

UNITS: dict[str, str] = {
    "mg/dl": "mg/dL", "[ph]": "[pH]", "1": "1",
    "leu/ul": "{Leu}/uL", "wbc/ul": "{Leu}/uL", "{leu}/ul": "{Leu}/uL",
    "ery/ul": "{Ery}/uL", "rbc/ul": "{Ery}/uL", "{ery}/ul": "{Ery}/uL",
    "{urine specific gravity}": "1",
}
"""Device unit spellings (lower-cased) → UCUM."""

_WORDS: dict[str, Grade] = {
    "-": _G.NEGATIVE, "neg": _G.NEGATIVE, "negativ": _G.NEGATIVE, "negative": _G.NEGATIVE,
    "norm": _G.NEGATIVE, "normal": _G.NEGATIVE,
    "+/-": _G.TRACE, "+-": _G.TRACE, "±": _G.TRACE, "trace": _G.TRACE, "tr": _G.TRACE,
    "spur": _G.TRACE, "spuren": _G.TRACE,
    "pos": POSITIVE, "positiv": POSITIVE, "positive": POSITIVE,
    "1+": _G.ONE_PLUS, "2+": _G.TWO_PLUS, "3+": _G.THREE_PLUS, "4+": _G.FOUR_PLUS,
    "+": _G.ONE_PLUS, "++": _G.TWO_PLUS, "+++": _G.THREE_PLUS, "++++": _G.FOUR_PLUS,
}
_APPROXIMATE = {"ca", "ca.", "~", "approx"}
_NUMBER = re.compile(r"^(<=|>=|<|>|≤|≥)?(\d+(?:[.,]\d+)?)$")
_COMPARATOR = {"≤": "<=", "≥": ">="}


def pad_for(code: str) -> Pad:
    """The pad named by an ASTM test code or printout label (case-insensitive)."""
    try:
        return PADS_BY_CODE[code.strip().upper()]
    except KeyError:
        raise UrinalysisError(f"unknown urine test code {code!r}") from None


def ucum_unit(spelling: str) -> str:
    try:
        return UNITS[spelling.strip().lower()]
    except KeyError:
        raise UrinalysisError(f"unknown unit {spelling!r}") from None


def parse_pad(
    pad: Pad,
    tokens: list[str],
    *,
    unit: str = "",
    device_time: datetime | None = None,
    flags: frozenset[str] = frozenset(),
) -> Reading:
    """Build the reading of ``pad`` from its result tokens (``["3+", "500", "Leu/uL"]``).

    ``unit`` is a unit given in a separate field (ASTM); decimal commas are accepted.
    """
    grade: Grade | None = None
    text: str | None = None
    value: float | None = None
    comparator: str | None = None
    for token in tokens:
        lowered = token.lower()
        if lowered in _WORDS and value is None:
            if grade is not None and _WORDS[lowered] != grade:
                raise UrinalysisError(f"{pad.quantity}: contradictory grades in {tokens!r}")
            grade, text = _WORDS[lowered], token if text is None else f"{text} {token}"
        elif lowered in _APPROXIMATE:
            flags |= {"approximate"}
        elif (number := _NUMBER.match(token)) and value is None:
            comparator = _COMPARATOR.get(number[1] or "", number[1])
            value = float(number[2].replace(",", "."))
        elif lowered in UNITS and not unit:
            unit = UNITS[lowered]
        else:
            raise UrinalysisError(f"{pad.quantity}: unexpected token {token!r} in {tokens!r}")
    if value is None and grade is None:
        raise UrinalysisError(f"{pad.quantity}: no result in {tokens!r}")
    if not pad.graded and value is None:
        raise UrinalysisError(f"{pad.quantity}: needs a number, got {tokens!r}")
    if grade is None and value is not None:
        grade = pad.grade_of(value)
    if value is None:
        unit = ""
    elif not unit:
        unit = pad.unit
    return Reading(
        quantity=pad.quantity,
        value=value,
        unit=unit,
        text=text,
        ordinal=None if grade is None else int(grade),
        device_time=device_time,
        flags=flags,
        comparator=comparator,
    )
