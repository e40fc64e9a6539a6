"""ASTM E1394 (CLSI LIS2-A2) records: split a message into typed field lists.

Delimiters are not fixed: the header declares them in its second field (``H|\\^&`` → field
``|``, repeat ``\\``, component ``^``, escape ``&``), so every message is parsed with its own.
Field numbers below are 1-based with field 1 = the record type, as in the standard and in
protocols.md §4.5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

RECORD_TYPES = frozenset("HPOQRCMSL")
_FRAME_NUMBER_PREFIX = re.compile(r"^[0-7](?=[A-Z]\|)")


class AstmRecordError(ValueError):
    """A message or record is malformed; the message names the record and the rule broken."""


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"

    @classmethod
    def from_header(cls, header: str) -> Delimiters:
        if len(header) < 5 or header[0] != "H":
            raise AstmRecordError(f"header {header[:16]!r} does not declare its delimiters")
        field, repeat, component, escape = (header[1], header[2], header[3], header[4])
        if len({field, repeat, component, escape}) != 4 or any(c.isalnum() for c in header[1:5]):
            raise AstmRecordError(f"header delimiters {header[1:5]!r} are not 4 distinct symbols")
        return cls(field, repeat, component, escape)

    def unescape(self, text: str) -> str:
        e = self.escape
        if e not in text:
            return text
        for code, char in (("F", self.field), ("S", self.component), ("R", self.repeat)):
            text = text.replace(f"{e}{code}{e}", char)
        return text.replace(f"{e}E{e}", e)


@dataclass(frozen=True)
class Record:
    type: str
    fields: tuple[str, ...]
    """Raw fields; ``fields[0]`` is the record type, so ``field(n)`` is ``fields[n - 1]``."""
    delimiters: Delimiters

    def field(self, number: int) -> str:
        """Raw field ``number`` (1-based), ``""`` if the record is shorter."""
        return self.fields[number - 1] if number <= len(self.fields) else ""

    def components(self, number: int) -> list[str]:
        """Field ``number`` split into unescaped components (first repeat only)."""
        first = self.field(number).split(self.delimiters.repeat)[0]
        return [self.delimiters.unescape(c) for c in first.split(self.delimiters.component)]

    def text(self, number: int) -> str:
        return self.delimiters.unescape(self.field(number))


def parse_records(message: bytes) -> list[Record]:
    """Split message text (records ending in CR) into records, with the header's delimiters."""
    try:
        text = message.decode("ascii")
    except UnicodeDecodeError as exc:
        raise AstmRecordError(f"non-ASCII byte at offset {exc.start}") from None
    lines = [_FRAME_NUMBER_PREFIX.sub("", line) for line in text.split("\r") if line.strip("\n")]
    if not lines or not lines[0].startswith("H"):
        raise AstmRecordError(f"message does not start with a header: {text[:20]!r}")
    records: list[Record] = []
    delimiters = Delimiters()
    for number, line in enumerate(lines, 1):
        if line[0] == "H":
            delimiters = Delimiters.from_header(line)
            rest = line[6:].split(delimiters.field) if len(line) > 5 else []
            records.append(Record("H", ("H", line[2:5], *rest), delimiters))
            continue
        if line[0] not in RECORD_TYPES or line[1:2] != delimiters.field:
            raise AstmRecordError(f"record {number} {line[:12]!r}: unknown record type")
        records.append(Record(line[0], tuple(line.split(delimiters.field)), delimiters))
    return records


def parse_timestamp(text: str, where: str) -> datetime | None:
    """``YYYYMMDD[HHMM[SS]]`` → naive device-local datetime; ``""`` → None."""
    if not text:
        return None
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    try:
        return datetime.strptime(text, formats[len(text)])
    except (KeyError, ValueError):
        raise AstmRecordError(f"{where}: bad date/time {text!r}") from None
